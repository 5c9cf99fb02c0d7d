"""structlog set-up: JSON lines rendered by orjson, or a pretty console with ``AP_LOG_PRETTY``.

Every line carries ``role`` and ``pid``; ``flow_id`` and ``run_id`` are bound with
:func:`bind_run` through contextvars, so everything logged while a run executes carries them
without threading a logger through every call.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import orjson
import structlog

from conveyor.settings import Settings

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def _orjson_dumps(obj: Any, default: Any = None) -> str:
    return orjson.dumps(obj, default=default or str).decode()


def configure(settings: Settings, role: str | None = None) -> None:
    """Configure structlog (and stdlib logging of libraries) for this process."""
    level = _LEVELS[settings.log_level.value]
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]
    renderer: Any
    if settings.log_pretty:
        renderer = structlog.dev.ConsoleRenderer()
    else:
        renderer = structlog.processors.JSONRenderer(serializer=_orjson_dumps)
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(
        role=role or settings.container_type.value, pid=os.getpid()
    )
    logging.basicConfig(level=max(level, logging.WARNING), stream=sys.stderr)


@contextmanager
def bind_run(flow_id: str, run_id: str) -> Iterator[None]:
    """Within the block, every log line carries ``flow_id`` and ``run_id``."""
    with structlog.contextvars.bound_contextvars(flow_id=flow_id, run_id=run_id):
        yield
