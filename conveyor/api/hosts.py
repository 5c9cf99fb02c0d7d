"""Which host names a request may carry: the allow-list behind the board's Host and Origin
checks (DNS-rebinding defence) and behind the forwarded host the API and board put into the
webhook URLs they show (docs/board.md, "Webhook URLs and the curl example").
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

from conveyor.settings import Settings, is_loopback_host


def host_name(netloc: str) -> str | None:
    """The host of a ``Host`` header or URL netloc, lower-case, port dropped."""
    try:
        host = urlsplit("//" + netloc).hostname
    except ValueError:
        return None
    return host.rstrip(".") if host else None


def host_allowed(settings: Settings, host: str | None) -> bool:
    """Whether a request naming ``host`` may be served: loopback names, ``AP_FRONTEND_URL``'s
    host and ``AP_QUEUE_UI_ALLOWED_HOSTS`` (names or CIDRs); on a non-loopback bind with no
    list, any host (credentials are mandatory there)."""
    if not host:
        return False
    if is_loopback_host(host) or host == "localhost" or host.endswith(".localhost"):
        return True
    allowed = list(settings.queue_ui_allowed_hosts)
    if settings.frontend_url:
        front = urlsplit(settings.frontend_url).hostname
        if front:
            allowed.append(front.lower())
    if not allowed and not settings.loopback_bind:
        # Reached over the network with mandatory credentials and no list to check against.
        return True
    for entry in allowed:
        if "/" in entry:
            try:
                if ipaddress.ip_address(host) in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                continue
        elif host == entry.rstrip("."):
            return True
    return False


#: A ``Host`` value as a proxy sends it: a name or an address, with an optional port.
_HOST_PORT = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?")


def trusted_host(settings: Settings, netloc: str) -> bool:
    """True when ``netloc`` (``host[:port]`` from a header such as ``X-Forwarded-Host``) is
    well-formed and passes the same Host allow-list as the board's guard."""
    if not _HOST_PORT.fullmatch(netloc):
        return False
    return host_allowed(settings, host_name(netloc))
