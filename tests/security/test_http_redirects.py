"""Issue 10, finding 7: a redirect to another origin carries none of the flow's headers
(``X-Api-Key: {{secrets.TOKEN}}``) and none of its body; a same-origin 307/308 keeps both.

Two names (``loop.test``, ``other.test``) resolve to the loopback test server, so the hop
changes origin without any packet leaving 127.0.0.1.
"""

from __future__ import annotations

from typing import Any

from conveyor.status import RunStatus
from tests.engine.support import MemorySink
from tests.engine.test_http import Server, http, run_http, server

__all__ = ["server"]

ALLOW = ("127.0.0.1", "loop.test", "other.test")
FLOW_HEADERS = {
    "X-Api-Key": "k-123",
    "X-Custom-Token": "t-456",
    "Authorization": "Bearer b-789",
    "Accept": "application/json",
    "User-Agent": "conveyor-test",
}


async def _hop(server: Server, status: int, target: str, **input: Any) -> Any:
    url = f"http://loop.test:{server.port}/redirect"
    return await run_http(
        MemorySink(),
        http(
            "r",
            url,
            method="POST",
            headers=FLOW_HEADERS,
            query={"to": target, "status": status},
            **input,
        ),
        allow=ALLOW,
    )


async def test_cross_origin_redirect_drops_flow_headers_and_body(server: Server) -> None:
    """307/308/302 to another origin: only Accept, User-Agent, our Idempotency-Key; no body."""
    for status in (302, 307, 308):
        server.seen.clear()
        out = await _hop(server, status, f"http://other.test:{server.port}/echo", json={"pin": 1})
        assert out.status is RunStatus.SUCCEEDED, out.error
        seen = server.seen[0]
        assert seen["host"].startswith("other.test")
        names = {k.lower() for k in seen["headers"]}
        for gone in ("x-api-key", "x-custom-token", "authorization"):
            assert gone not in names, (status, gone)
        assert "json" not in seen["headers"].get("Content-Type", "")
        assert seen["headers"]["Accept"] == "application/json"
        assert seen["headers"]["User-Agent"] == "conveyor-test"
        assert seen["headers"]["Idempotency-Key"] == "r-9:r"
        assert seen["body"] == "", status
        assert "k-123" not in str(seen) and "t-456" not in str(seen)


async def test_cross_origin_by_port_or_scheme_counts(server: Server) -> None:
    """Another port on the same host is another origin too."""
    other_port = f"http://127.0.0.1:{server.port}/echo"
    out = await _hop(server, 307, other_port, json={"pin": 2})
    assert out.status is RunStatus.SUCCEEDED
    assert "X-Api-Key" not in server.seen[0]["headers"] and server.seen[0]["body"] == ""


async def test_same_origin_307_keeps_headers_and_body(server: Server) -> None:
    """A 307 on the same origin resends method, headers and body unchanged."""
    out = await _hop(server, 307, "/echo", json={"pin": 3})
    assert out.status is RunStatus.SUCCEEDED
    seen = server.seen[0]
    assert seen["method"] == "POST" and seen["body"] == '{"pin":3}'
    assert seen["headers"]["X-Api-Key"] == "k-123"
    assert seen["headers"]["Authorization"] == "Bearer b-789"
