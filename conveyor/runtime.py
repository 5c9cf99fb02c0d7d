"""Process lifecycle: start the embedded servers, run the role's app, stop on a signal.

``run(settings)`` is what ``conveyor up`` calls. It starts whatever the settings leave embedded
(from the main thread: the servers' parent-death signal is bound to the thread that forks
them), installs uvloop, serves :func:`conveyor.app.create_app` until SIGINT or SIGTERM, then
shuts down in reverse order — the listener stops accepting, in-flight requests and runs drain,
pools close — and only then stops the embedded servers, so nothing is cut off mid-write.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import structlog
import uvloop
from aiohttp import web

from conveyor import logging as conveyor_logging
from conveyor.app import ServiceFactory, create_app
from conveyor.embedded import EmbeddedError, EmbeddedServers
from conveyor.errors import ConfigError
from conveyor.settings import Settings

log = structlog.get_logger(__name__)

#: How often the embedded servers are checked, and restarted if one died.
SUPERVISE_INTERVAL_S = 1.0
#: Graceful shutdown budget: in-flight requests get this long before they are cut.
SHUTDOWN_TIMEOUT_S = 30.0


def listen_address(settings: Settings) -> tuple[str, int]:
    """Where this process listens: the API port, or the health/metrics port of a WORKER."""
    if settings.container_type.runs_app:
        return settings.host, settings.port
    return settings.host, settings.metrics_port or 9090


async def _supervise(embedded: EmbeddedServers) -> None:
    delay = SUPERVISE_INTERVAL_S
    while True:
        await asyncio.sleep(delay)
        try:
            # Restart on the loop's (main) thread, although it blocks the loop while the server
            # starts: a thread-pool thread would take the new server down with it when it
            # exits (PR_SET_PDEATHSIG follows the forking thread). Servers rarely die.
            for name in embedded.restart_dead():
                log.warning("embedded server died and was restarted", server=name)
            delay = SUPERVISE_INTERVAL_S
        except Exception as exc:
            delay = min(delay * 2, 30.0)
            log.error("embedded server restart failed, retrying", error=str(exc), in_s=delay)


async def serve(
    settings: Settings,
    *,
    embedded: EmbeddedServers | None = None,
    services: dict[str, ServiceFactory] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until ``stop`` is set (or SIGINT/SIGTERM arrives)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    app = create_app(settings, services)
    runner = web.AppRunner(
        app, handle_signals=False, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S
    )
    await runner.setup()
    supervisor = asyncio.create_task(_supervise(embedded)) if embedded else None
    try:
        host, port = listen_address(settings)
        site = web.TCPSite(runner, host, port, reuse_port=True, backlog=4096)
        await site.start()
        log.info("listening", url=f"http://{host}:{port}", role=settings.container_type.value)
        await stop.wait()
        log.info("shutting down")
    finally:
        if supervisor:
            supervisor.cancel()
        await runner.cleanup()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def run(settings: Settings) -> int:
    """Run one Conveyor process in the role of ``settings``; returns the exit code.
    (``AP_PM2_ENABLED`` goes through :mod:`conveyor.supervisor` instead.)"""
    conveyor_logging.configure(settings)
    embedded = EmbeddedServers(settings)
    try:
        settings = embedded.start()
    except EmbeddedError as exc:
        print(f"conveyor: {exc}", file=sys.stderr)
        return 2
    if embedded.redis or embedded.postgres:
        log.info(
            "embedded servers started",
            redis=settings.redis_url if embedded.redis else None,
            postgres=settings.postgres_url if embedded.postgres else None,
            config_path=str(settings.config_path),
        )
    try:
        uvloop.run(serve(settings, embedded=embedded))
    except ConfigError as exc:
        # e.g. a sandboxed mode on a host that cannot isolate the network
        print(f"conveyor: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"conveyor: cannot start: {exc}", file=sys.stderr)
        return 1
    finally:
        embedded.stop()
    return 0
