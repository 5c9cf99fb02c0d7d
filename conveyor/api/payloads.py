"""What a caller sends, made safe to store and show: bodies, headers, query strings.

Every webhook is recorded, never dropped, and never fails as a 500 because of its bytes:

- A JSON body is parsed when it parses and nests at most :data:`MAX_JSON_DEPTH` levels;
  otherwise it is kept as text (orjson encodes at most 254 levels, and the run record wraps
  the body in a few more, so a deeper body could be accepted but never stored).
- Header values that are not valid UTF-8 (aiohttp keeps raw bytes as lone surrogates, which
  no JSON encoder accepts) are decoded with U+FFFD replacements.
- Sensitive headers (``Authorization``, ``Cookie``, API keys, tokens, signatures …) and query
  parameters by the same rule (``?token=``, ``?api_key=`` …) are stored as ``***``: the
  caller's credentials are not the flow's data, and the run record is shown on the board and
  through the API.

NUL characters need nothing here: the store replaces them (PostgreSQL refuses them).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, Final

import orjson

from conveyor.engine.templating import REDACTED

#: Deepest JSON body kept parsed; deeper bodies are kept as text.
MAX_JSON_DEPTH: Final = 128
#: Headers stored as ``***`` by exact (lower-case) name …
SENSITIVE_HEADERS: Final = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "cookie",
        "set-cookie",
        "x-api-key",
        "api-key",
        "apikey",
        "x-conveyor-signature",
        "x-hub-signature",
        "x-hub-signature-256",
        "stripe-signature",
        "x-slack-signature",
        "x-twilio-signature",
        "x-shopify-hmac-sha256",
        "x-gitlab-token",
        "x-amz-security-token",
        "x-csrf-token",
    }
)
#: … and by any of these words in the name (``X-Auth-Token``, ``X-Webhook-Secret`` …).
_SENSITIVE_WORDS: Final = re.compile(
    r"auth|token|secret|signature|passw|api-?key|session|cookie|hmac|credential", re.IGNORECASE
)
# Enough nesting for the trigger, the job and a step's output wrapped around the body.
_HEADROOM: Final = 254 - MAX_JSON_DEPTH


#: Names seen so far: raw header or query name → (lower-cased valid text, redacted?). Every
#: webhook carries the same dozen names, so the rule runs once per name, not per request;
#: bounded (a sender inventing names gets the uncached path, never more memory).
_NAMES: dict[str, tuple[str, bool]] = {}
_NAMES_MAX: Final = 4096


def _sensitive(name: str) -> bool:
    low = name.lower().replace("_", "-")
    return low in SENSITIVE_HEADERS or _SENSITIVE_WORDS.search(low) is not None


def _name(key: str) -> tuple[str, bool]:
    """``key`` as valid text, lower-cased, and whether it is sensitive (cached)."""
    found = _NAMES.get(key)
    if found is None:
        name = text(key)
        found = (name.lower(), _sensitive(name))
        if len(_NAMES) < _NAMES_MAX:
            _NAMES[key] = found
    return found


def is_sensitive_name(name: str) -> bool:
    """True when a header or query parameter of this name is stored redacted (one rule for
    both: ``_`` counts as ``-``, so ``api_key`` is ``api-key``)."""
    return _name(name)[1]


def text(value: str) -> str:
    """``value`` as valid UTF-8 text (lone surrogates from undecodable bytes → U+FFFD)."""
    if value.isascii():
        return value
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def headers(items: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Lower-cased headers with sensitive values redacted and every value valid text."""
    out: dict[str, str] = {}
    names = _NAMES
    for key, value in items:
        known = names.get(key) or _name(key)
        out[known[0]] = REDACTED if known[1] else value if value.isascii() else text(value)
    return out


def query(items: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Query parameters (the first value of a repeated name), sensitive ones redacted by the
    headers' rule (:func:`is_sensitive_name`) and every value valid text."""
    out: dict[str, str] = {}
    for key, value in items:
        name = text(key)
        if name not in out:
            out[name] = REDACTED if _name(key)[1] else text(value)
    return out


def json_body(raw: bytes) -> Any:
    """The parsed body, or its text when it is not JSON or nests too deeply to store."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        # Senders send what they send: keep the text rather than refuse the webhook.
        return raw.decode("utf-8", errors="replace")
    if too_deep(raw, body):
        return raw.decode("utf-8", errors="replace")
    return body


def too_deep(raw: bytes, body: Any) -> bool:
    """True when ``body`` (parsed from ``raw``) nests deeper than :data:`MAX_JSON_DEPTH`."""
    # Only a body with many brackets can be deep; then encode it once under headroom.
    return raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and not _encodable(body)


def _encodable(body: Any) -> bool:
    wrapped = body
    for _ in range(_HEADROOM):
        wrapped = [wrapped]
    try:
        orjson.dumps(wrapped)
    except orjson.JSONEncodeError:
        return False
    return True
