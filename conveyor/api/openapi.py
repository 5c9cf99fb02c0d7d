"""``/api/v1/openapi.json``: the OpenAPI 3.0.3 document of the API, built from the route table.

The paths come from the application's router, so a route cannot be missing from the document
(the board's pages under ``/admin``, HTML and not an API, are left out, and a webhook's
trailing-slash alias is listed once under its plain path). What each operation says — summary,
description, query and header parameters, request body with an example, responses — comes
from :data:`OPERATIONS`, keyed by method and path; tests/api/test_openapi.py checks that every
route has an entry, that every query parameter a handler reads is declared, and that the
document passes an OpenAPI validator. The flow document's schema follows docs/flows.md. The
docs page (``/api/docs``, :mod:`conveyor.api.docs`) renders this document.
"""

from __future__ import annotations

import re
from typing import Any, Final

from aiohttp import web

from conveyor import __version__
from conveyor.api.errors import json_response
from conveyor.engine.pieces import REGISTRY
from conveyor.engine.schema import ANY, INPUT, STEPS, STR, Json, obj, ref, step_schema
from conveyor.status import RunStatus

#: The board (HTML pages, static assets, its live-refresh JSON) is not part of the API.
BOARD_PREFIX: Final = "/admin"
#: The security scheme every protected operation names (``Authorization: Bearer <key>``).
SCHEME: Final = "bearer"
_PARAM = re.compile(r"\{([^}:]+)(?::[^}]*)?\}")
_ANY_METHOD: Final = ("get", "post", "put", "patch", "delete")


_NULLABLE_STR: Final[Json] = {"type": "string", "nullable": True}
_TIME: Final[Json] = {"type": "string", "format": "date-time", "nullable": True}

#: One schema per step type, each from its spec (conveyor/engine/pieces/*): a registered type
#: without one is described as a plain step with any input.
STEP_SCHEMAS: Final[dict[str, Json]] = {
    str(spec.type): dict(spec.schema)
    if spec.schema is not None
    else step_schema(str(spec.type), f"A {spec.type} step.", {"input": {**INPUT, "default": {}}})
    for spec in REGISTRY
}

_OPS: Final = [
    "eq", "ne", "gt", "gte", "lt", "lte", "contains", "not_contains", "matches",
    "exists", "not_exists", "is_true", "is_false",
]  # fmt: skip

#: The flow format (docs/flows.md) as JSON Schema, in the OpenAPI 3.0 dialect.
FLOW_SCHEMAS: Final[dict[str, Json]] = {
    "Trigger": obj(
        {
            "type": {"type": "string", "enum": ["webhook", "schedule", "manual"]},
            "secret": {
                "type": "string",
                "description": "webhook only: {{secrets.NAME}}; requests must then carry "
                "X-Conveyor-Signature",
            },
            "cron": {"type": "string", "description": "schedule only: five cron fields"},
            "timezone": {"type": "string", "description": "schedule only: IANA zone (UTC)"},
        },
        ("type",),
        additionalProperties=False,
    ),
    "Comparison": obj(
        {
            "left": ANY,
            "op": {"type": "string", "enum": _OPS},
            "right": {**ANY, "description": "not for exists, not_exists, is_true, is_false"},
        },
        ("left", "op"),
        additionalProperties=False,
    ),
    "Condition": {
        "type": "object",
        "description": "{all: [...]} or {any: [...]} over comparisons or nested groups",
        "minProperties": 1,
        "maxProperties": 1,
        "properties": {
            key: {
                "type": "array",
                "items": {"oneOf": [ref("Comparison"), ref("Condition")]},
            }
            for key in ("all", "any")
        },
        "additionalProperties": False,
    },
    **{f"{typ.capitalize()}Step": schema for typ, schema in STEP_SCHEMAS.items()},
    "Step": {
        "oneOf": [ref(f"{typ.capitalize()}Step") for typ in STEP_SCHEMAS],
        "discriminator": {
            "propertyName": "type",
            "mapping": {
                typ: f"#/components/schemas/{typ.capitalize()}Step" for typ in STEP_SCHEMAS
            },
        },
    },
    "FlowDocument": obj(
        {
            "name": {"type": "string", "minLength": 1, "maxLength": 200},
            "description": {"type": "string"},
            "trigger": ref("Trigger"),
            "steps": STEPS,
        },
        ("name", "trigger", "steps"),
        description="A flow (docs/flows.md). The server fields of a Flow (id, version, "
        "enabled, webhook_url, …) may be sent back and are ignored.",
    ),
}

#: POST /api/v1/flows's example: created, it answers its sync webhook (see WEBHOOK_EXAMPLE).
EXAMPLE_FLOW: Final[Json] = {
    "name": "hello-docs",
    "description": 'Greets the caller: try its sync webhook with {"name": "Ada"}',
    "trigger": {"type": "webhook"},
    "steps": [
        {
            "name": "greet",
            "type": "transform",
            "input": {"message": "Hello, {{trigger.body.name}}!"},
        },
        {
            "name": "reply",
            "type": "respond",
            "input": {"status": 200, "body": {"greeting": "{{greet.message}}"}},
        },
    ],
}
EXAMPLE_FLOW_YAML: Final = """name: hello-docs
trigger: {type: webhook}
steps:
  - name: greet
    type: transform
    input: {message: "Hello, {{trigger.body.name}}!"}
  - name: reply
    type: respond
    input: {status: 200, body: {greeting: "{{greet.message}}"}}
"""
WEBHOOK_EXAMPLE: Final[Json] = {"name": "Ada"}
_EXAMPLE_ID: Final = "01938d2e-5b7a-7c3e-9a41-2f0c8b6d4e10"
_EXAMPLE_HOOK: Final = f"http://127.0.0.1:8080/api/v1/webhooks/{_EXAMPLE_ID}"
_STARTED: Final = "2026-12-01T16:00:01.120000+00:00"
EXAMPLE_RUN: Final[Json] = {
    "id": "01938d2f-0a11-7b52-8c07-5d1e3f9a2b64",
    "flow_id": _EXAMPLE_ID,
    "flow_version": 1,
    "status": "SUCCEEDED",
    "trigger": {"method": "POST", "headers": {}, "query": {}, "body": WEBHOOK_EXAMPLE},
    "output": {"status": 200, "headers": {}, "body": {"greeting": "Hello, Ada!"}},
    "error": None,
    "attempt": 1,
    "created_at": "2026-12-01T16:00:01.100000+00:00",
    "started_at": _STARTED,
    "finished_at": "2026-12-01T16:00:01.131000+00:00",
    "duration_ms": 11.0,
    "steps": [
        {
            "name": "greet",
            "type": "transform",
            "status": "SUCCEEDED",
            "input": {"message": "Hello, Ada!"},
            "output": {"message": "Hello, Ada!"},
            "error": None,
            "logs": "",
            "started_at": _STARTED,
            "duration_ms": 0.2,
            "attempt": 1,
            "parent": None,
            "iteration": None,
        },
        {
            "name": "reply",
            "type": "respond",
            "status": "SUCCEEDED",
            "input": {"status": 200, "body": {"greeting": "Hello, Ada!"}},
            "output": {"status": 200, "headers": {}, "body": {"greeting": "Hello, Ada!"}},
            "error": None,
            "logs": "",
            "started_at": _STARTED,
            "duration_ms": 0.3,
            "attempt": 1,
            "parent": None,
            "iteration": None,
        },
    ],
}
EXAMPLE_FLOW_ANSWER: Final[Json] = {
    "id": _EXAMPLE_ID,
    "name": EXAMPLE_FLOW["name"],
    "version": 1,
    "enabled": True,
    "trigger": EXAMPLE_FLOW["trigger"],
    "steps": EXAMPLE_FLOW["steps"],
    "webhook_url": _EXAMPLE_HOOK,
    "sync_webhook_url": _EXAMPLE_HOOK + "/sync",
    "created_at": "2026-12-01T16:00:00+00:00",
    "updated_at": "2026-12-01T16:00:00+00:00",
}

# --------------------------------------------------------------------------- API objects
_PAGE_CURSOR: Final[Json] = {
    "type": "string",
    "nullable": True,
    "description": "pass as ?cursor= for the next page; null on the last one",
}


def _page(item: str) -> Json:
    return obj({"data": {"type": "array", "items": ref(item)}, "next_cursor": _PAGE_CURSOR})


_LOOSE: Final[Json] = {"type": "object", "additionalProperties": True}
API_SCHEMAS: Final[dict[str, Json]] = {
    "Error": obj(
        {
            "error": obj(
                {
                    "code": {"type": "string", "example": "NOT_FOUND"},
                    "message": STR,
                    "details": {
                        "type": "array",
                        "description": "FLOW_INVALID: every problem with its path",
                        "items": obj({"path": STR, "message": STR}, ("path", "message")),
                    },
                },
                ("code", "message"),
            ),
            "run_id": {"type": "string", "description": "when the error is about a run"},
        },
        ("error",),
    ),
    "Flow": obj(
        {
            "id": {"type": "string", "format": "uuid"},
            "name": STR,
            "version": {"type": "integer"},
            "enabled": {"type": "boolean"},
            "trigger": ref("Trigger"),
            "steps": STEPS,
            "webhook_url": {"type": "string", "format": "uri"},
            "sync_webhook_url": {"type": "string", "format": "uri"},
            "created_at": _TIME,
            "updated_at": _TIME,
        },
        example=EXAMPLE_FLOW_ANSWER,
    ),
    "FlowPage": _page("Flow"),
    "RunAccepted": obj(
        {
            "run_id": {"type": "string", "format": "uuid"},
            "status": {"type": "string", "enum": [RunStatus.QUEUED.value]},
            "idempotent_replay": {
                "type": "boolean",
                "description": "a repeated Idempotency-Key: nothing new was started",
            },
        },
        ("run_id", "status"),
    ),
    "StepRecord": obj(
        {
            "name": STR,
            "type": STR,
            "status": STR,
            "input": ANY,
            "output": ANY,
            "error": ANY,
            "logs": STR,
            "started_at": _TIME,
            "duration_ms": {"type": "number"},
            "attempt": {"type": "integer"},
            "parent": _NULLABLE_STR,
            "iteration": {"type": "integer", "nullable": True},
        }
    ),
    "Run": obj(
        {
            "id": {"type": "string", "format": "uuid"},
            "flow_id": {"type": "string", "format": "uuid"},
            "flow_version": {"type": "integer"},
            "status": {"type": "string", "enum": [s.value for s in RunStatus]},
            "trigger": {**_LOOSE, "description": "{method, headers, query, body}"},
            "output": ANY,
            "error": {**ANY, "description": "{step, message} when the run failed"},
            "attempt": {"type": "integer"},
            "created_at": _TIME,
            "started_at": _TIME,
            "finished_at": _TIME,
            "duration_ms": {"type": "number", "nullable": True},
            "steps": {
                "type": "array",
                "items": ref("StepRecord"),
                "description": "the step log in execution order (detail view only)",
            },
        },
        example=EXAMPLE_RUN,
    ),
    "RunPage": _page("Run"),
    "Secret": obj({"name": STR, "created_at": _TIME, "updated_at": _TIME}),
    "SecretPage": _page("Secret"),
    "QueueStats": {**_LOOSE, "description": "depth, waits, consumers and throughput"},
    "Job": {**_LOOSE, "description": "a queue job (id, run, state, attempts, times)"},
}

# --------------------------------------------------------------------------- parameters
_UUID: Final[Json] = {"type": "string", "format": "uuid"}
_QUEUE: Final[Json] = {"type": "string", "enum": ["sync", "runs"]}
_STATES: Final = ["waiting", "active", "delayed", "failed", "completed"]


def _query(name: str, description: str, schema: Json) -> Json:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema,
    }


_LIMIT: Final = _query(
    "limit",
    "page size",
    {"type": "integer", "minimum": 1, "maximum": 200, "default": 50},
)
_PARAMETERS: Final[dict[str, Json]] = {
    "limit": _LIMIT,
    "cursor": _query("cursor", "next_cursor of the previous page", _UUID),
    "flow_name": _query("name", "a flow's exact name: the page holds that flow or nothing", STR),
    "flow_id": _query("flow_id", "only runs of this flow", _UUID),
    "run_status": _query(
        "status",
        "only runs in this status",
        {"type": "string", "enum": [s.value for s in RunStatus]},
    ),
    "job_state": _query(
        "state", "jobs in this state", {"type": "string", "enum": _STATES, "default": "waiting"}
    ),
    "job_cursor": _query("cursor", "next_cursor of the previous page", STR),
    "include_lost": _query(
        "include_lost",
        "also list workers whose heartbeat stopped (1, true or yes)",
        {"type": "boolean", "default": False},
    ),
    "hook_query": {
        "name": "query",
        "in": "query",
        "required": False,
        "description": "any query parameters: the flow reads them as {{trigger.query.NAME}}",
        "style": "form",
        "explode": True,
        "schema": {
            "type": "object",
            "additionalProperties": {"type": "string"},
            "example": {"source": "api-docs"},
        },
    },
    "idempotency_key": {
        "name": "Idempotency-Key",
        "in": "header",
        "required": False,
        "description": "1–255 printable ASCII characters: at most one run per flow and key "
        "within 24 h; a repeat gets the first answer's status",
        "schema": {"type": "string", "minLength": 1, "maxLength": 255},
    },
    "signature": {
        "name": "X-Conveyor-Signature",
        "in": "header",
        "required": False,
        "description": "required when the flow's trigger has a secret: `t=<unix seconds>,"
        'v1=<hex HMAC-SHA256 of "<t>.<raw body>">` (docs/flows.md, Signatures)',
        "schema": STR,
    },
}
# Path parameters by name (a route's {name} not listed here is a plain string).
_PATH_PARAMS: Final[dict[str, tuple[str, Json]]] = {
    "flow_id": ("the flow's id (POST /api/v1/flows answers it)", _UUID),
    "q": ("a queue", _QUEUE),
    "name": ("a secret's name", {"type": "string", "pattern": r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"}),
}


def _path_param(path: str, name: str) -> Json:
    description, schema = _PATH_PARAMS.get(name, ("", STR))
    if name == "id":
        if "/flows/" in path:
            description, schema = "a flow's id", _UUID
        elif "/flow-runs/" in path:
            description, schema = "a run's id", _UUID
        elif "/jobs/" in path:
            description = "a job's id"
    elif name == "name" and path.startswith("/api/docs/"):
        description = "a file of the page"
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": schema,
    }


# --------------------------------------------------------------------------- responses
_ERRORS: Final[dict[int, str]] = {
    400: "bad request: a malformed parameter or body (BAD_REQUEST)",
    401: "missing or wrong `Authorization: Bearer <AP_API_KEY>` (UNAUTHORIZED)",
    404: "not found (NOT_FOUND)",
    408: "the flow did not answer in time (WEBHOOK_TIMEOUT); the run goes on",
    409: "conflict (CONFLICT)",
    413: "body too large (PAYLOAD_TOO_LARGE)",
    415: "unsupported media type (UNSUPPORTED_MEDIA_TYPE)",
    422: "the request is well-formed but refused (UNPROCESSABLE)",
    429: "backlog full (QUEUE_FULL): retry after Retry-After seconds",
    500: "the run ended unsuccessfully (FAILED, TIMEOUT, …: its status); details in the run record",
    503: "Redis or PostgreSQL unavailable (UNAVAILABLE): retry after Retry-After seconds",
}
_CODE = re.compile(r"\(([A-Z][A-Z_]+)")


def _error(status: int, description: str) -> Json:
    """An error answer whose example has the code its description names."""
    found = _CODE.search(description) or _CODE.search(_ERRORS.get(status, ""))
    message = description.replace("`", "")
    error: Json = {"code": found.group(1) if found else "ERROR", "message": message}
    if error["code"] == "FLOW_INVALID":
        problem = 'template refers to unknown step "gret"'
        error["details"] = [{"path": "steps[1].input.body.greeting", "message": problem}]
    return _json(ref("Error"), description, {"error": error})


def _json(schema: Json, description: str, example: Any = None) -> Json:
    media: Json = {"schema": schema}
    if example is not None:
        media["example"] = example
    return {"description": description, "content": {"application/json": media}}


def _ok(status: int, schema: str | Json | None, description: str) -> dict[int, Json]:
    if schema is None:
        return {status: {"description": description}}
    return {status: _json(ref(schema) if isinstance(schema, str) else schema, description)}


def _fail(*statuses: int, **why: str) -> dict[int, Json]:
    """Error answers; ``why`` overrides a description (``e404="no such flow"``)."""
    every = sorted({*statuses, *(int(key[1:]) for key in why)})
    return {
        s: _error(s, why[f"e{s}"]) if f"e{s}" in why else {"$ref": f"#/components/responses/E{s}"}
        for s in every
    }


def _body(schema: Json, example: Any, description: str, required: bool = True) -> Json:
    return {
        "description": description,
        "required": required,
        "content": {"application/json": {"schema": schema, "example": example}},
    }


_FLOW_BODY: Final[Json] = {
    "description": "a flow document (docs/flows.md), as JSON or as YAML "
    "(Content-Type: application/yaml); at most 4 MiB",
    "required": True,
    "content": {
        "application/json": {"schema": ref("FlowDocument"), "example": EXAMPLE_FLOW},
        "application/yaml": {"schema": ref("FlowDocument"), "example": EXAMPLE_FLOW_YAML},
    },
}
_HOOK_BODY: Final[Json] = {
    "description": "anything: JSON (with a JSON Content-Type) becomes {{trigger.body}} "
    "parsed, any other body is text; at most AP_MAX_WEBHOOK_PAYLOAD_SIZE_MB",
    "required": False,
    "content": {
        "application/json": {"schema": {}, "example": WEBHOOK_EXAMPLE},
        "text/plain": {"schema": STR, "example": "raw text"},
    },
}
_HOOK_DOC: Final = (
    "Public: no API key. A flow whose trigger has a secret accepts only requests signed "
    "with X-Conveyor-Signature (401 otherwise, 409 for a replay). Any HTTP method works "
    "(GET, POST, PUT, PATCH, DELETE, …; {{trigger.method}} tells which); "
    "the page lists GET and POST. The flow reads {{trigger.headers}}, {{trigger.query}} "
    "and {{trigger.body}}; credentials in headers are stored as `***`. Answers about a run "
    "carry its id in x-run-id."
)
_HOOK_PARAMS: Final = ("hook_query", "idempotency_key", "signature")


def _op(
    tag: str,
    summary: str,
    description: str,
    responses: dict[int, Json],
    *,
    query: tuple[str, ...] = (),
    body: Json | None = None,
    public: bool = False,
) -> Json:
    """One operation's documentation (path parameters are added from the route)."""
    op: Json = {"tags": [tag], "summary": summary, "description": description}
    if query:
        op["parameters"] = [{"$ref": f"#/components/parameters/{q}"} for q in query]
    if body is not None:
        op["requestBody"] = body
    if not public:
        op["security"] = [{SCHEME: []}]
        responses = {**responses, **_fail(401)}
    op["responses"] = {str(s): r for s, r in sorted(responses.items())}
    return op


def _hook(method: str, sync: bool) -> Json:
    if sync:
        summary = "Run a flow and wait for its answer (sync webhook)"
        description = (
            "Starts a run on the sync queue and waits up to AP_WEBHOOK_TIMEOUT_SECONDS: the "
            "answer is the first respond step's status, headers and body, else 200 with the "
            "run's output, 500 when the run ends unsuccessfully, 408 when it has not ended. "
        )
        responses = {
            200: _json(
                ANY,
                "the respond step's answer (any status and content type) or the run's output",
                {"greeting": "Hello, Ada!"},
            ),
            **_fail(408, 500),
        }
    else:
        summary = "Start a run of a flow (async webhook)"
        description = "Stores a run and answers 202 at once; a worker runs it. "
        responses = _ok(202, "RunAccepted", "the run is stored and queued")
    responses |= _fail(
        400,
        401,
        409,
        413,
        422,
        429,
        503,
        e404="unknown or disabled flow (FLOW_NOT_FOUND)",
        e401="signature missing, wrong or expired (SIGNATURE_INVALID, SIGNATURE_EXPIRED)",
        e409="this signed request was already received (SIGNATURE_REPLAYED)",
        e422="Idempotency-Key reused with a different body (IDEMPOTENCY_KEY_REUSED)",
        e400="malformed Idempotency-Key",
    )
    op = _op(
        "webhooks",
        summary,
        description + _HOOK_DOC,
        responses,
        query=_HOOK_PARAMS,
        body=_HOOK_BODY if method != "get" else None,
        public=True,
    )
    return op


_FLOW_404: Final = "no such flow"
_INVALID: Final = "the document is invalid (FLOW_INVALID): details lists every problem"
_RUN_404: Final = "no such run"
_Q404: Final = "no such queue (queues are sync and runs)"

#: The documentation of every operation, by (method, path). Paths are the router's.
OPERATIONS: Final[dict[tuple[str, str], Json]] = {
    # flows
    ("post", "/api/v1/flows"): _op(
        "flows",
        "Create a flow",
        "Validates the whole document (422 FLOW_INVALID lists every problem with its path) "
        "and saves version 1, enabled. The answer has the flow's id and its two webhook "
        'URLs. The example creates a flow whose sync webhook greets {"name": "Ada"}.',
        _ok(201, "Flow", "created")
        | _fail(400, 413, 503, e409="a flow with this name exists (use PUT)", e422=_INVALID),
        body=_FLOW_BODY,
    ),
    ("get", "/api/v1/flows"): _op(
        "flows",
        "List flows",
        "Newest first, a page at a time (follow next_cursor). With ?name= the page holds "
        "the flow of that exact name, or nothing.",
        _ok(200, "FlowPage", "a page of flows") | _fail(400, 422, 503),
        query=("flow_name", "limit", "cursor"),
    ),
    ("get", "/api/v1/flows/{id}"): _op(
        "flows",
        "Get a flow",
        "The flow's current version: its document, enabled flag and webhook URLs.",
        _ok(200, "Flow", "the flow") | _fail(503, e404=_FLOW_404),
    ),
    ("put", "/api/v1/flows/{id}"): _op(
        "flows",
        "Save a new version of a flow",
        "Replaces the document (validated like a create) as a new immutable version; runs "
        "already started keep theirs. Server fields from GET may be left in and are ignored.",
        _ok(200, "Flow", "the new version")
        | _fail(400, 409, 413, 503, e404=_FLOW_404, e422=_INVALID),
        body=_FLOW_BODY,
    ),
    ("delete", "/api/v1/flows/{id}"): _op(
        "flows",
        "Delete a flow",
        "Deletes the flow and its versions; its webhooks answer 404 from then on.",
        _ok(204, None, "deleted") | _fail(503, e404=_FLOW_404),
    ),
    ("post", "/api/v1/flows/{id}/enable"): _op(
        "flows",
        "Enable a flow",
        "Its webhooks accept requests again and its schedule fires.",
        _ok(200, "Flow", "the flow") | _fail(503, e404=_FLOW_404),
    ),
    ("post", "/api/v1/flows/{id}/disable"): _op(
        "flows",
        "Disable a flow",
        "Its webhooks answer 404 and its schedule stops; manual runs still work.",
        _ok(200, "Flow", "the flow") | _fail(503, e404=_FLOW_404),
    ),
    ("post", "/api/v1/flows/{id}/run"): _op(
        "flows",
        "Run a flow now (manual trigger)",
        "Starts a run of any flow, whatever its trigger type and whether enabled: the JSON "
        "body (optional) becomes {{trigger.body}} and {{trigger.method}} is MANUAL. Follow "
        "the run with GET /api/v1/flow-runs/{id}.",
        _ok(202, "RunAccepted", "the run is queued")
        | _fail(
            429, 503, e400="the body is not JSON", e404=_FLOW_404, e422="body nested too deeply"
        ),
        body=_body(ANY, WEBHOOK_EXAMPLE, "any JSON: the run's trigger.body", required=False),
    ),
    # runs
    ("get", "/api/v1/flow-runs"): _op(
        "runs",
        "List runs",
        "Newest first, a page at a time (follow next_cursor), optionally of one flow and "
        "in one status. Listings carry no step log.",
        _ok(200, "RunPage", "a page of runs") | _fail(400, 503),
        query=("flow_id", "run_status", "limit", "cursor"),
    ),
    ("get", "/api/v1/flow-runs/{id}"): _op(
        "runs",
        "Get a run with its step log",
        "Status, trigger, output or error, and every step's input, output, error and logs "
        "in execution order (secrets' values shown as `***`).",
        _ok(200, "Run", "the run") | _fail(503, e404=_RUN_404),
    ),
    ("post", "/api/v1/flow-runs/{id}/retry"): _op(
        "runs",
        "Retry a finished run",
        "FROM_FAILED_STEP (default) keeps the steps that succeeded and reruns from the "
        "failed one on the same version; ON_LATEST_VERSION starts over on the flow's "
        "current version.",
        _ok(202, "Run", "the run, queued again")
        | _fail(400, 503, e404=_RUN_404, e409="the run has not finished"),
        body=_body(
            obj(
                {
                    "strategy": {
                        "type": "string",
                        "enum": ["FROM_FAILED_STEP", "ON_LATEST_VERSION"],
                        "default": "FROM_FAILED_STEP",
                    }
                },
                additionalProperties=False,
            ),
            {"strategy": "FROM_FAILED_STEP"},
            "optional: the strategy",
            required=False,
        ),
    ),
    ("post", "/api/v1/flow-runs/{id}/cancel"): _op(
        "runs",
        "Cancel a run",
        "Stops a queued, running or paused run; it ends CANCELED.",
        _ok(200, "Run", "the canceled run")
        | _fail(503, e404=_RUN_404, e409="the run has already finished"),
    ),
    # secrets
    ("get", "/api/v1/secrets"): _op(
        "secrets",
        "List secret names",
        "Names and times only: values are never returned.",
        _ok(200, "SecretPage", "every secret's name") | _fail(503),
    ),
    ("put", "/api/v1/secrets/{name}"): _op(
        "secrets",
        "Set a secret",
        "Stores the value encrypted; flows read it as {{secrets.NAME}}. 201 when new, 200 "
        "when replaced.",
        _ok(200, obj({"name": STR}), "replaced")
        | _ok(201, obj({"name": STR}), "created")
        | _fail(503, e400='bad name, or the body is not `{"value": "<string>"}`'),
        body=_body(
            obj({"value": STR}, ("value",)),
            {"value": "s3cret value"},
            "the secret's value",
        ),
    ),
    ("delete", "/api/v1/secrets/{name}"): _op(
        "secrets",
        "Delete a secret",
        "Flows that read it fail their step until it is set again.",
        _ok(204, None, "deleted") | _fail(400, 503, e404="no such secret"),
    ),
    # queues and workers
    ("get", "/api/v1/queues"): _op(
        "queues",
        "List queues with their stats",
        "Waiting, active, delayed and dead jobs, consumers, waits and throughput of the "
        "sync and runs queues.",
        _ok(200, obj({"data": {"type": "array", "items": ref("QueueStats")}}), "stats")
        | _fail(503),
    ),
    ("get", "/api/v1/queues/{q}"): _op(
        "queues",
        "Get one queue's stats and history",
        "The queue's stats plus its 10-second samples (history, oldest first).",
        _ok(200, ref("QueueStats"), "stats and history") | _fail(503, e404=_Q404),
    ),
    ("get", "/api/v1/queues/{q}/jobs"): _op(
        "queues",
        "List a queue's jobs",
        "One page of jobs in a state (failed = dead-lettered); follow next_cursor.",
        _ok(200, _page("Job"), "a page of jobs") | _fail(400, 503, e404=_Q404),
        query=("job_state", "limit", "job_cursor"),
    ),
    ("post", "/api/v1/queues/{q}/pause"): _op(
        "queues",
        "Pause a queue",
        "Every worker stops taking jobs from it; jobs keep arriving and wait.",
        _ok(200, obj({"queue": STR, "paused": {"type": "boolean"}}), "paused")
        | _fail(503, e404=_Q404),
    ),
    ("post", "/api/v1/queues/{q}/resume"): _op(
        "queues",
        "Resume a paused queue",
        "Workers take its jobs again.",
        _ok(200, obj({"queue": STR, "paused": {"type": "boolean"}}), "resumed")
        | _fail(503, e404=_Q404),
    ),
    ("post", "/api/v1/queues/{q}/clean"): _op(
        "queues",
        "Delete old jobs in a state",
        "Removes the queue's jobs in state (not active) older than older_than_s seconds.",
        _ok(200, obj({"queue": STR, "state": STR, "removed": {"type": "integer"}}), "done")
        | _fail(400, 503, e404=_Q404),
        body=_body(
            obj(
                {
                    "state": {"type": "string", "enum": [s for s in _STATES if s != "active"]},
                    "older_than_s": {"type": "number", "minimum": 0, "default": 0},
                },
                ("state",),
            ),
            {"state": "completed", "older_than_s": 3600},
            "which jobs",
        ),
    ),
    ("post", "/api/v1/queues/{q}/retry-all"): _op(
        "queues",
        "Retry every dead-lettered job",
        "Puts every failed (dead-lettered) job of the queue back on it.",
        _ok(200, obj({"queue": STR, "retried": {"type": "integer"}}), "done")
        | _fail(503, e404=_Q404),
    ),
    ("post", "/api/v1/queues/{q}/jobs/{id}/retry"): _op(
        "queues",
        "Retry a dead-lettered job",
        "Puts one failed (dead-lettered) job back on its queue.",
        _ok(200, _LOOSE, "queued again") | _fail(409, 503, e404="no such queue or job"),
    ),
    ("delete", "/api/v1/queues/{q}/jobs/{id}"): _op(
        "queues",
        "Delete a job",
        "Removes a waiting, delayed, failed or active job; deleted_from says which.",
        _ok(200, _LOOSE, "deleted") | _fail(409, 503, e404="no such queue or job"),
    ),
    ("get", "/api/v1/workers"): _op(
        "workers",
        "List worker processes",
        "Live workers with their slots and heartbeats; include_lost adds those whose "
        "heartbeat stopped.",
        _ok(200, obj({"data": {"type": "array", "items": _LOOSE}}), "workers") | _fail(503),
        query=("include_lost",),
    ),
    ("get", "/api/v1/scaling"): _op(
        "workers",
        "Evaluate the scaling rules",
        "Each rule evaluated now, with a recommendation.",
        _ok(
            200,
            obj({"data": {"type": "array", "items": _LOOSE}, "evaluated_at": {"type": "number"}}),
            "rules",
        )
        | _fail(503),
    ),
    # webhooks
    **{
        (method, path): _hook(method, sync)
        for path, sync in (
            ("/api/v1/webhooks/{flow_id}", False),
            ("/api/v1/webhooks/{flow_id}/sync", True),
        )
        for method in ("get", "post")
    },
    # this document, the docs page, probes
    ("get", "/api/v1/openapi.json"): _op(
        "docs",
        "This API's OpenAPI document",
        "The document this page renders, behind the API key (/api/docs/openapi.json is the "
        "page's public copy).",
        _ok(200, _LOOSE, "OpenAPI 3.0.3"),
    ),
    ("get", "/api/docs"): _op(
        "docs",
        "Interactive API docs (this page)",
        "Swagger UI served from the package (no CDN). Authorize with the API key to try "
        "the operations.",
        {200: {"description": "HTML", "content": {"text/html": {"schema": STR}}}},
        public=True,
    ),
    ("get", "/api/docs/openapi.json"): _op(
        "docs",
        "The OpenAPI document, public",
        "The same document as /api/v1/openapi.json, without the API key: it describes "
        "routes, not data.",
        _ok(200, _LOOSE, "OpenAPI 3.0.3"),
        public=True,
    ),
    ("get", "/api/docs/assets/{name}"): _op(
        "docs",
        "A file of the docs page",
        "The viewer's script and stylesheet, its start-up script and icon.",
        {200: {"description": "the file"}} | _fail(e404="no such file"),
        public=True,
    ),
    ("get", "/healthz"): _op(
        "probes",
        "Liveness probe",
        "200 while the process is alive.",
        _ok(200, obj({"status": STR}), "alive"),
        public=True,
    ),
    ("get", "/readyz"): _op(
        "probes",
        "Readiness probe",
        "200 when Redis, PostgreSQL, the migrations and the sandbox are all fine; 503 "
        "otherwise, with each check's result.",
        _ok(200, obj({"status": STR, "checks": _LOOSE}), "ready")
        | {503: _json(obj({"status": STR, "checks": _LOOSE}), "starting or not ready")},
        public=True,
    ),
    ("get", "/metrics"): _op(
        "probes",
        "Prometheus metrics",
        "This process's metrics (every process's in multiprocess mode) and the queues'.",
        {
            200: {
                "description": "Prometheus text format",
                "content": {"text/plain": {"schema": STR}},
            }
        },
        public=True,
    ),
}

_TAGS: Final = [
    {"name": "flows", "description": "Create, version, enable and run flows (docs/flows.md)"},
    {"name": "runs", "description": "Runs and their step logs; retry and cancel"},
    {"name": "webhooks", "description": "Public trigger URLs of each flow (no API key)"},
    {"name": "secrets", "description": "Encrypted values flows read as {{secrets.NAME}}"},
    {"name": "queues", "description": "Queue stats, jobs and dead letters"},
    {"name": "workers", "description": "Worker processes and scaling advice"},
    {"name": "docs", "description": "This page and its document"},
    {"name": "probes", "description": "Health, readiness and metrics"},
]


# --------------------------------------------------------------------------- the document
def is_board(path: str) -> bool:
    """True for the board's routes (``/admin`` and below), which the document leaves out."""
    return path == BOARD_PREFIX or path.startswith(BOARD_PREFIX + "/")


def route_path(route: web.AbstractRoute) -> str | None:
    """The route's path as OpenAPI writes it (``{name}`` without a regex), or ``None``."""
    info = route.resource.get_info() if route.resource else {}
    path = info.get("path") or info.get("formatter")
    if path is None and "prefix" in info:
        path = info["prefix"] + "/{filename}"
    return _PARAM.sub(r"{\1}", path) if path else None


def documented_routes(app: web.Application) -> list[tuple[web.AbstractRoute, str]]:
    """The routes the document covers, with their paths: not HEAD, not the board, not a
    trailing-slash alias of a route with the same handler."""
    routes = [
        (route, path)
        for route in app.router.routes()
        if route.method != "HEAD" and (path := route_path(route)) and not is_board(path)
    ]
    handlers = {(path, route.handler) for route, path in routes}
    return [
        (route, path)
        for route, path in routes
        if not (path.endswith("/") and len(path) > 1 and (path[:-1], route.handler) in handlers)
    ]


def _slug(path: str) -> str:
    """``/api/v1/flows/{id}/run`` → ``api_v1_flows_id_run``."""
    return re.sub(r"[^A-Za-z0-9]+", "_", path).strip("_") or "root"


def build_spec(app: web.Application) -> dict[str, Any]:
    """The OpenAPI document of ``app``'s routes."""
    paths: dict[str, dict[str, Any]] = {}
    for route, path in documented_routes(app):
        if route.method == "*":
            methods = [m for m in _ANY_METHOD if (m, path) in OPERATIONS] or list(_ANY_METHOD)
        else:
            methods = [route.method.lower()]
        for method in methods:
            op = OPERATIONS.get((method, path))
            if op is None:  # undocumented: tests/api/test_openapi.py fails on it
                name = route.handler.__name__
                op = {"summary": name, "responses": {"default": {"description": "JSON"}}}
            op = {"operationId": f"{method}_{_slug(path)}", **op}
            names = _PARAM.findall(path)
            if names:
                params = [_path_param(path, n) for n in names]
                op["parameters"] = params + op.get("parameters", [])
            paths.setdefault(path, {})[method] = op
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "Conveyor",
            "version": __version__,
            "description": "Workflow engine API. Every /api/v1 route except the webhooks "
            "needs `Authorization: Bearer <AP_API_KEY>` when AP_API_KEY is set (Authorize "
            'button). Errors are JSON: {"error": {"code", "message", "details"?}}. '
            "The flow format is described in docs/flows.md.",
        },
        "tags": _TAGS,
        "paths": dict(sorted(paths.items())),
        "components": {
            "securitySchemes": {
                SCHEME: {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "the server's AP_API_KEY, sent as `Authorization: Bearer <key>`",
                }
            },
            "schemas": {**FLOW_SCHEMAS, **API_SCHEMAS},
            "parameters": _PARAMETERS,
            "responses": {f"E{s}": _error(s, d) for s, d in _ERRORS.items()},
        },
    }


async def openapi(request: web.Request) -> web.Response:
    """The OpenAPI document of this API."""
    return json_response(build_spec(request.app))
