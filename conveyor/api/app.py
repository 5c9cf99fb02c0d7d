"""``create_app(settings)``: the whole aiohttp application of one process, by role.

One application serves every role. ``WORKER_AND_APP`` and ``APP`` get the API (and the board);
``WORKER`` gets only ``/healthz``, ``/readyz`` and ``/metrics`` on ``AP_METRICS_PORT``. The
resources a role needs (PostgreSQL, Redis, the queue producer, reply channel, workers) are
``cleanup_ctx`` generators, so start-up happens in the order listed and shutdown in reverse:
the listener closes first, then the workers drain, then the pools close.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import structlog
from aiohttp import web

from conveyor import metrics
from conveyor.api import docs, flows, openapi, runs, secrets, webhooks
from conveyor.api.admin import add_admin_routes
from conveyor.api.auth import api_key_middleware
from conveyor.api.errors import error_middleware
from conveyor.api.health import healthz, readyz
from conveyor.api.keys import (
    DB,
    PRODUCER,
    REDIS,
    REGISTRY,
    REPLIES,
    RUN_WRITER,
    SECRET_BOX,
    SETTINGS,
    STATE,
    ProcessState,
)
from conveyor.api.replies import ReplyHub
from conveyor.board import setup_board
from conveyor.connections import create_redis
from conveyor.engine.registry import FlowRegistry
from conveyor.engine.worker import worker_ctx
from conveyor.heartbeat import heartbeat_ctx
from conveyor.queue import Producer, QueueConfig
from conveyor.settings import Settings
from conveyor.store.db import Database
from conveyor.store.migrations import migrate
from conveyor.store.runs import RunWriter
from conveyor.store.secrets import SecretBox

log = structlog.get_logger(__name__)

#: A cleanup context that adds a role's long-running service (workers, scheduler …).
ServiceFactory = Callable[[web.Application], AsyncIterator[None]]


async def postgres_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    db = await Database.from_settings(settings)
    async with db.writer() as conn:
        applied = await migrate(conn)
    if applied:
        log.info("migrations applied", versions=[m.version for m in applied])
    app[DB] = db
    app[RUN_WRITER] = RunWriter(db)
    app[REGISTRY] = FlowRegistry(db, max_versions=settings.pieces_cache_max_entries)
    if not settings.encryption_key:
        raise RuntimeError("AP_ENCRYPTION_KEY missing after start-up")
    app[SECRET_BOX] = SecretBox(settings.encryption_key)
    yield
    await app[RUN_WRITER].close()
    await db.close()


async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
    client = create_redis(app[SETTINGS])
    app[REDIS] = client
    app[PRODUCER] = Producer(client, QueueConfig.from_settings(app[SETTINGS]))
    yield
    await app[PRODUCER].close()
    await client.aclose()


async def replies_ctx(app: web.Application) -> AsyncIterator[None]:
    hub = ReplyHub(app[REDIS], app[SETTINGS].redis_key_prefix)
    await hub.start()
    app[REPLIES] = hub
    yield
    await hub.close()


async def started_ctx(app: web.Application) -> AsyncIterator[None]:
    """Last in the list: everything before it is up, so the process is ready."""
    app[STATE].started = True
    log.info("conveyor started")
    yield
    app[STATE].started = False


def add_api_routes(app: web.Application) -> None:
    r = app.router
    for path in ("/api/v1/webhooks/{flow_id}", "/api/v1/webhooks/{flow_id}/"):
        r.add_route("*", path, webhooks.webhook_async)
    r.add_route("*", "/api/v1/webhooks/{flow_id}/sync", webhooks.webhook_sync)
    r.add_post("/api/v1/flows", flows.create_flow)
    r.add_get("/api/v1/flows", flows.list_flows)
    r.add_get("/api/v1/flows/{id}", flows.get_flow)
    r.add_put("/api/v1/flows/{id}", flows.update_flow)
    r.add_delete("/api/v1/flows/{id}", flows.delete_flow)
    r.add_post("/api/v1/flows/{id}/enable", flows.enable_flow)
    r.add_post("/api/v1/flows/{id}/disable", flows.disable_flow)
    r.add_post("/api/v1/flows/{id}/run", flows.run_flow)
    r.add_get("/api/v1/secrets", secrets.list_secrets)
    r.add_put("/api/v1/secrets/{name}", secrets.put_secret)
    r.add_delete("/api/v1/secrets/{name}", secrets.delete_secret)
    r.add_get("/api/v1/flow-runs", runs.list_runs)
    r.add_get("/api/v1/flow-runs/{id}", runs.get_run)
    r.add_post("/api/v1/flow-runs/{id}/retry", runs.retry_run)
    r.add_post("/api/v1/flow-runs/{id}/cancel", runs.cancel_run)
    r.add_get("/api/v1/openapi.json", openapi.openapi)
    docs.add_docs_routes(r)


def create_app(
    settings: Settings, services: dict[str, ServiceFactory] | None = None
) -> web.Application:
    """The application for ``settings.container_type``; ``services`` are extra cleanup
    contexts (by name) the worker role plugs in after the shared resources."""
    app = web.Application(
        middlewares=[metrics.http_metrics_middleware, error_middleware, api_key_middleware],
        client_max_size=settings.max_webhook_payload_bytes,
    )
    app[SETTINGS] = settings
    app[STATE] = ProcessState()
    app.cleanup_ctx.append(postgres_ctx)
    app.cleanup_ctx.append(redis_ctx)
    app.cleanup_ctx.append(metrics.metrics_ctx)
    if settings.container_type.runs_app:
        app.cleanup_ctx.append(replies_ctx)
        add_api_routes(app)
        add_admin_routes(app)
        if settings.queue_ui_enabled:
            setup_board(app)
    if settings.container_type.runs_worker:
        app.cleanup_ctx.append(worker_ctx)
        app.cleanup_ctx.append(heartbeat_ctx)
    for factory in (services or {}).values():
        app.cleanup_ctx.append(factory)
    app.cleanup_ctx.append(started_ctx)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics.metrics_handler)
    return app
