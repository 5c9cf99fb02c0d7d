"""The board's guards: HTTP basic auth, CSRF tokens for every action, security headers.

Basic auth is enforced whenever ``AP_QUEUE_UI_USERNAME``/``AP_QUEUE_UI_PASSWORD`` are set (the
settings refuse a non-loopback bind without them). CSRF uses a signed double submit: the
browser holds a random nonce in a ``SameSite=Strict`` cookie, every form carries
``HMAC(key, nonce)``, and a POST is accepted only when both match — stateless, so any process
behind a load balancer can check a token another process issued. The key derives from
``AP_ENCRYPTION_KEY``. Pages get a strict Content-Security-Policy: no inline script, no
third-party origin, no framing.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Awaitable, Callable

from aiohttp import web

from conveyor.api.keys import SETTINGS

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

CSRF_COOKIE = "conveyor_board"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
REALM = 'Basic realm="Conveyor board", charset="UTF-8"'
_NONCE_KEY = "board_nonce"
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


def _csrf_key(request: web.Request) -> bytes:
    secret = request.config_dict[SETTINGS].encryption_key or ""
    return hashlib.sha256(b"conveyor-board-csrf\0" + secret.encode()).digest()


def csrf_token(request: web.Request) -> str:
    """The token forms of this response must carry (issuing a nonce cookie if needed)."""
    nonce = request.get(_NONCE_KEY) or request.cookies.get(CSRF_COOKIE) or ""
    if len(nonce) != 32:
        nonce = secrets.token_hex(16)
    request[_NONCE_KEY] = nonce
    return hmac.new(_csrf_key(request), nonce.encode(), hashlib.sha256).hexdigest()


async def check_csrf(request: web.Request) -> None:
    """Raise 403 unless the POST carries the token of the browser's nonce cookie."""
    nonce = request.cookies.get(CSRF_COOKIE, "")
    given = request.headers.get(CSRF_HEADER, "")
    if not given and request.content_type in (
        "application/x-www-form-urlencoded",
        "multipart/form-data",
    ):
        given = str((await request.post()).get(CSRF_FIELD, ""))
    expected = hmac.new(_csrf_key(request), nonce.encode(), hashlib.sha256).hexdigest()
    if not nonce or not hmac.compare_digest(given.encode(), expected.encode()):
        raise web.HTTPForbidden(text="missing or wrong CSRF token: reload the page and try again")


def _authorized(request: web.Request) -> bool:
    settings = request.config_dict[SETTINGS]
    user, password = settings.queue_ui_username, settings.queue_ui_password
    if not (user and password):
        return True
    header = request.headers.get("Authorization", "")
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        given_user, _, given_password = base64.b64decode(encoded).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    # Both compared, always: the time taken says nothing about which one was wrong.
    ok_user = hmac.compare_digest(given_user.encode(), user.encode())
    ok_password = hmac.compare_digest(given_password.encode(), password.encode())
    return ok_user and ok_password


@web.middleware
async def guard_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Basic auth, CSRF on every non-GET, security headers and the nonce cookie."""
    if not _authorized(request):
        return web.Response(
            status=401,
            text="authentication required",
            headers={"WWW-Authenticate": REALM, **SECURITY_HEADERS},
        )
    if request.method not in _SAFE_METHODS:
        await check_csrf(request)
    response = await handler(request)
    response.headers.update(SECURITY_HEADERS)
    if not request.path.startswith("/admin/static/"):
        response.headers.setdefault("Cache-Control", "no-store")
    nonce = request.get(_NONCE_KEY)
    if nonce and nonce != request.cookies.get(CSRF_COOKIE):
        response.set_cookie(
            CSRF_COOKIE,
            nonce,
            path="/admin",
            httponly=True,
            samesite="Strict",
            secure=request.secure,
            max_age=86400 * 30,
        )
    return response
