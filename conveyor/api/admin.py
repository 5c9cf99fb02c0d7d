"""Queue admin, worker registry and scaling advice: ``/api/v1/queues…``, ``/workers``, ``/scaling``.

The handlers parse and validate requests, call the process's
:class:`~conveyor.operations.Operations` (the same service the board calls, so the API and
the board cannot disagree) and shape JSON. The request parsers at the top are shared with the
board's actions.
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from conveyor.api.errors import ApiError, json_response
from conveyor.api.flows import limit_arg
from conveyor.keys import operations_of
from conveyor.operations import check_queue
from conveyor.queue import JobState, QueueAdmin

STATES = tuple(s.value for s in JobState)
#: Cleanable states (active jobs are some worker's work in progress).
CLEANABLE = tuple(s for s in STATES if s != JobState.ACTIVE.value)


# --------------------------------------------------------------------------- request parsing
def queue_name(request: web.Request) -> str:
    """The ``{q}`` path parameter; ``UnknownQueue`` (404) unless it names a queue."""
    return check_queue(request.match_info["q"])


def job_state(raw: str | None, *, allowed: tuple[str, ...] = STATES) -> str:
    """A job state, 400 unless it is one of ``allowed``."""
    state = raw or JobState.WAITING.value
    if state not in allowed:
        raise ApiError(400, "BAD_REQUEST", f"state must be one of {', '.join(allowed)}")
    return state


async def list_jobs_page(
    admin: QueueAdmin, queue: str, state: str, limit: int, cursor: str | None
) -> tuple[list[dict[str, Any]], str | None]:
    """One page of jobs as JSON dicts; 400 on a malformed cursor."""
    if cursor and not cursor.partition(":")[0].isdigit():
        raise ApiError(400, "BAD_REQUEST", "cursor is not a cursor this API returned")
    try:
        jobs, next_cursor = await admin.list_jobs(queue, state, limit=limit, cursor=cursor)
    except ValueError:
        raise ApiError(400, "BAD_REQUEST", "cursor is not a cursor this API returned") from None
    return [j.to_dict() for j in jobs], next_cursor


def older_than(raw: Any) -> float:
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ApiError(400, "BAD_REQUEST", "older_than_s must be a number of seconds") from None
    if not 0 <= value < 1e9:
        raise ApiError(400, "BAD_REQUEST", "older_than_s must be 0 or more")
    return value


async def _json_body(request: web.Request) -> dict[str, Any]:
    if not await request.read():
        return {}
    try:
        body = await request.json()
    except (ValueError, RecursionError):  # json.loads recurses: a deep body is not JSON to us
        raise ApiError(400, "BAD_REQUEST", "body must be JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "BAD_REQUEST", "body must be a JSON object")
    return body


# --------------------------------------------------------------------------- handlers
async def list_queues(request: web.Request) -> web.Response:
    """Stats of every queue: waiting, active, delayed, dead, consumers, waits, throughput."""
    stats = await operations_of(request).queues.all_stats()
    return json_response({"data": [s.to_dict() for s in stats]})


async def get_queue(request: web.Request) -> web.Response:
    """Stats of one queue plus its 10-second history (oldest first)."""
    q = queue_name(request)
    admin = operations_of(request).queues
    stats = await admin.stats(q)
    return json_response({**stats.to_dict(), "history": await admin.history(q)})


async def list_queue_jobs(request: web.Request) -> web.Response:
    """One page of a queue's jobs in ``state`` (waiting|active|delayed|failed|completed)."""
    q = queue_name(request)
    state = job_state(request.query.get("state"))
    limit = limit_arg(request)
    data, cursor = await list_jobs_page(
        operations_of(request).queues, q, state, limit, request.query.get("cursor") or None
    )
    return json_response({"data": data, "next_cursor": cursor})


async def pause_queue(request: web.Request) -> web.Response:
    """Stop deliveries of the queue on every worker."""
    q = queue_name(request)
    await operations_of(request).queues.pause(q)
    return json_response({"queue": q, "paused": True})


async def resume_queue(request: web.Request) -> web.Response:
    """Resume deliveries of a paused queue."""
    q = queue_name(request)
    await operations_of(request).queues.resume(q)
    return json_response({"queue": q, "paused": False})


async def clean_queue(request: web.Request) -> web.Response:
    """Delete jobs in ``state`` older than ``older_than_s`` seconds: ``{"removed"}``."""
    q = queue_name(request)
    body = await _json_body(request)
    state = job_state(body.get("state"), allowed=CLEANABLE) if body.get("state") else None
    if state is None:
        raise ApiError(400, "BAD_REQUEST", f"state is required: one of {', '.join(CLEANABLE)}")
    age = older_than(body.get("older_than_s", 0))
    removed = await operations_of(request).queues.clean(q, state, age)
    return json_response({"queue": q, "state": state, "removed": removed})


async def retry_queue_job(request: web.Request) -> web.Response:
    """Put a dead-lettered (failed) job back on its queue."""
    q = queue_name(request)
    job_id = request.match_info["id"]
    entry = await operations_of(request).retry_dead_job(q, job_id)
    return json_response({"queue": q, "id": job_id, "entry_id": entry, "state": "waiting"})


async def retry_all_queue_jobs(request: web.Request) -> web.Response:
    """Put every dead-lettered job of the queue back: ``{"retried"}``."""
    q = queue_name(request)
    retried = await operations_of(request).retry_all_dead(q)
    return json_response({"queue": q, "retried": retried})


async def delete_queue_job(request: web.Request) -> web.Response:
    """Remove a waiting, delayed, failed (or active) job from the queue."""
    q = queue_name(request)
    job_id = request.match_info["id"]
    where = await operations_of(request).delete_job(q, job_id)
    return json_response({"queue": q, "id": job_id, "deleted_from": where.value})


async def list_workers(request: web.Request) -> web.Response:
    """Live worker processes (``?include_lost=true`` adds those whose heartbeat stopped)."""
    include_lost = request.query.get("include_lost", "false").lower() in ("1", "true", "yes")
    workers = await operations_of(request).workers(include_lost=include_lost)
    return json_response({"data": workers})


async def scaling(request: web.Request) -> web.Response:
    """The seed's scaling rules evaluated now, each with a recommendation."""
    rules = await operations_of(request).scaling_report()
    return json_response({"data": rules, "evaluated_at": round(time.time(), 3)})


def add_admin_routes(app: web.Application) -> None:
    """Register the queue, worker and scaling routes (called by ``create_app``)."""
    r = app.router
    r.add_get("/api/v1/queues", list_queues)
    r.add_get("/api/v1/queues/{q}", get_queue)
    r.add_get("/api/v1/queues/{q}/jobs", list_queue_jobs)
    r.add_post("/api/v1/queues/{q}/pause", pause_queue)
    r.add_post("/api/v1/queues/{q}/resume", resume_queue)
    r.add_post("/api/v1/queues/{q}/clean", clean_queue)
    r.add_post("/api/v1/queues/{q}/retry-all", retry_all_queue_jobs)
    r.add_post("/api/v1/queues/{q}/jobs/{id}/retry", retry_queue_job)
    r.add_delete("/api/v1/queues/{q}/jobs/{id}", delete_queue_job)
    r.add_get("/api/v1/workers", list_workers)
    r.add_get("/api/v1/scaling", scaling)
