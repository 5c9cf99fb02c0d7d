"""JSON errors for every failure: ``{"error": {"code", "message"}}``, never a traceback.

Handlers raise :class:`ApiError` (or aiohttp's ``HTTPException``); the middleware renders both
as JSON, and turns anything unexpected into a 500 with a generic message while the traceback
goes to the log only.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import structlog
from aiohttp import web

from conveyor.errors import BackendUnavailable, ConfigError, Conflict, ConveyorError, NotFound
from conveyor.queue.errors import QueueFull, QueueUnavailable
from conveyor.store.db import CONNECTION_ERRORS

log = structlog.get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
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
        self.message = message
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


_DOMAIN_STATUS: dict[type[ConveyorError], int] = {
    QueueFull: 429,
    NotFound: 404,
    Conflict: 409,
    BackendUnavailable: 503,
    ConfigError: 400,
}


def _from_domain(exc: ConveyorError) -> ApiError:
    status = next((s for t, s in _DOMAIN_STATUS.items() if isinstance(exc, t)), 500)
    headers = {"Retry-After": "5" if status == 503 else "1"} if status in (429, 503) else None
    message = exc.message if status != 500 else "internal server error"
    if status == 500:
        log.error("internal error", error=repr(exc))
    return ApiError(status, exc.code, message, headers=headers)


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


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except QueueUnavailable:
        return ApiError(
            503, "UNAVAILABLE", "Redis unavailable, retry later", headers={"Retry-After": "1"}
        ).response()
    except ConveyorError as exc:
        return _from_domain(exc).response()
    except CONNECTION_ERRORS as exc:
        log.warning("backend unreachable", path=request.path, error=repr(exc))
        return ApiError(
            503, "UNAVAILABLE", "database unavailable, retry later", headers={"Retry-After": "5"}
        ).response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "HTTP_ERROR")
        message = (
            exc.reason if exc.text is None or exc.text.startswith(f"{exc.status}:") else exc.text
        )
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
        return ApiError(exc.status, code, message, headers=headers).response()
    except Exception:
        log.exception("unhandled error", path=request.path, method=request.method)
        return ApiError(500, "INTERNAL_ERROR", "internal server error").response()
