"""``/healthz`` (the process is alive), ``/readyz`` (it can do its job right now), ``/metrics``.

Readiness checks what a request needs: Redis answers ``PING``, PostgreSQL answers a query,
every shipped migration is applied, and the sandbox can start step processes (it also says
which isolation and which limit mechanism are in use). Any failed check makes it 503 so a
load balancer routes around the process.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import structlog
from aiohttp import web

from conveyor import metrics
from conveyor.api.errors import json_response
from conveyor.keys import DB, REDIS, SANDBOX_REPORT, SETTINGS, STATE, WORKER
from conveyor.queue import QueueAdmin, QueueConfig
from conveyor.store.migrations import available, pending

log = structlog.get_logger(__name__)

CHECK_TIMEOUT_S = 2.0
#: Per-application throttle of the queue-gauge reading (set by :func:`metrics_handler`).
METRICS_STATE = web.AppKey("metrics_state", metrics.RefreshState)


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def _check_redis(app: web.Application) -> dict[str, Any]:
    await asyncio.wait_for(app[REDIS].ping(), CHECK_TIMEOUT_S)
    return {"ok": True}


async def _check_postgres(app: web.Application) -> dict[str, Any]:
    async with app[DB].writer() as conn:
        await asyncio.wait_for(conn.fetchval("SELECT 1"), CHECK_TIMEOUT_S)
    return {"ok": True}


async def _check_migrations(app: web.Application) -> dict[str, Any]:
    async with app[DB].writer() as conn:
        todo = await asyncio.wait_for(pending(conn), CHECK_TIMEOUT_S)
    latest = available()[-1].version
    if todo:
        return {"ok": False, "error": f"{len(todo)} pending", "latest": latest}
    return {"ok": True, "latest": latest}


async def readyz(request: web.Request) -> web.Response:
    app = request.app
    if not app[STATE].started:
        return json_response({"status": "starting", "checks": {}}, status=503)
    checks: dict[str, Any] = {}
    for name, check in (
        ("redis", _check_redis),
        ("postgres", _check_postgres),
        ("migrations", _check_migrations),
    ):
        try:
            checks[name] = await check(app)
        except Exception as exc:
            checks[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
    # The worker's sandbox keeps this dict current: isolation mode, limit mechanism, and
    # "ok" False while its fork-server is down or its capacity (uids) is exhausted.
    sandbox = app.get(SANDBOX_REPORT)
    checks["sandbox"] = (
        dict(sandbox)
        if sandbox
        else {"ok": True, "isolation": "none", "mechanism": "no code steps run here"}
    )
    ready = all(c.get("ok", True) for c in checks.values())
    return json_response(
        {"status": "ready" if ready else "not_ready", "checks": checks},
        status=200 if ready else 503,
    )


async def refresh_queues(app: web.Application) -> None:
    """Set the queue gauges (and the server-wide DB gauges) from fresh readings."""
    state = app.get(METRICS_STATE)
    if state is None:
        return
    async with state.lock:
        if not state.due():
            return
        admin = QueueAdmin(app[REDIS], QueueConfig.from_settings(app[SETTINGS]))
        stats = await admin.all_stats()
        active, limit = await app[DB].server_connections()
        metrics.set_queue_gauges(stats, active, limit)
        state.queues_at = time.monotonic()


def refresh_process(app: web.Application) -> None:
    """Set this process's gauges: worker slots, sandbox report and connection pool."""
    worker = app.get(WORKER)
    db = app.get(DB)
    metrics.set_process_gauges(
        getattr(worker, "consumer", None),
        app.get(SANDBOX_REPORT),
        db.pool_stats() if db is not None else None,
    )


async def metrics_handler(request: web.Request) -> web.Response:
    """Prometheus metrics of this process (of every process in multiprocess mode)."""
    app = request.app
    refresh_process(app)
    try:
        await asyncio.wait_for(refresh_queues(app), 2.0)
    except Exception as exc:
        # A scrape still answers with the last values when Redis or PostgreSQL is away.
        log.warning("metrics.refresh_failed", error=repr(exc))
    return web.Response(body=metrics.exposition(), headers={"Content-Type": metrics.CONTENT_TYPE})
