"""Bearer-token auth for ``/api/v1/*`` (webhooks excepted) whenever ``AP_API_KEY`` is set.

Webhooks authenticate with their own HMAC signature, health and metrics are for probes, and the
board has its own basic auth. Tokens are compared in constant time. The check runs inside the
application's one middleware (:func:`conveyor.api.timing.api_middleware`), after the timer
starts and inside the error mapping, so a refusal is timed and rendered like any answer.
"""

from __future__ import annotations

import hmac

from aiohttp import web

from conveyor.api.errors import ApiError

PROTECTED_PREFIX = "/api/v1/"
OPEN_PREFIX = "/api/v1/webhooks/"


def expected_header(api_key: str | None) -> bytes | None:
    """The ``Authorization`` value ``AP_API_KEY`` asks for, or ``None`` when auth is off."""
    return f"Bearer {api_key}".encode() if api_key else None


def protected(path: str) -> bool:
    """True for the paths the API key guards (``/api/v1/*`` but not webhooks)."""
    return path.startswith(PROTECTED_PREFIX) and not path.startswith(OPEN_PREFIX)


def check_api_key(request: web.Request, expected: bytes) -> None:
    """Raise the 401 unless ``request`` carries ``expected`` (compared in constant time)."""
    given = request.headers.get("Authorization", "")
    # surrogateescape: aiohttp decodes a header's undecodable bytes to lone surrogates, which
    # must be a wrong key (401), not an encoding error (500).
    if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected):
        raise ApiError(
            401,
            "UNAUTHORIZED",
            "missing or wrong Authorization: Bearer <AP_API_KEY>",
            headers={"WWW-Authenticate": "Bearer"},
        )
