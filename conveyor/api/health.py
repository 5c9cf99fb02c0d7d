"""``/healthz`` (the process is alive) and ``/readyz`` (it can do its job right now).

Readiness checks what a request needs: Redis answers ``PING``, PostgreSQL answers a query,
every shipped migration is applied, and the sandbox can start step processes (it also says
which isolation and which limit mechanism are in use). Any failed check makes it 503 so a
load balancer routes around the process.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from conveyor.api.errors import json_response
from conveyor.api.keys import DB, REDIS, STATE
from conveyor.store.migrations import available, pending

CHECK_TIMEOUT_S = 2.0

#: Name of an app key a sandbox service sets to its isolation report.
SANDBOX_REPORT = web.AppKey("sandbox_report", dict)


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
