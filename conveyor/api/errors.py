"""JSON errors for every failure: ``{"error": {"code", "message"}}``, never a traceback.

This is the one place the error tree of :mod:`conveyor.errors` becomes HTTP. Services raise
domain errors (``NotFound``, ``FlowValidationError``, ``QueueFull``, ``RunFinished``, …) and
handlers let them through; :func:`http_error` gives each its status from the branch it is on
(:data:`STATUS`) and its ``code`` from the class (:func:`to_api_error` is its half for
``ConveyorError`` alone), and the application's middleware
(:func:`conveyor.api.timing.api_middleware`) renders it. They are public so the
board's HTML error pages and flash messages can say the same. Handlers raise :class:`ApiError`
only for answers HTTP alone knows about (a bad header or query parameter, a 413, a 415), and
aiohttp's ``HTTPException`` is rendered the same way. Anything unexpected, and any
``ConveyorError`` without a status (``StepFailed``, ``InternalError``), is a 500 with a
generic message while the traceback goes to the log only.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import structlog
from aiohttp import web

from conveyor.errors import (
    BackendUnavailable,
    ConfigError,
    Conflict,
    ConveyorError,
    FlowValidationError,
    IdempotencyKeyReused,
    IngestUnavailable,
    NotFound,
    OutcomeUnreadable,
    SignatureInvalid,
)
from conveyor.queue.errors import QueueFull, QueueUnavailable
from conveyor.store.db import CONNECTION_ERRORS

log = structlog.get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(ConveyorError):
    """An error answer: HTTP ``status``, a stable ``code``, a human ``message``, optional
    ``details`` (list of ``{path, message}``), ``headers`` and ``extra`` top-level fields."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        details: list[dict[str, str]] | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.details = details
        self.headers = headers or {}
        self.extra = extra or {}

    def response(self) -> web.Response:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details is not None:
            error["details"] = self.details
        return json_response(
            {"error": error, **self.extra}, status=self.status, headers=self.headers
        )


def json_response(
    data: Any, *, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(data, default=str),
        status=status,
        content_type="application/json",
        headers=headers,
    )


#: HTTP status and ``Retry-After`` seconds of each branch of the error tree; a class takes
#: the entry of its nearest listed ancestor (``JobNotFound`` → ``NotFound``), unlisted → 500.
STATUS: dict[type[ConveyorError], tuple[int, str | None]] = {
    QueueFull: (429, str(QueueFull.retry_after_s)),
    QueueUnavailable: (503, "1"),
    IngestUnavailable: (503, "1"),
    IdempotencyKeyReused: (422, None),
    SignatureInvalid: (401, None),
    BackendUnavailable: (503, "5"),
    FlowValidationError: (422, None),
    NotFound: (404, None),
    Conflict: (409, None),
    ConfigError: (400, None),
}


_HTTP_CODES = {
    400: "BAD_REQUEST",
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    408: "REQUEST_TIMEOUT",
    409: "CONFLICT",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
    422: "UNPROCESSABLE",
    429: "TOO_MANY_REQUESTS",
    503: "UNAVAILABLE",
}


def http_error(exc: Exception, *, where: str = "") -> ApiError:
    """The HTTP answer for any exception a handler let through — the one mapping.

    A domain error (:mod:`conveyor.errors`'s tree) gets its branch's status (:data:`STATUS`)
    and its class's ``code``; an :class:`ApiError` is its own answer; a lost database
    connection is 503; an aiohttp ``HTTPException`` (status 400 or more: the caller re-raises
    redirects) keeps its status; anything else is a 500 whose details go to the log only.
    ``where`` (the request's method and path) goes into those log lines.
    """
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ConveyorError):
        return to_api_error(exc, where=where)
    if isinstance(exc, CONNECTION_ERRORS):
        log.warning("backend unreachable", where=where, error=repr(exc))
        return ApiError(
            503, "UNAVAILABLE", "database unavailable, retry later", headers={"Retry-After": "5"}
        )
    if isinstance(exc, web.HTTPException):
        code = _HTTP_CODES.get(exc.status, "HTTP_ERROR")
        message = (
            exc.reason if exc.text is None or exc.text.startswith(f"{exc.status}:") else exc.text
        )
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
        return ApiError(exc.status, code, message, headers=headers)
    log.error("unhandled error", where=where, exc_info=exc)
    return ApiError(500, "INTERNAL_ERROR", "internal server error")


def to_api_error(exc: ConveyorError, *, where: str = "") -> ApiError:
    """The HTTP answer for a domain error (the :class:`ConveyorError` half of
    :func:`http_error`; an :class:`ApiError` is its own answer)."""
    if isinstance(exc, ApiError):
        return exc
    status, retry_after = next((STATUS[t] for t in type(exc).__mro__ if t in STATUS), (500, None))
    headers = {"Retry-After": retry_after} if retry_after else None
    if status == 500:
        log.error("internal error", where=where, error=repr(exc), exc_info=exc)
        return ApiError(500, "INTERNAL_ERROR", "internal server error")
    if isinstance(exc, OutcomeUnreadable):
        # The run goes on: the caller learns which one to poll.
        headers = {"Retry-After": "5", "x-run-id": exc.run_id}
        return ApiError(
            status, exc.code, exc.message, headers=headers, extra={"run_id": exc.run_id}
        )
    if isinstance(exc, BackendUnavailable):
        if isinstance(exc, IngestUnavailable) and exc.run_id is not None:
            headers = {"Retry-After": "1", "x-run-id": exc.run_id}
        # The driver's text names hosts and ports: the caller only needs "retry".
        return ApiError(
            status, exc.code, f"{exc.backend} unavailable, retry later", headers=headers
        )
    if isinstance(exc, IdempotencyKeyReused):
        return ApiError(status, exc.code, exc.message, extra={"run_id": exc.run_id})
    details = None
    if isinstance(exc, FlowValidationError):
        details = [{"path": d["path"], "message": d["message"]} for d in exc.details]
    return ApiError(status, exc.code, exc.message, details=details, headers=headers)
