"""The HTTP edge of the metrics: a middleware that times every request by route template
into the histograms and counters declared in :mod:`conveyor.metrics` (which stays free of
aiohttp, so services can record into it without seeing an application).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from conveyor import metrics


def _route(request: web.Request) -> str:
    route = request.match_info.route
    resource = route.resource if route is not None else None
    return resource.canonical if resource is not None else "<unmatched>"


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def http_metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Times every request by route template (never the raw URL: bounded label values)."""
    start = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        elapsed = time.perf_counter() - start
        route = _route(request)
        timer, counter, rejected = _children(route, request.method, status)
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
            metrics.HTTP_DURATION.labels(route, method),
            metrics.HTTP_TOTAL.labels(route, method, str(status)),
            metrics.WEBHOOKS_REJECTED.labels(reason) if reason else None,
        )
        if len(_CHILDREN) < 10_000:  # bounded: routes are templates, methods and statuses few
            _CHILDREN[key] = found
    return found
