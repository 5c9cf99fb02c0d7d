"""The application's one middleware: every request timed by route template, its errors
rendered as JSON, ``/api/v1`` guarded by the API key.

:func:`api_middleware` does, in one coroutine frame, what three stacked middlewares did
(timing outermost, then the error mapping of :mod:`conveyor.api.errors`, then the API key of
:mod:`conveyor.api.auth`): every webhook passes through it, and each middleware aiohttp stacks
costs a coroutine and a ``functools.partial`` call per request. The metrics go into the
histograms and counters declared in :mod:`conveyor.metrics` (which stays free of aiohttp, so
services can record into it without seeing an application).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from conveyor import metrics
from conveyor.api.auth import check_api_key, expected_header, protected
from conveyor.api.errors import http_error

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _route(request: web.Request) -> str:
    route = request.match_info.route
    resource = route.resource if route is not None else None
    return resource.canonical if resource is not None else "<unmatched>"


def api_middleware(api_key: str | None) -> Middleware:
    """The middleware for an application whose API key is ``api_key`` (``None``: no auth).

    In order: start the timer; refuse a guarded path without the key (401); run the handler;
    turn any error of 400 or more into its JSON answer (:func:`~conveyor.api.errors.http_error`;
    redirects pass through); record the status and duration by route template.
    """
    expected = expected_header(api_key)
    perf_counter = time.perf_counter

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        start = perf_counter()
        status = 500
        try:
            try:
                if expected is not None and protected(request.path):
                    check_api_key(request, expected)
                response = await handler(request)
            except web.HTTPException as exc:
                if exc.status < 400:
                    status = exc.status
                    raise
                response = http_error(exc).response()
            except Exception as exc:
                response = http_error(exc, where=f"{request.method} {request.path}").response()
            status = response.status
            return response
        finally:
            record(request, status, perf_counter() - start)

    return middleware


def record(request: web.Request, status: int, elapsed: float) -> None:
    """Count one answered request by route template (never the raw URL: bounded labels)."""
    timer, counter, rejected = _children(_route(request), request.method, status)
    timer.observe(elapsed)
    counter.inc()
    if rejected is not None:
        rejected.inc()
    if not request.path.startswith(metrics.UNTIMED_PREFIXES):
        metrics.API_WINDOW.add(elapsed, status >= 500)


_Children = tuple[Any, Any, Any]
_CHILDREN: dict[tuple[str, str, int], _Children] = {}


def _children(route: str, method: str, status: int) -> _Children:
    """The labelled metric children of one (route, method, status), looked up once: the
    middleware runs on every webhook, so it avoids ``labels()`` on the hot path."""
    key = (route, method, status)
    found = _CHILDREN.get(key)
    if found is None:
        reason = (
            metrics.REJECT_REASONS.get(status) if route.startswith("/api/v1/webhooks/") else None
        )
        found = (
            metrics.tally(metrics.HTTP_DURATION.labels(route, method)),
            metrics.tally(metrics.HTTP_TOTAL.labels(route, method, str(status))),
            metrics.WEBHOOKS_REJECTED.labels(reason) if reason else None,
        )
        if len(_CHILDREN) < 10_000:  # bounded: routes are templates, methods and statuses few
            _CHILDREN[key] = found
    return found
