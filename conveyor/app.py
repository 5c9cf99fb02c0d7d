"""The composition root: ``create_app(settings)`` builds one process's services, by role.

One application serves every role. ``WORKER_AND_APP`` and ``APP`` get the API (and the board);
``WORKER`` gets only ``/healthz``, ``/readyz`` and ``/metrics`` on ``AP_METRICS_PORT``. The
resources a role needs (PostgreSQL, Redis, the queue producer, the run submitter, the reply
channel, workers) are ``cleanup_ctx`` generators, so start-up happens in the order listed and
shutdown in reverse: the listener closes first, then the workers drain, then the pools close.

This is the only module that knows every layer. The services (``operations``, ``engine``,
``store``, ``queue``, ``sandbox``) take their dependencies as arguments; ``api/`` and
``board/`` are HTTP adapters reading what is built here through the keys of
:mod:`conveyor.keys`. See docs/architecture.md, "Shape and data path".
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web

from conveyor import heartbeat, metrics
from conveyor.api.admin import add_admin_routes
from conveyor.api.app import add_api_routes
from conveyor.api.health import METRICS_STATE, healthz, metrics_handler, readyz, refresh_process
from conveyor.api.timing import api_middleware
from conveyor.board import setup_board
from conveyor.connections import create_redis
from conveyor.engine.intake import WebhookIntake
from conveyor.engine.registry import FlowRegistry
from conveyor.engine.replies import ReplyHub
from conveyor.engine.submit import Submitter
from conveyor.engine.worker import tune_gc, worker_role
from conveyor.heartbeat import heartbeat_ctx
from conveyor.keys import (
    DB,
    INTAKE,
    OPERATIONS,
    PRODUCER,
    REDIS,
    REGISTRY,
    REPLIES,
    RUN_WRITER,
    SANDBOX_REPORT,
    SECRET_BOX,
    SETTINGS,
    STATE,
    SUBMITTER,
    WORKER,
    ProcessState,
)
from conveyor.operations import Operations, WorkerReader
from conveyor.queue import Producer, QueueAdmin, QueueConfig, Sampler
from conveyor.settings import Settings
from conveyor.store.db import Database
from conveyor.store.migrations import migrate
from conveyor.store.runs import RunWriter
from conveyor.store.secrets import SecretBox

log = structlog.get_logger(__name__)

#: A cleanup context that adds a role's long-running service (workers, scheduler …).
ServiceFactory = Callable[[web.Application], AsyncIterator[None]]
#: Per-process gauges (busy slots, pools) are refreshed this often between scrapes.
PROCESS_REFRESH_S = metrics.PROCESS_REFRESH_S


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


def _worker_reader(redis: Any, prefix: str) -> WorkerReader:
    def read(*, include_lost: bool) -> Awaitable[list[dict[str, Any]]]:
        return heartbeat.list_workers(redis, include_lost=include_lost, prefix=prefix)

    return read


async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    client = create_redis(settings)
    config = QueueConfig.from_settings(settings)
    app[REDIS] = client
    app[PRODUCER] = Producer(client, config)
    app[SUBMITTER] = Submitter(app[RUN_WRITER], app[PRODUCER])
    app[OPERATIONS] = Operations(
        app[DB],
        writer=app[RUN_WRITER],
        submitter=app[SUBMITTER],
        registry=app[REGISTRY],
        queues=QueueAdmin(client, config),
        workers=_worker_reader(client, settings.redis_key_prefix),
    )
    yield
    await app[PRODUCER].close()
    await client.aclose()


async def metrics_ctx(app: web.Application) -> AsyncIterator[None]:
    """Every role: the board's queue-history sampler and the per-process gauges."""
    app[METRICS_STATE] = metrics.RefreshState()
    sampler = Sampler(app[REDIS], QueueConfig.from_settings(app[SETTINGS]))
    await sampler.start()

    async def loop() -> None:
        while True:
            with contextlib.suppress(Exception):
                refresh_process(app)
            await asyncio.sleep(PROCESS_REFRESH_S)

    task = asyncio.get_running_loop().create_task(loop())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await sampler.close()


async def replies_ctx(app: web.Application) -> AsyncIterator[None]:
    """API roles: the sync webhooks' reply channel and the webhook intake built on it."""
    hub = ReplyHub(app[REDIS], app[SETTINGS].redis_key_prefix)
    await hub.start()
    app[REPLIES] = hub
    app[INTAKE] = WebhookIntake(
        app[SETTINGS],
        app[DB],
        redis=app[REDIS],
        registry=app[REGISTRY],
        submitter=app[SUBMITTER],
        replies=hub,
        writer=app[RUN_WRITER],
        secret_box=app[SECRET_BOX],
    )
    yield
    await hub.close()


async def worker_ctx(app: web.Application) -> AsyncIterator[None]:
    """The worker role: sandbox, HTTP session, consumer, reconciler, scheduler."""
    async with worker_role(
        app[SETTINGS],
        writer=app[RUN_WRITER],
        registry=app[REGISTRY],
        box=app[SECRET_BOX],
        redis=app[REDIS],
    ) as (worker, sandbox_report):
        app[WORKER] = worker
        app[SANDBOX_REPORT] = sandbox_report
        yield


async def started_ctx(app: web.Application) -> AsyncIterator[None]:
    """Last in the list: everything before it is up, so the process is ready. The garbage
    collector is tuned here for every role, not only those that execute runs: an API process
    allocates a few dozen short-lived containers per webhook too (in-process ingest harness,
    real insert and enqueue: 204 → 173 µs CPU per webhook)."""
    tune_gc()
    app[STATE].started = True
    log.info("conveyor started")
    yield
    app[STATE].started = False


def create_app(
    settings: Settings, services: dict[str, ServiceFactory] | None = None
) -> web.Application:
    """The application for ``settings.container_type``; ``services`` are extra cleanup
    contexts (by name) the worker role plugs in after the shared resources."""
    app = web.Application(
        # One middleware: timing, JSON errors and the API key (conveyor/api/timing.py).
        middlewares=[api_middleware(settings.api_key)],
        client_max_size=settings.max_webhook_payload_bytes,
    )
    app[SETTINGS] = settings
    app[STATE] = ProcessState()
    app.cleanup_ctx.append(postgres_ctx)
    app.cleanup_ctx.append(redis_ctx)
    app.cleanup_ctx.append(metrics_ctx)
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
    app.router.add_get("/metrics", metrics_handler)
    return app
