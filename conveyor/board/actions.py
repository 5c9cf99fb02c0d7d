"""The board's actions: every one a POST (CSRF-checked by the guard) that calls the same admin
function as the API, then redirects back (303) with a one-shot flash message.

A refused action (a job already gone, a run still running) comes back as an error flash on
the page the operator was on, not as an error page; its words are the API's, from the one
mapping of the error tree (:func:`conveyor.api.errors.to_api_error`).
"""

from __future__ import annotations

import posixpath
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from multidict import MultiDictProxy

from conveyor.api import admin as ops
from conveyor.api.errors import ApiError, to_api_error
from conveyor.board.views import FLASH_COOKIE
from conveyor.errors import ConveyorError
from conveyor.keys import operations_of

Form = MultiDictProxy[Any]
Action = Callable[[web.Request, Form], Awaitable[str]]


def _back(request: web.Request, form: Form) -> str:
    """Where to go afterwards: the form's ``next`` if it is a board path, else the referrer's
    board page, else the overview (never another site: no open redirect). A candidate with a
    control character (aiohttp would refuse it in ``Location`` and drop the connection after
    the action ran) or whose normalised path leaves ``/admin/`` is skipped."""
    for candidate in (form.get("next"), request.headers.get("Referer")):
        if not isinstance(candidate, str) or not candidate:
            continue
        if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in candidate):
            continue
        parts = urllib.parse.urlsplit(candidate)
        if parts.netloc and parts.netloc != request.host:
            continue
        if parts.path.startswith("//") or "\\" in parts.path:
            continue
        path = posixpath.normpath(parts.path) if parts.path else ""
        if not path.startswith("/admin/") or path.startswith("//"):
            continue
        return path + (f"?{parts.query}" if parts.query else "")
    return "/admin/queues"


def _redirect(location: str, kind: str, message: str) -> web.Response:
    response = web.Response(status=303, headers={"Location": location})
    response.set_cookie(
        FLASH_COOKIE,
        urllib.parse.quote(f"{kind}|{message}"[:600]),
        path="/admin",
        httponly=True,
        samesite="Strict",
        max_age=60,
    )
    return response


def action(fn: Action) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Wrap ``fn`` (returns the success message) into a POST handler with redirect + flash."""

    async def handler(request: web.Request) -> web.StreamResponse:
        form = await request.post()
        back = _back(request, form)
        try:
            message = await fn(request, form)
        except ConveyorError as exc:
            # The API's status table decides the words (a 500 says only "internal error").
            return _redirect(back, "error", to_api_error(exc).message)
        return _redirect(back, "ok", message)

    handler.__doc__ = fn.__doc__
    handler.__name__ = fn.__name__
    return handler


def _uuid(request: web.Request) -> uuid.UUID:
    try:
        return uuid.UUID(request.match_info["id"])
    except ValueError:
        raise ApiError(404, "NOT_FOUND", "no such id") from None


@action
async def pause_queue(request: web.Request, form: Form) -> str:
    """Pause a queue."""
    q = ops.queue_name(request)
    await operations_of(request).queues.pause(q)
    return f"Queue {q} paused: workers take no new jobs from it."


@action
async def resume_queue(request: web.Request, form: Form) -> str:
    """Resume a queue."""
    q = ops.queue_name(request)
    await operations_of(request).queues.resume(q)
    return f"Queue {q} resumed."


@action
async def clean_queue(request: web.Request, form: Form) -> str:
    """Delete a queue's jobs in a state older than N seconds."""
    q = ops.queue_name(request)
    raw_state = form.get("state")
    state = ops.job_state(raw_state if isinstance(raw_state, str) else None, allowed=ops.CLEANABLE)
    age = ops.older_than(form.get("older_than_s") or 0)
    removed = await operations_of(request).queues.clean(q, state, age)
    return f"Removed {removed} {state} job(s) older than {age:g} s from {q}."


@action
async def retry_all(request: web.Request, form: Form) -> str:
    """Retry every dead-lettered job of a queue."""
    q = ops.queue_name(request)
    retried = await operations_of(request).retry_all_dead(q)
    return f"Put {retried} failed job(s) back on {q}."


@action
async def retry_job(request: web.Request, form: Form) -> str:
    """Retry one dead-lettered job."""
    q = ops.queue_name(request)
    job_id = request.match_info["id"]
    await operations_of(request).retry_dead_job(q, job_id)
    return f"Job {job_id} is back on {q}."


@action
async def delete_job(request: web.Request, form: Form) -> str:
    """Delete one job from a queue."""
    q = ops.queue_name(request)
    job_id = request.match_info["id"]
    where = await operations_of(request).delete_job(q, job_id)
    return f"Job {job_id} deleted ({where.value})."


@action
async def retry_run(request: web.Request, form: Form) -> str:
    """Retry a finished run (FROM_FAILED_STEP or ON_LATEST_VERSION)."""
    raw = form.get("strategy")
    strategy = raw if isinstance(raw, str) and raw else "FROM_FAILED_STEP"
    row = await operations_of(request).retry_run(_uuid(request), str(strategy))
    return f"Run retried ({strategy}, version {row['flow_version']}): now {row['status']}."


@action
async def cancel_run(request: web.Request, form: Form) -> str:
    """Cancel a queued, running or paused run."""
    await operations_of(request).cancel_run(_uuid(request))
    return "Run canceled."


@action
async def enable_flow(request: web.Request, form: Form) -> str:
    """Enable a flow."""
    flow = await operations_of(request).set_flow_enabled(_uuid(request), True)
    return f"Flow {flow.name} enabled."


@action
async def disable_flow(request: web.Request, form: Form) -> str:
    """Disable a flow: its webhooks answer 404 until enabled again."""
    flow = await operations_of(request).set_flow_enabled(_uuid(request), False)
    return f"Flow {flow.name} disabled."
