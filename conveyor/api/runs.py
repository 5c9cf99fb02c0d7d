"""``/api/v1/flow-runs``: list (filters, cursor paging), detail with the step log, retry, cancel."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from aiohttp import web

from conveyor.api.errors import ApiError, json_response
from conveyor.api.flows import page_args
from conveyor.errors import NotFound
from conveyor.keys import operations_of
from conveyor.records import RunView, StepRecord
from conveyor.status import RunStatus
from conveyor.store import runs as run_store


def run_json(row: Mapping[str, Any], steps: Sequence[StepRecord] | None = None) -> dict[str, Any]:
    """The API's JSON object of a run row (with its step log when ``steps`` is given)."""
    return RunView.of(row, steps).to_json()


def _run_id(request: web.Request) -> uuid.UUID:
    try:
        return uuid.UUID(request.match_info["id"])
    except ValueError:
        raise NotFound("no such run") from None


async def list_runs(request: web.Request) -> web.Response:
    limit, cursor = page_args(request)
    flow_id = None
    if raw := request.query.get("flow_id"):
        try:
            flow_id = uuid.UUID(raw)
        except ValueError:
            raise ApiError(400, "BAD_REQUEST", "flow_id is not a valid id") from None
    status = request.query.get("status")
    if status is not None and status not in RunStatus.__members__:
        allowed = ", ".join(RunStatus.__members__)
        raise ApiError(400, "BAD_REQUEST", f"status must be one of {allowed}")
    rows = await run_store.list_runs(
        operations_of(request).db, flow_id=flow_id, status=status, limit=limit + 1, cursor=cursor
    )
    page = rows[:limit]
    next_cursor = str(page[-1]["id"]) if len(rows) > limit else None
    return json_response({"data": [run_json(r) for r in page], "next_cursor": next_cursor})


async def get_run(request: web.Request) -> web.Response:
    run_id = _run_id(request)
    db = operations_of(request).db
    row = await run_store.get_run(db, run_id)
    steps = await run_store.get_steps(db, run_id)
    return json_response(run_json(row, steps))


async def retry_run(request: web.Request) -> web.Response:
    """Retry a finished run: FROM_FAILED_STEP keeps the steps before the failed one (same
    version), ON_LATEST_VERSION starts over on the flow's current version."""
    run_id = _run_id(request)
    raw = await request.read()
    try:
        body = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError:
        raise ApiError(400, "BAD_REQUEST", "body must be JSON") from None
    if not isinstance(body, dict | None):
        raise ApiError(400, "BAD_REQUEST", 'body must be a JSON object {"strategy": ...}')
    strategy = (body or {}).get("strategy", "FROM_FAILED_STEP")
    row = await operations_of(request).retry_run(run_id, str(strategy))
    return json_response(run_json(row), status=202)


async def cancel_run(request: web.Request) -> web.Response:
    """Cancel a queued, running or paused run."""
    row = await operations_of(request).cancel_run(_run_id(request))
    return json_response(run_json(row))
