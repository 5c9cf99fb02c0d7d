"""structlog set-up: JSON lines rendered by orjson, or a pretty console with ``AP_LOG_PRETTY``.

Every line a process writes to stderr is one structured record, whoever logs it: structlog
loggers, the standard-library loggers of our modules and of libraries (asyncio, aiohttp …),
``warnings`` and uncaught exceptions all go through the same renderer. The only exceptions are
the documented one-line start-up errors (``conveyor: …``, exit code 2) printed before logging
is set up or instead of starting. ``AP_LOG_PRETTY=true`` renders the same records for humans
(colours only when stderr is a terminal).

Every line carries ``role`` and ``pid``; ``flow_id`` and ``run_id`` are bound with
:func:`bind_run` through contextvars, so everything logged while a run executes carries them
without threading a logger through every call.
"""

from __future__ import annotations

import contextvars
import logging
import os
import sys
import threading
from types import TracebackType
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


def _renderer(pretty: bool) -> Any:
    if pretty:
        return structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    return structlog.processors.JSONRenderer(serializer=_orjson_dumps)


def _log_uncaught(
    exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None
) -> None:
    """``sys.excepthook``: an uncaught exception is one structured record, not a raw traceback."""
    if issubclass(exc_type, KeyboardInterrupt):
        sys.__excepthook__(exc_type, exc, tb)
        return
    structlog.get_logger("conveyor").critical("uncaught exception", exc_info=(exc_type, exc, tb))


def _log_thread_uncaught(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is None:
        return
    structlog.get_logger("conveyor").critical(
        "uncaught exception in thread",
        thread=args.thread.name if args.thread else None,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )


def configure(settings: Settings, role: str | None = None) -> None:
    """Configure structlog, and route stdlib logging, warnings and uncaught exceptions
    through the same renderer, for this process."""
    level = _LEVELS[settings.log_level.value]
    renderer = _renderer(settings.log_pretty)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # The pretty renderer formats tracebacks itself; JSON needs them as a string field.
    exc: list[Any] = [] if settings.log_pretty else [structlog.processors.format_exc_info]
    structlog.configure(
        processors=[*shared, structlog.processors.StackInfoRenderer(), *exc, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(
        role=role or settings.container_type.value, pid=os.getpid()
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *exc,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    # Libraries are heard from at WARNING and above; our own stdlib loggers at the set level.
    root.setLevel(max(level, logging.WARNING))
    logging.getLogger("conveyor").setLevel(level)
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_thread_uncaught


def _structlog_var(key: str) -> contextvars.ContextVar[Any]:
    """The context variable structlog keeps ``key`` in (``merge_contextvars`` reads it)."""
    token = structlog.contextvars.bind_contextvars(**{key: ...})[key]
    token.var.reset(token)
    return token.var


_FLOW_ID = _structlog_var("flow_id")
_RUN_ID = _structlog_var("run_id")


class bind_run:
    """Within the block, every log line carries ``flow_id`` and ``run_id``; on exit both
    are back to what they were (unset, or an outer binding).

    The worker enters one per job: structlog's ``bound_contextvars`` copies the whole
    context to save the previous values, which cost more than the rest of the binding; the
    tokens of the two variables restore them exactly. Enter and exit in one task.
    """

    __slots__ = ("_tokens", "flow_id", "run_id")

    def __init__(self, flow_id: str, run_id: str) -> None:
        self.flow_id = flow_id
        self.run_id = run_id

    def __enter__(self) -> None:
        self._tokens = (_FLOW_ID.set(self.flow_id), _RUN_ID.set(self.run_id))

    def __exit__(self, *exc: object) -> None:
        flow, run = self._tokens
        _RUN_ID.reset(run)
        _FLOW_ID.reset(flow)
