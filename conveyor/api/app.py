"""``create_app(settings)``: the whole aiohttp application of one process, by role.

One application serves every role. ``WORKER_AND_APP`` and ``APP`` get the API (and the board);
``WORKER`` gets only ``/healthz``, ``/readyz`` and ``/metrics`` on ``AP_METRICS_PORT``. The
resources a role needs (PostgreSQL, Redis, the queue consumers) are ``cleanup_ctx`` generators,
so start-up and shutdown order is the order they are listed in, reversed on the way out.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web

from conveyor.api.errors import error_middleware
from conveyor.api.health import healthz, readyz
from conveyor.api.keys import DB, REDIS, SETTINGS, STARTED
from conveyor.connections import create_redis
from conveyor.settings import Settings
from conveyor.store.db import Database
from conveyor.store.migrations import migrate

log = structlog.get_logger(__name__)

#: A hook that adds a role's long-running service (queue consumer, scheduler …) to the app.
ServiceFactory = Callable[[web.Application], AsyncIterator[None]]


async def postgres_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    db = await Database.from_settings(settings)
    async with db.writer() as conn:
        applied = await migrate(conn)
    if applied:
        log.info("migrations applied", versions=[m.version for m in applied])
    app[DB] = db
    yield
    await db.close()


async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
    client = create_redis(app[SETTINGS])
    app[REDIS] = client
    yield
    await client.aclose()


async def started_ctx(app: web.Application) -> AsyncIterator[None]:
    """Last in the list: everything before it is up, so the process is ready."""
    app[STARTED] = True
    log.info("conveyor started")
    yield
    app[STARTED] = False


def create_app(
    settings: Settings, services: dict[str, ServiceFactory] | None = None
) -> web.Application:
    """The application for ``settings.container_type``; ``services`` are extra cleanup
    contexts (by name) that the worker role plugs in."""
    middlewares: list[Callable[..., Awaitable[Any]]] = [error_middleware]
    app = web.Application(
        middlewares=middlewares,
        client_max_size=settings.max_webhook_payload_bytes,
    )
    app[SETTINGS] = settings
    app[STARTED] = False
    app.cleanup_ctx.append(postgres_ctx)
    app.cleanup_ctx.append(redis_ctx)
    for factory in (services or {}).values():
        app.cleanup_ctx.append(factory)
    app.cleanup_ctx.append(started_ctx)

    app.router.add_get("/healthz", healthz, name="healthz")
    app.router.add_get("/readyz", readyz, name="readyz")
    return app
