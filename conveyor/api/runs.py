"""``/api/v1/flow-runs``: list (filters, cursor paging), detail with the step log, retry, cancel."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import orjson
from aiohttp import web

from conveyor.api import operations
from conveyor.api.errors import ApiError, json_response
from conveyor.api.flows import page_args
from conveyor.api.keys import DB
from conveyor.engine.status import RunStatus
from conveyor.store import runs as run_store


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def run_json(row: dict[str, Any], steps: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    started, finished = row.get("started_at"), row.get("finished_at")
    duration = (finished - started).total_seconds() * 1000 if started and finished else None
    out = {
        "id": str(row["id"]),
        "flow_id": str(row["flow_id"]),
        "flow_version": row["flow_version"],
        "status": row["status"],
        "trigger": row["trigger"],
        "output": row["output"],
        "error": row["error"],
        "attempt": row["attempt"],
        "created_at": _iso(row["created_at"]),
        "started_at": _iso(started),
        "finished_at": _iso(finished),
        "duration_ms": round(duration, 3) if duration is not None else None,
    }
    if steps is not None:
        out["steps"] = [
            {
                "name": s["name"],
                "type": s["type"],
                "status": s["status"],
                "input": s["input"],
                "output": s["output"],
                "error": s["error"],
                "logs": s["logs"],
                "started_at": _iso(s["started_at"]),
                "duration_ms": s["duration_ms"],
                "attempt": s["attempt"],
                "parent": s["parent"],
                "iteration": s["iteration"],
            }
            for s in steps
        ]
    return out


def _run_id(request: web.Request) -> uuid.UUID:
    try:
        return uuid.UUID(request.match_info["id"])
    except ValueError:
        raise ApiError(404, "NOT_FOUND", "no such run") from None


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
        request.app[DB], flow_id=flow_id, status=status, limit=limit + 1, cursor=cursor
    )
    page = rows[:limit]
    next_cursor = str(page[-1]["id"]) if len(rows) > limit else None
    return json_response({"data": [run_json(r) for r in page], "next_cursor": next_cursor})


async def get_run(request: web.Request) -> web.Response:
    run_id = _run_id(request)
    row = await run_store.get_run(request.app[DB], run_id)
    steps = await run_store.get_steps(request.app[DB], run_id)
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
    row = await operations.retry_run(request.app, run_id, str(strategy))
    return json_response(run_json(row), status=202)


async def cancel_run(request: web.Request) -> web.Response:
    """Cancel a queued, running or paused run."""
    row = await operations.cancel_run(request.app, _run_id(request))
    return json_response(run_json(row))
