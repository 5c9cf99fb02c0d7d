"""SSRF protection for the http step, enforced where the socket address is chosen.

Checking a URL's host before a request is not enough: DNS can answer differently at connect
time (rebinding) and redirects move the target. :class:`GuardedConnector` therefore checks
every address the connector is about to connect to — after its resolver (or IP-literal
shortcut) produced it — and the http piece follows redirects by hand so each hop passes
through the same connector. Forbidden: anything not globally routable (private, loopback,
link-local incl. the 169.254.169.254 metadata service, unspecified, reserved, shared/CGNAT,
documentation ranges), multicast, and v4 addresses smuggled inside IPv6 (mapped, 6to4,
NAT64). ``AP_SSRF_ALLOW_LIST`` entries (host names, IPs or CIDRs) are let through.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp

from conveyor.engine.errors import SsrfRefused

if TYPE_CHECKING:
    from aiohttp.abc import AbstractResolver, ResolveResult
    from aiohttp.tracing import Trace

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


@dataclass(frozen=True, slots=True)
class SsrfPolicy:
    """Which addresses the http step may reach.

    Parameters: ``enabled`` (AP_SSRF_PROTECTION_ENABLED, default true); ``allow_list``
    (AP_SSRF_ALLOW_LIST split on commas): host names (exact, case-insensitive), IP addresses
    or CIDR networks that are allowed even though private.
    """

    enabled: bool = True
    allow_list: Sequence[str] = ()
    _hosts: frozenset[str] = field(init=False, repr=False)
    _networks: tuple[IPNetwork, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        hosts: set[str] = set()
        nets: list[IPNetwork] = []
        for raw in self.allow_list:
            entry = raw.strip().strip("[]")
            if not entry:
                continue
            try:
                nets.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                hosts.add(entry.lower().rstrip("."))
        object.__setattr__(self, "_hosts", frozenset(hosts))
        object.__setattr__(self, "_networks", tuple(nets))

    @classmethod
    def from_setting(cls, enabled: bool, allow_list: str | Iterable[str] | None) -> SsrfPolicy:
        """Build from the two settings; ``allow_list`` may be the raw comma-separated text."""
        if allow_list is None:
            items: tuple[str, ...] = ()
        elif isinstance(allow_list, str):
            items = tuple(s for s in allow_list.split(",") if s.strip())
        else:
            items = tuple(allow_list)
        return cls(enabled=enabled, allow_list=items)

    def host_allowed(self, host: str) -> bool:
        """True when ``host`` (a name) is on the allow list by name."""
        return host.lower().rstrip(".") in self._hosts

    def check(self, host: str, address: str) -> None:
        """Raise :class:`SsrfRefused` unless connecting to ``address`` (for ``host``) is ok."""
        if not self.enabled or self.host_allowed(host):
            return
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            raise SsrfRefused(f"refused {host}: unparseable address {address!r}") from None
        if any(ip in net for net in self._networks):
            return
        reason = forbidden_reason(ip)
        if reason is not None:
            shown = host if host == address else f"{host} ({address})"
            raise SsrfRefused(
                f"refused to connect to {shown}: {reason} address "
                "(SSRF protection; allow it with AP_SSRF_ALLOW_LIST)"
            )

    def check_url_host(self, host: str) -> None:
        """Check a URL host that is an IP literal now; names are checked at connect time."""
        try:
            ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
        except ValueError:
            return
        self.check(host, host.strip("[]"))


def _embedded_v4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def forbidden_reason(ip: IPAddress) -> str | None:  # noqa: PLR0911 - one return per address class, read as a table
    """Why ``ip`` may not be reached (``"loopback"``, ``"private"``, …), or ``None`` when it
    is a public unicast address."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_v4(ip)
        if inner is not None:
            reason = forbidden_reason(inner)
            return f"IPv6-embedded {reason}" if reason else None
    if ip.is_loopback:
        return "loopback"
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_link_local:
        return "link-local/metadata"
    if ip.is_multicast:
        return "multicast"
    if ip.is_private:
        return "private"
    if ip.is_reserved:
        return "reserved"
    if not ip.is_global:
        return "non-public"
    return None


class GuardedConnector(aiohttp.TCPConnector):
    """A ``TCPConnector`` that refuses forbidden addresses right before connecting.

    The check runs on the resolved address list itself (also for IP-literal URLs and DNS
    cache hits), so what is checked is exactly what is connected to.
    """

    def __init__(self, *, policy: SsrfPolicy, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.policy = policy

    async def _resolve_host(
        self, host: str, port: int, traces: Sequence[Trace] | None = None
    ) -> list[ResolveResult]:
        addrs = await super()._resolve_host(host, port, traces=traces)
        if self.policy.enabled:
            # Every address must pass, not just the first: happy-eyeballs may try any of them.
            for addr in addrs:
                self.policy.check(host, addr["host"])
        return addrs


def create_http_session(
    policy: SsrfPolicy,
    *,
    resolver: AbstractResolver | None = None,
    limit: int = 100,
    limit_per_host: int = 20,
) -> aiohttp.ClientSession:
    """The ClientSession http steps use: guarded connector, no cookie sharing between runs,
    no proxy settings from the environment. Call inside a running loop; close on shutdown."""
    connector = GuardedConnector(
        policy=policy,
        resolver=resolver,
        limit=limit,
        limit_per_host=limit_per_host,
        ttl_dns_cache=10,
    )
    return aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
        auto_decompress=True,
    )
