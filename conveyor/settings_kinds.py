"""How the text of an ``AP_*`` variable becomes a value: :class:`Kind` and the casts.

:mod:`conveyor.settings` declares each setting once with one of these kinds; a cast raises
``ValueError`` for text it does not allow and the reader turns that into one
``AP_X='text' is invalid: <allowed>`` line naming the variable.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Callable
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

from conveyor.errors import ConfigError


class ItemInvalid(ConfigError):
    """Raised by a cast when one item of a list is wrong: the error quotes that item."""

    def __init__(self, item: str, allowed: str) -> None:
        super().__init__(f"{item!r} is invalid: {allowed}")
        self.item = item
        self.allowed = allowed


@dataclasses.dataclass(frozen=True, slots=True)
class Kind:
    """How one variable's text becomes its value.

    ``cast`` gets the stripped, non-empty text and raises ``ValueError`` (or ``KeyError``) when
    the text is not allowed; the error then reads ``AP_X='text' is invalid: <allowed>``.
    A ``secret`` kind never echoes the text, only its length. ``fallback`` gives the value of
    an unset variable from others (``AP_POSTGRES_URL`` from ``AP_POSTGRES_HOST``, …).
    ``minimum``/``maximum`` are an integer's bounds (``None``: unbounded).
    """

    cast: Callable[[str], Any]
    allowed: str
    secret: bool = False
    fallback: Callable[[Any], Any] | None = None
    minimum: int | None = None
    maximum: int | None = None


def integer(minimum: int | None = None, maximum: int | None = None) -> Kind:
    bounds = "an integer"
    if minimum is not None and maximum is not None:
        bounds = f"an integer from {minimum} to {maximum}"
    elif minimum is not None:
        bounds = f"an integer >= {minimum}"

    def cast(v: str) -> int:
        if not re.fullmatch(r"[+-]?\d+", v):
            raise ValueError(v)
        n = int(v)
        if (minimum is not None and n < minimum) or (maximum is not None and n > maximum):
            raise ValueError(v)
        return n

    return Kind(cast, f"expected {bounds}", minimum=minimum, maximum=maximum)


_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
BOOL = Kind(lambda v: _BOOLS[v.lower()], "expected true or false")
TEXT = Kind(str, "any text")
PORT = integer(1, 65535)
COUNT = integer(minimum=0)
POSITIVE = integer(minimum=1)


def enum_of(
    enum: type[StrEnum], *, lower: bool = False, legacy: dict[str, Any] | None = None
) -> Kind:
    allowed = " | ".join(m.value for m in enum)
    if legacy:
        allowed += f" (legacy {' | '.join(legacy)})"

    def cast(v: str) -> Any:
        v = v.lower() if lower else v.upper()
        return legacy[v] if legacy and v in legacy else enum(v)

    return Kind(cast, f"expected one of {allowed}")


def choice(*options: str) -> Kind:
    def cast(v: str) -> str:
        if v.lower() not in options:
            raise ValueError(v)
        return v.lower()

    return Kind(cast, f"expected one of {' | '.join(options)}")


def key_prefix(v: str) -> str:
    # No braces: the prefix sits outside every key's {hash tag}.
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}", v):
        raise ValueError(v)
    return v


def host(v: str) -> str:
    bare = v.strip("[]")
    try:
        ipaddress.ip_address(bare)
        return bare
    except ValueError:
        if HOSTNAME.match(v):
            return v
        raise


def url(*schemes: str, fallback: Callable[[Any], Any] | None = None) -> Kind:
    def cast(v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in schemes:
            raise ValueError(v)
        # A PostgreSQL URL may name a unix-socket directory in ?host= instead.
        if parts.scheme != "unix" and not parts.hostname and "host=" not in parts.query:
            raise ValueError(v)
        _ = parts.port  # raises ValueError on a malformed port
        return v

    allowed = f"expected a URL starting with {' or '.join(s + '://' for s in schemes)}"
    return Kind(cast, allowed, fallback=fallback)


def public_url(*schemes: str) -> Kind:
    """A URL other people's programs are given (webhook URLs, curl examples): scheme, host,
    port and path only. A query or fragment would end up in the middle of every URL built
    from it, and a ``user:password@`` would be printed on the board; the error message masks
    the password."""
    plain = url(*schemes)
    allowed = (
        f"{plain.allowed}, without a query (?), fragment (#) or user:password@ "
        "(scheme, host, port and path only)"
    )

    def cast(v: str) -> str:
        parts = urlsplit(v)
        if "@" in parts.netloc:
            shown = parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]).geturl()
            raise ItemInvalid(shown, allowed)
        plain.cast(v)
        if "?" in v or "#" in v:
            raise ValueError(v)
        return v

    return Kind(cast, allowed)


def url_list(*schemes: str) -> Kind:
    one = url(*schemes)

    def cast(v: str) -> tuple[str, ...]:
        out = []
        for item in (i.strip() for i in v.split(",")):
            if not item:
                continue
            try:
                out.append(one.cast(item))
            except ValueError:
                raise ItemInvalid(item, one.allowed) from None
        return tuple(out)

    return Kind(cast, "expected comma-separated URLs")


def host_ports(v: str) -> tuple[tuple[str, int], ...]:
    out = []
    for item in (i.strip() for i in v.split(",")):
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(v)
        out.append((host.strip("[]"), int(port)))
    return tuple(out)


def allow_list(v: str) -> tuple[str, ...]:
    out = []
    for item in (i.strip() for i in v.split(",")):
        if not item:
            continue
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            if not HOSTNAME.match(item):
                raise
        out.append(item.lower())
    return tuple(out)


def encryption_key(v: str) -> str:
    if len(v) not in (32, 64) or not re.fullmatch(r"[0-9a-fA-F]+", v):
        raise ValueError("bad key")
    return v.lower()


# Labels separated by dots (each dot required: an optional one makes the regex backtrack
# exponentially on a typo such as a trailing ":8443").
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
HOSTNAME = re.compile(rf"^(?=.{{1,253}}\.?$){_LABEL}(?:\.{_LABEL})*\.?$")
