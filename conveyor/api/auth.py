"""Bearer-token auth for ``/api/v1/*`` (webhooks excepted) whenever ``AP_API_KEY`` is set.

Webhooks authenticate with their own HMAC signature, health and metrics are for probes, and the
board has its own basic auth. Tokens are compared in constant time.
"""

from __future__ import annotations

import hmac

from aiohttp import web

from conveyor.api.errors import ApiError, Handler
from conveyor.keys import SETTINGS

PROTECTED_PREFIX = "/api/v1/"
OPEN_PREFIX = "/api/v1/webhooks/"


@web.middleware
async def api_key_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    key = request.app[SETTINGS].api_key
    path = request.path
    if key and path.startswith(PROTECTED_PREFIX) and not path.startswith(OPEN_PREFIX):
        given = request.headers.get("Authorization", "")
        expected = f"Bearer {key}"
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise ApiError(
                401,
                "UNAUTHORIZED",
                "missing or wrong Authorization: Bearer <AP_API_KEY>",
                headers={"WWW-Authenticate": "Bearer"},
            )
    return await handler(request)
