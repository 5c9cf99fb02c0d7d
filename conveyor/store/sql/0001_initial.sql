-- Flows, their immutable versions, runs, per-step logs and encrypted secrets.

CREATE TABLE flows (
    id              uuid PRIMARY KEY,
    name            text NOT NULL CHECK (char_length(name) BETWEEN 1 AND 200),
    enabled         boolean NOT NULL DEFAULT true,
    current_version integer NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX flows_name_key ON flows (name);

CREATE TABLE flow_versions (
    flow_id    uuid NOT NULL REFERENCES flows (id) ON DELETE CASCADE,
    version    integer NOT NULL,
    document   jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (flow_id, version)
);

-- Runs outlive nothing: deleting a flow deletes its history, as in Activepieces.
CREATE TABLE runs (
    id              uuid PRIMARY KEY,               -- UUIDv7: time-ordered, so id order = age
    flow_id         uuid NOT NULL REFERENCES flows (id) ON DELETE CASCADE,
    flow_version    integer NOT NULL,
    status          text NOT NULL,
    queue           text NOT NULL DEFAULT 'runs',
    trigger         jsonb NOT NULL,
    output          jsonb,
    error           jsonb,
    attempt         integer NOT NULL DEFAULT 0,
    idempotency_key text,
    response_status integer,
    resume_at       timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    finished_at     timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
-- Listing: newest first overall, per flow, per status, per flow and status (cursor = id).
CREATE INDEX runs_flow_id_idx ON runs (flow_id, id DESC);
CREATE INDEX runs_status_idx ON runs (status, id DESC);
CREATE INDEX runs_flow_status_idx ON runs (flow_id, status, id DESC);
-- The reconciler and the timeout sweeper scan only the few live runs.
CREATE INDEX runs_live_idx ON runs (status, updated_at)
    WHERE status IN ('QUEUED', 'RUNNING', 'PAUSED');
CREATE UNIQUE INDEX runs_idempotency_key ON runs (flow_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX runs_created_at_idx ON runs (created_at);

CREATE TABLE step_runs (
    run_id      uuid NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    seq         integer NOT NULL,                   -- execution order within the run
    name        text NOT NULL,
    type        text NOT NULL,
    status      text NOT NULL,
    input       jsonb,
    output      jsonb,
    error       jsonb,
    logs        text,
    parent      text,
    iteration   integer,
    attempt     integer NOT NULL DEFAULT 1,
    started_at  timestamptz,
    duration_ms double precision,
    PRIMARY KEY (run_id, seq)
);

CREATE TABLE secrets (
    name       text PRIMARY KEY,
    ciphertext bytea NOT NULL,                      -- key id + nonce + AES-GCM ciphertext
    key_id     text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
