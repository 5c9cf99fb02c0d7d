"""Runs and their step logs in PostgreSQL, written in batches across runs.

Ingest inserts run rows through a :class:`~conveyor.store.batch.Batcher` (one multi-row
``INSERT … SELECT`` from one jsonb array per tick, idempotency keys under a unique
index); workers move runs through their states and append step records the same way. Every
state change is guarded so a terminal run never changes again: a cancel that lands first wins
over a worker that finishes later, and a redelivered job cannot resurrect a finished run.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

from conveyor.errors import NotFound
from conveyor.records import StepRecord
from conveyor.status import IN_FLIGHT, TERMINAL, RunStatus
from conveyor.store.batch import Batcher
from conveyor.store.db import CONNECTION_ERRORS, Database

#: How long an ``Idempotency-Key`` keeps answering with its first run.
IDEMPOTENCY_WINDOW = "24 hours"
_LIVE = [s.value for s in IN_FLIGHT]
_TERMINAL = [s.value for s in TERMINAL]


def _rows_json(rows: list[list[Any]]) -> str:
    """The JSON array of rows a batched statement reads (see :func:`_columns`).

    PostgreSQL refuses the NUL character in text and jsonb, and any webhook body, step
    output or log may carry one: it is replaced by U+FFFD (the rare batch that has one is
    encoded again). orjson writes NUL as ``\\u0000``, so one scan of the text finds it.
    """
    data = orjson.dumps(rows, default=str)
    if b"\\u0000" in data:
        data = orjson.dumps(_strip_nul(rows), default=str)
    return data.decode()


def _strip_nul(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {_strip_nul(k): _strip_nul(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strip_nul(v) for v in value]
    return value


def _ts(value: Any) -> Any:
    """An aware datetime for a timestamptz field (a naive one is local time, as asyncpg
    reads it), serialised by orjson with its offset."""
    return value.astimezone(UTC) if isinstance(value, datetime) else value


@dataclass(frozen=True, slots=True)
class NewRun:
    """A run to insert: ``response_status`` is the answer a repeat of its idempotency key gets."""

    id: uuid.UUID
    flow_id: uuid.UUID
    flow_version: int
    trigger: dict[str, Any]
    queue: str = "runs"
    idempotency_key: str | None = None
    response_status: int | None = None
    attempt: int = 0


@dataclass(frozen=True, slots=True)
class Inserted:
    """What an insert did: ``created`` False means an earlier run holds the idempotency key,
    and ``run_id``/``response_status``/``status`` are that run's. ``then``: the result of the
    work chained to the insert (see :meth:`RunWriter.insert`), for a created run."""

    run_id: uuid.UUID
    created: bool
    response_status: int | None = None
    status: str = RunStatus.QUEUED.value
    then: Any = None


#: Work chained to an insert's commit (:meth:`RunWriter.insert`): called once per batch with
#: the ``(run, arg)`` pairs the batch created, after the commit; returns one result per pair.
AfterInsert = Callable[[Sequence[tuple["NewRun", Any]]], Awaitable[Sequence[Any]]]
#: One insert waiting for its batch: ``(run, then, arg, trigger_json)`` (:meth:`RunWriter.insert`).
_InsertItem = tuple[NewRun, AfterInsert | None, Any, bytes | None]


@dataclass(frozen=True, slots=True)
class Transition:
    """A state change for :meth:`RunWriter.transition`; ``None`` fields keep their value."""

    run_id: uuid.UUID
    status: RunStatus
    output: Any = None
    error: Any = None
    attempt: int | None = None
    resume_at: datetime | None = None
    #: Count one more execution (a worker starting the run; resuming a pause is not one).
    bump_attempt: bool = False


# Every batched statement takes its rows as ONE jsonb array of arrays (one text parameter,
# encoded by a single orjson call; see _rows_json), read back column by column (_columns): a
# JSON-shaped column keeps the value itself (no JSON text inside JSON), and the statement's
# plan is cached. Parallel unnest() arrays cost more: asyncpg encodes every element of every
# array, and the planner's exact row estimate for a constant array made PostgreSQL plan the
# statement anew on every execution (a custom plan: most of its CPU at small batches).
# Positional rows, not objects: jsonb sorts and stores every object's keys.
#
# The row estimate of jsonb_array_elements is fixed, so the cached plans must be right for a
# batch of one and of 500 and for a table of any size: runs are reached by their primary
# key only (the guard is a per-row subquery; the UPDATE's own scan is bounded by the batch's
# ids) — never by a scan of the table, which the planner would otherwise pick
# for a small or mid-sized table (it takes "not terminal" for very selective).
_TERMINAL_SQL = "'{" + ",".join(sorted(s.value for s in TERMINAL)) + "}'::text[]"

#: The UPDATEs are prepared anew after this many runs moved (see :meth:`RunWriter._replanned`).
REPLAN_ROWS = 4096


def _columns(param: str, *spec: tuple[str, str]) -> str:
    """A subquery naming the ``(column, type)`` fields of each row of the jsonb array
    ``param``, in order. JSON null reads as SQL NULL in every column, jsonb ones too."""
    fields = []
    for i, (name, typ) in enumerate(spec):
        if typ == "jsonb":
            fields.append(f"NULLIF(e -> {i}, 'null') AS {name}")
        elif typ == "text":
            fields.append(f"e ->> {i} AS {name}")
        else:
            fields.append(f"(e ->> {i})::{typ} AS {name}")
    return f"(SELECT {', '.join(fields)} FROM jsonb_array_elements({param}::text::jsonb) AS e)"


_INSERT_COLUMNS = (
    ("id", "uuid"),
    ("flow_id", "uuid"),
    ("flow_version", "int"),
    ("queue", "text"),
    ("trigger", "jsonb"),
    ("idempotency_key", "text"),
    ("response_status", "int"),
    ("attempt", "int"),
)
_TRANSITION_COLUMNS = (
    ("id", "uuid"),
    ("status", "text"),
    ("output", "jsonb"),
    ("error", "jsonb"),
    ("attempt", "int"),
    ("resume_at", "timestamptz"),
    ("bump", "bool"),
)
_STEP_COLUMNS = (
    ("run_id", "uuid"),
    ("seq", "int"),
    ("name", "text"),
    ("type", "text"),
    ("status", "text"),
    ("input", "jsonb"),
    ("output", "jsonb"),
    ("error", "jsonb"),
    ("logs", "text"),
    ("parent", "text"),
    ("iteration", "int"),
    ("attempt", "int"),
    ("started_at", "timestamptz"),
    ("duration_ms", "float8"),
)

_INSERT = f"""
INSERT INTO runs (id, flow_id, flow_version, status, queue, trigger, idempotency_key,
                  response_status, attempt)
SELECT id, flow_id, flow_version, 'QUEUED', queue, trigger, idempotency_key,
       response_status, attempt
FROM {_columns("$1", *_INSERT_COLUMNS)} AS u
ON CONFLICT (flow_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
RETURNING id
"""

# A batch without idempotency keys (most webhooks) has nothing to conflict on: the plain
# INSERT skips ON CONFLICT's speculative insertion per row (~4-5 µs of PostgreSQL CPU per row
# of ~25-35) and RETURNING (every row of such a statement is created, or it raises).
_INSERT_PLAIN = _INSERT[: _INSERT.index("ON CONFLICT")]

# One statement for every transition: terminal states stamp finished_at, RUNNING stamps
# started_at once, and a run already terminal is never touched again. A NULL output/error
# keeps the stored one (a Transition's None means "unchanged").
_TRANSITION = f"""
UPDATE runs r SET
    status = u.status,
    output = COALESCE(u.output, r.output),
    error = COALESCE(u.error, r.error),
    attempt = CASE WHEN u.bump AND r.status <> 'PAUSED' THEN r.attempt + 1
                   ELSE COALESCE(u.attempt, r.attempt) END,
    -- A resumed run keeps its resume_at while RUNNING: its queue entry's id derives from it.
    resume_at = CASE WHEN u.status = 'PAUSED' THEN u.resume_at
                     WHEN u.status = 'RUNNING' THEN r.resume_at ELSE NULL END,
    -- A bumped attempt starts the run (RUNNING, or a run executed in memory that ends here).
    started_at = CASE WHEN u.status = 'RUNNING' OR u.bump THEN COALESCE(r.started_at, now())
                      ELSE r.started_at END,
    finished_at = CASE WHEN u.status = ANY({_TERMINAL_SQL}) THEN now() ELSE NULL END,
    updated_at = now()
FROM {_columns("$1", *_TRANSITION_COLUMNS)} AS u
-- The ids again, as an InitPlan of the same parameter: a bound the planner cannot see at
-- plan time (a uuid[] parameter's length made every plan a custom one, planned anew).
WHERE r.id = u.id
  AND r.id = ANY(ARRAY(SELECT (e ->> 0)::uuid FROM jsonb_array_elements($1::text::jsonb) AS e))
  AND NOT (r.status = ANY({_TERMINAL_SQL}))
RETURNING r.id
"""

_STEPS = f"""
INSERT INTO step_runs (run_id, seq, name, type, status, input, output, error, logs, parent,
                       iteration, attempt, started_at, duration_ms)
SELECT run_id, seq, name, type, status, input, output, error, logs,
       parent, iteration, attempt, started_at, duration_ms
FROM {_columns("$1", *_STEP_COLUMNS)} AS u
-- A run that ended meanwhile (canceled, timed out by the reconciler) records nothing more;
-- the worker learns it from the missing row and stops the run.
WHERE (SELECT NOT (r.status = ANY({_TERMINAL_SQL})) FROM runs r WHERE r.id = u.run_id)
ON CONFLICT (run_id, seq) DO UPDATE SET
    status = EXCLUDED.status, input = EXCLUDED.input, output = EXCLUDED.output,
    error = EXCLUDED.error, logs = EXCLUDED.logs, attempt = EXCLUDED.attempt,
    started_at = EXCLUDED.started_at, duration_ms = EXCLUDED.duration_ms
RETURNING run_id, seq
"""


def _shift(sql: str, by: int) -> str:
    """``sql`` with every ``$n`` placeholder renumbered ``$(n + by)``."""
    return re.sub(r"\$(\d+)", lambda m: f"${int(m.group(1)) + by}", sql)


# A run's last step records and its final state in one statement (one round trip, one
# commit): both parts see the same snapshot, so the steps are stored only if the run is not
# terminal yet, and the run's row is guarded as in _TRANSITION. A data-modifying WITH runs
# to completion whether or not the query reads it: only the moved runs come back.
_FINISH = f"""
WITH stored AS ({_STEPS.strip()}),
moved AS ({_shift(_TRANSITION.strip(), 1)})
SELECT id FROM moved
"""


@dataclass(frozen=True, slots=True)
class StepRow:
    """One step record to store; ``seq`` orders the steps of a run (a JSON-shaped mapping
    is accepted for ``record`` and read as a :class:`~conveyor.records.StepRecord`)."""

    run_id: uuid.UUID
    seq: int
    record: StepRecord

    def __post_init__(self) -> None:
        if not isinstance(self.record, StepRecord):
            object.__setattr__(self, "record", StepRecord.of(self.record))


@dataclass(frozen=True, slots=True)
class Finish:
    """A run's final :class:`Transition` with the step records not yet stored, written
    together by :meth:`RunWriter.finish`."""

    change: Transition
    steps: Sequence[StepRow] = ()


class RunWriter:
    """Batched writes of run rows, transitions and step records for one process.

    Parameters: ``db`` (writes go to the primary); ``max_batch`` rows per statement.
    """

    def __init__(self, db: Database, *, max_batch: int = 500) -> None:
        self.db = db
        opts: dict[str, Any] = {"max_batch": max_batch, "fatal": CONNECTION_ERRORS}
        self._inserts: Batcher[_InsertItem, Inserted] = Batcher(
            self._flush_inserts, then=self._chain_inserts, **opts
        )
        self._transitions: Batcher[Transition, bool] = Batcher(self._flush_transitions, **opts)
        self._steps: Batcher[StepRow, bool] = Batcher(self._flush_steps, **opts)
        self._finishes: Batcher[Finish, bool] = Batcher(self._flush_finishes, **opts)
        self._moved = 0

    def insert(
        self,
        run: NewRun,
        *,
        then: AfterInsert | None = None,
        arg: Any = None,
        trigger_json: bytes | None = None,
    ) -> Awaitable[Inserted]:
        """Commit ``run`` (group commit); returns once the row is durable.

        ``trigger_json``: ``run.trigger`` already encoded (by orjson, as the store encodes
        it) — embedded in the batch's parameter as is, so a caller that also puts the
        trigger in a job encodes it once (a NUL in it is still replaced in the row).

        ``then``: work to do once the row is committed, if this insert created it — called
        by the batch itself, once for all the runs of the batch that passed the same ``then``
        (one call, e.g. one enqueue, per statement instead of one per caller, and the caller
        wakes once for both), with ``(run, arg)`` pairs; its result for this run is
        :attr:`Inserted.then`. If ``then`` raises, that exception is the result of each of
        its runs (the rows stay committed either way).
        """
        return self._inserts.submit((run, then, arg, trigger_json))

    async def transition(self, change: Transition) -> bool:
        """Apply ``change``; False when the run was already terminal (or does not exist)."""
        return await self._transitions.submit(change)

    async def add_step(self, row: StepRow) -> bool:
        """Store a step record; False when the run has already ended (nothing stored)."""
        return await self._steps.submit(row)

    async def finish(self, done: Finish) -> bool:
        """Store ``done.steps`` and apply ``done.change`` in one statement, batched across
        runs; False when the run was already terminal: then the state is not applied, and
        the steps are not stored either — unless the run ended (a cancel) while this
        statement waited for its row lock, when the steps that did run are kept beside the
        canceled state (the statement's snapshot still saw the run live)."""
        if not done.steps:
            return await self.transition(done.change)
        return await self._finishes.submit(done)

    async def close(self) -> None:
        for batcher in (self._inserts, self._transitions, self._steps, self._finishes):
            await batcher.close()

    def _replanned(self, sql: str, rows: int) -> str:
        """``sql`` under a name that changes as this writer moves runs: each time the count
        doubles, then every :data:`REPLAN_ROWS` runs.

        A cached plan is made from the table's size at that moment. For a small runs table
        (a new install, a test) the cheapest way to the batch's rows is a pass over the
        table, and PostgreSQL keeps that plan until autovacuum next analyzes the table — up
        to a minute in which the table may grow a hundredfold. A new statement text makes
        asyncpg prepare it again, so the plan follows the table's growth; asyncpg's
        statement cache drops the old ones.
        """
        self._moved += rows
        moved = self._moved
        epoch = moved.bit_length() if moved < REPLAN_ROWS else moved // REPLAN_ROWS + 64
        return f"{sql}-- plan {epoch}\n"

    async def _flush_inserts(self, items: Sequence[_InsertItem]) -> list[Inserted]:
        if all(item[0].idempotency_key is None for item in items):
            async with self.db.writer() as conn:
                await conn.execute(_INSERT_PLAIN, _insert_items_args(items))
            return [Inserted(item[0].id, True, item[0].response_status) for item in items]
        async with self.db.writer() as conn:
            rows = await conn.fetch(_INSERT, _insert_items_args(items))
            if len(rows) == len(items):  # every run created (ids are unique in a batch)
                return [Inserted(item[0].id, True, item[0].response_status) for item in items]
            created = {row["id"] for row in rows}
            out = []
            for item in items:
                run = item[0]
                if run.id in created:
                    out.append(Inserted(run.id, True, run.response_status))
                else:
                    out.append(await self._existing(conn, run))
        return out

    async def _chain_inserts(
        self, items: Sequence[_InsertItem], done: Sequence[Inserted]
    ) -> list[Inserted]:
        """The work chained to a flushed batch (after its commit, its connection back in the
        pool and its batch slot free): each ``then`` once, with the runs it created."""
        out = list(done)
        chains: dict[AfterInsert, list[int]] = {}
        for i, (_, then, _, _) in enumerate(items):
            if then is not None and out[i].created:
                chains.setdefault(then, []).append(i)
        for then, idx in chains.items():
            try:
                results: Sequence[Any] = await then([(items[i][0], items[i][2]) for i in idx])
                if len(results) != len(idx):
                    raise RuntimeError(f"{then!r} returned {len(results)} results for {len(idx)}")
            except Exception as exc:
                # Never raised: the rows are committed, a retry item by item would insert
                # them again.
                results = [exc] * len(idx)
            for i, result in zip(idx, results, strict=True):
                r = out[i]
                out[i] = Inserted(r.run_id, True, r.response_status, r.status, result)
        return out

    async def _existing(self, conn: asyncpg.Connection, run: NewRun) -> Inserted:
        """The run that holds ``run``'s idempotency key; a key older than the window is
        released and ``run`` inserted after all."""
        row = await conn.fetchrow(
            f"""SELECT id, response_status, status, created_at < now() - interval
                '{IDEMPOTENCY_WINDOW}' AS expired
                FROM runs WHERE flow_id = $1 AND idempotency_key = $2""",
            run.flow_id,
            run.idempotency_key,
        )
        if row is not None and not row["expired"]:
            return Inserted(row["id"], False, row["response_status"], row["status"])
        async with conn.transaction():
            await conn.execute(
                "UPDATE runs SET idempotency_key = NULL WHERE flow_id = $1 "
                "AND idempotency_key = $2",
                run.flow_id,
                run.idempotency_key,
            )
            inserted = await conn.fetch(_INSERT, _insert_args([run]))
        if not inserted:
            # Another process re-used the expired key at the same moment and won.
            return await self._existing(conn, run)
        return Inserted(run.id, True, run.response_status)

    async def _flush_transitions(self, changes: Sequence[Transition]) -> list[bool]:
        # A run appearing twice in one batch: keep only its last change (UPDATE … FROM
        # would apply an arbitrary one).
        last: dict[uuid.UUID, Transition] = {c.run_id: c for c in changes}
        async with self.db.writer() as conn:
            rows = await conn.fetch(
                self._replanned(_TRANSITION, len(last)), *_transition_args(last.values())
            )
        done = {row["id"] for row in rows}
        return [c.run_id in done and last[c.run_id] is c for c in changes]

    async def _flush_steps(self, batch: Sequence[StepRow]) -> list[bool]:
        async with self.db.writer() as conn:
            stored = await conn.fetch(_STEPS, _step_args(batch))
        kept = {(r["run_id"], r["seq"]) for r in stored}
        return [(r.run_id, r.seq) in kept for r in batch]

    async def _flush_finishes(self, batch: Sequence[Finish]) -> list[bool]:
        last: dict[uuid.UUID, Finish] = {f.change.run_id: f for f in batch}
        # One row per (run, seq): ON CONFLICT cannot touch a row twice in one statement.
        steps = {(r.run_id, r.seq): r for f in last.values() for r in f.steps}
        args = [_step_args(steps.values()), *_transition_args(f.change for f in last.values())]
        async with self.db.writer() as conn:
            rows = await conn.fetch(self._replanned(_FINISH, len(last)), *args)
        done = {row["id"] for row in rows}
        return [f.change.run_id in done and last[f.change.run_id] is f for f in batch]


def _insert_items_args(items: Sequence[_InsertItem]) -> str:
    """:func:`_insert_args` of a batch whose triggers may come encoded already: those are
    embedded as they are (``orjson.Fragment``); the rare batch with a NUL is encoded anew
    from the triggers themselves (see :func:`_rows_json`)."""
    if all(item[3] is None for item in items):
        return _insert_args([item[0] for item in items])
    data = orjson.dumps(
        [
            [
                r.id,
                r.flow_id,
                r.flow_version,
                r.queue,
                r.trigger if encoded is None else orjson.Fragment(encoded),
                r.idempotency_key,
                r.response_status,
                r.attempt,
            ]
            for r, _, _, encoded in items
        ],
        default=str,
    )
    if b"\\u0000" in data:
        return _insert_args([item[0] for item in items])
    return data.decode()


def _insert_args(runs: Sequence[NewRun]) -> str:
    """The parameter of :data:`_INSERT` (fields in :data:`_INSERT_COLUMNS` order)."""
    return _rows_json(
        [
            [
                r.id,
                r.flow_id,
                r.flow_version,
                r.queue,
                r.trigger,
                r.idempotency_key,
                r.response_status,
                r.attempt,
            ]
            for r in runs
        ]
    )


def _transition_args(changes: Iterable[Transition]) -> tuple[str]:
    """The parameters of :data:`_TRANSITION` (one run at most once; fields in
    :data:`_TRANSITION_COLUMNS` order)."""
    # Sorted, so two processes' batches lock rows in the same order (no deadlock).
    uniq = sorted(changes, key=lambda c: c.run_id)
    rows = [
        [
            c.run_id,
            c.status.value,
            c.output,
            c.error,
            c.attempt,
            _ts(c.resume_at),
            c.bump_attempt,
        ]
        for c in uniq
    ]
    return (_rows_json(rows),)


def _step_args(batch: Iterable[StepRow]) -> str:
    """The parameter of :data:`_STEPS` (fields in :data:`_STEP_COLUMNS` order)."""
    rows = sorted(batch, key=lambda r: (r.run_id, r.seq))  # stable lock order
    return _rows_json(
        [
            [
                r.run_id,
                r.seq,
                x.name,
                x.type,
                x.status,
                x.input,
                x.output,
                x.error,
                x.logs or "",
                x.parent,
                x.iteration,
                x.attempt,
                _ts(x.started_at),
                x.duration_ms,
            ]
            for r in rows
            for x in (r.record,)
        ]
    )


# ------------------------------------------------------------------------------ reads
_RUN_COLUMNS = """id, flow_id, flow_version, status, queue, trigger, output, error, attempt,
    resume_at, created_at, started_at, finished_at, updated_at, idempotency_key,
    response_status"""


async def get_run(db: Database, run_id: uuid.UUID) -> dict[str, Any]:
    """The run row (no steps); :class:`NotFound` if absent. Reads the primary: a worker
    needs its own latest write."""
    async with db.writer() as conn:
        row = await conn.fetchrow(f"SELECT {_RUN_COLUMNS} FROM runs WHERE id = $1", run_id)
    if row is None:
        raise NotFound(f"run {run_id} not found")
    return dict(row)


async def get_steps(db: Database, run_id: uuid.UUID) -> list[StepRecord]:
    """The run's step records in execution order (each with its ``seq``)."""
    async with db.writer() as conn:
        rows = await conn.fetch(
            """SELECT seq, name, type, status, input, output, error, logs, started_at,
                      duration_ms, attempt, parent, iteration
               FROM step_runs WHERE run_id = $1 ORDER BY seq""",
            run_id,
        )
    return [StepRecord.of(dict(r)) for r in rows]


async def list_runs(
    db: Database,
    *,
    flow_id: uuid.UUID | None = None,
    status: str | None = None,
    limit: int = 50,
    cursor: uuid.UUID | None = None,
) -> list[dict[str, Any]]:
    """Newest first (UUIDv7 ids are time-ordered); reads a replica when configured."""
    rows = await db.fetch_read(
        f"""SELECT {_RUN_COLUMNS} FROM runs
            WHERE ($1::uuid IS NULL OR flow_id = $1)
              AND ($2::text IS NULL OR status = $2)
              AND ($3::uuid IS NULL OR id < $3)
            ORDER BY id DESC LIMIT $4""",
        flow_id,
        status,
        cursor,
        limit,
    )
    return [dict(r) for r in rows]


async def live_runs(
    db: Database,
    *,
    older_than_s: float,
    limit: int = 1000,
    after: tuple[datetime, uuid.UUID] | None = None,
) -> list[dict[str, Any]]:
    """Runs still ``QUEUED``/``RUNNING``/``PAUSED`` untouched for ``older_than_s`` seconds
    (the reconciler checks these against the queue), oldest first, one page of ``limit``;
    ``after`` is the ``(updated_at, id)`` of the previous page's last row."""
    after_at, after_id = after if after else (None, None)
    async with db.writer() as conn:
        rows = await conn.fetch(
            f"""SELECT {_RUN_COLUMNS} FROM runs
                WHERE status = ANY($1::text[])
                  AND updated_at < now() - make_interval(secs => $2)
                  AND ($4::timestamptz IS NULL OR (updated_at, id) > ($4, $5::uuid))
                ORDER BY updated_at, id LIMIT $3""",
            _LIVE,
            older_than_s,
            limit,
            after_at,
            after_id,
        )
    return [dict(r) for r in rows]


async def unchanged_live(
    db: Database, seen: Sequence[tuple[uuid.UUID, datetime]]
) -> set[uuid.UUID]:
    """Of the runs seen live with these ``updated_at`` values, those still live and untouched
    since (the reconciler's second look before it enqueues one again)."""
    if not seen:
        return set()
    async with db.writer() as conn:
        rows = await conn.fetch(
            """SELECT r.id FROM runs r
                 JOIN unnest($1::uuid[], $2::timestamptz[]) AS s(id, updated_at)
                   ON r.id = s.id AND r.updated_at = s.updated_at
                WHERE r.status = ANY($3::text[])""",
            [i for i, _ in seen],
            [u for _, u in seen],
            _LIVE,
        )
    return {r["id"] for r in rows}


async def delete_run(db: Database, run_id: uuid.UUID) -> None:
    """Undo an ingest the queue refused (backlog full): the caller was told 429."""
    async with db.writer() as conn:
        await conn.execute("DELETE FROM runs WHERE id = $1", run_id)


async def release_idempotency_key(db: Database, run_id: uuid.UUID) -> None:
    """Free a refused run's key so the caller's retry (same key) starts a run of its own."""
    async with db.writer() as conn:
        await conn.execute("UPDATE runs SET idempotency_key = NULL WHERE id = $1", run_id)


async def set_response_status(db: Database, run_id: uuid.UUID, status: int) -> None:
    """Remember the first answer a sync webhook gave (what an idempotent repeat returns)."""
    async with db.writer() as conn:
        await conn.execute(
            "UPDATE runs SET response_status = $2 WHERE id = $1 AND response_status IS NULL",
            run_id,
            status,
        )


async def reset_for_retry(
    db: Database, run_id: uuid.UUID, *, flow_version: int, keep_steps: bool
) -> dict[str, Any]:
    """Put a finished run back to ``QUEUED`` for a manual retry (the worker counts the attempt).

    ``keep_steps``: FROM_FAILED_STEP keeps the step records before the first failed one
    (they are skipped on the next execution) and drops the rest; otherwise every step
    record is dropped.
    """
    async with db.writer() as conn, conn.transaction():
        row = await conn.fetchrow(
            f"""UPDATE runs SET status = 'QUEUED', flow_version = $2,
                    output = NULL, error = NULL, finished_at = NULL, started_at = NULL,
                    resume_at = NULL, updated_at = now()
                WHERE id = $1 AND status = ANY($3::text[])
                RETURNING {_RUN_COLUMNS}""",
            run_id,
            flow_version,
            _TERMINAL,
        )
        if row is None:
            exists = await conn.fetchval("SELECT status FROM runs WHERE id = $1", run_id)
            if exists is None:
                raise NotFound(f"run {run_id} not found")
            return {"id": run_id, "status": exists, "retried": False}
        if keep_steps:
            # Keep what ran before the first failure; that step and everything after it
            # (even steps that succeeded under continue_on_failure) run again.
            await conn.execute(
                """DELETE FROM step_runs WHERE run_id = $1 AND seq >= COALESCE(
                       (SELECT min(seq) FROM step_runs WHERE run_id = $1
                          AND status IN ('FAILED', 'TIMEOUT', 'MEMORY_LIMIT_EXCEEDED',
                                         'CANCELED')),
                       (SELECT max(seq) + 1 FROM step_runs WHERE run_id = $1))""",
                run_id,
            )
        else:
            await conn.execute("DELETE FROM step_runs WHERE run_id = $1", run_id)
    return {**dict(row), "retried": True}


async def cancel_paused_steps(db: Database, run_id: uuid.UUID) -> int:
    """Mark the ``PAUSED`` step records of a canceled run ``CANCELED`` (a pausing delay that
    will never resume). Returns how many changed."""
    async with db.writer() as conn:
        result: str = await conn.execute(
            "UPDATE step_runs SET status = 'CANCELED' WHERE run_id = $1 AND status = 'PAUSED'",
            run_id,
        )
    return int(result.rsplit(maxsplit=1)[-1])


async def delete_older_than(db: Database, days: int, *, batch: int = 5000) -> int:
    """Retention (``AP_EXECUTION_DATA_RETENTION_DAYS``): delete finished runs (and their step
    logs) created more than ``days`` days ago, ``batch`` at a time so no statement holds
    locks for long. Returns how many runs were deleted."""
    total = 0
    while True:
        async with db.writer() as conn:
            result: str = await conn.execute(
                """DELETE FROM runs WHERE id IN (
                       SELECT id FROM runs
                       WHERE created_at < now() - make_interval(days => $1)
                         AND status = ANY($2::text[])
                       LIMIT $3)""",
                days,
                _TERMINAL,
                batch,
            )
        deleted = int(result.rsplit(maxsplit=1)[-1])
        total += deleted
        if deleted < batch:
            return total
