"""The board's guards: Host and Origin checks, credentials, CSRF tokens, security headers.

DNS rebinding: a web page the operator visits can point its own host name at 127.0.0.1 and
then talk to the board as a "same-origin" page. So the board answers only requests whose
``Host`` is a loopback name (``localhost``, 127.0.0.0/8, ``[::1]``), the host of
``AP_FRONTEND_URL`` or one listed in ``AP_QUEUE_UI_ALLOWED_HOSTS`` (on a non-loopback bind
with neither set, any ``Host`` — credentials are mandatory there), and every POST whose
``Origin`` (when the browser sends one, as browsers do for POSTs) is such a host too.

Credentials: ``AP_QUEUE_UI_USERNAME``/``AP_QUEUE_UI_PASSWORD`` (basic auth; the settings
refuse a non-loopback bind without them) and, whenever ``AP_API_KEY`` is set, the API key —
as the basic-auth password (any user name: the browser's login prompt works) or as
``Authorization: Bearer``. With either configured, no anonymous request gets in. CSRF uses a
signed double submit: the
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
from urllib.parse import urlsplit

from aiohttp import web

from conveyor.api.hosts import host_allowed, host_name
from conveyor.keys import SETTINGS
from conveyor.settings import Settings

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

CSRF_COOKIE = "conveyor_board"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
REALM = 'Basic realm="Conveyor board", charset="UTF-8"'
_NONCE_KEY = web.RequestKey("board_nonce", str)
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


def _origin_allowed(request: web.Request, settings: Settings) -> bool:
    origin = request.headers.get("Origin")
    if origin is None:
        return True  # not a browser (browsers send Origin on every POST); CSRF still applies
    parts = urlsplit(origin) if origin != "null" else None
    if parts is None or parts.scheme not in ("http", "https"):
        return False
    host = host_name(parts.netloc)
    if not host_allowed(settings, host):
        return False
    # The page that posted must be this board itself: host and port both match the address
    # the browser used (behind a proxy: X-Forwarded-Host, or AP_FRONTEND_URL's).
    netloc = parts.netloc.lower()
    seen = {request.host.lower()}
    forwarded = request.headers.get("X-Forwarded-Host", "").split(",")[0].strip()
    if forwarded:
        seen.add(forwarded.lower())
    if settings.frontend_url:
        seen.add(urlsplit(settings.frontend_url).netloc.lower())
    return netloc in seen


def _basic(header: str) -> tuple[str, str] | None:
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, _, password = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    return user, password


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode())


def _authorized(request: web.Request) -> bool:
    settings = request.config_dict[SETTINGS]
    user, password = settings.queue_ui_username, settings.queue_ui_password
    api_key = settings.api_key
    board_creds = bool(user and password)
    if not board_creds and not api_key:
        return True
    header = request.headers.get("Authorization", "")
    if api_key and header.partition(" ")[0].lower() == "bearer":
        return _same(header.partition(" ")[2].strip(), api_key)
    given = _basic(header)
    if given is None:
        return False
    given_user, given_password = given
    ok = False
    if board_creds and user and password:
        # Both compared, always: the time taken says nothing about which one was wrong.
        ok_user = _same(given_user, user)
        ok_password = _same(given_password, password)
        ok = ok_user and ok_password
    if api_key:
        ok = _same(given_password, api_key) or ok
    return ok


@web.middleware
async def guard_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Host, credentials, Origin and CSRF on every non-GET, security headers, nonce cookie."""
    settings = request.config_dict[SETTINGS]
    if not host_allowed(settings, host_name(request.host)):
        return web.Response(
            status=421,
            text=(
                "this board answers only to its configured host names: "
                "set AP_FRONTEND_URL or AP_QUEUE_UI_ALLOWED_HOSTS"
            ),
            headers=SECURITY_HEADERS,
        )
    if not _authorized(request):
        return web.Response(
            status=401,
            text="authentication required",
            headers={"WWW-Authenticate": REALM, **SECURITY_HEADERS},
        )
    if request.method not in _SAFE_METHODS:
        if not _origin_allowed(request, settings):
            raise web.HTTPForbidden(text="cross-origin request refused")
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
