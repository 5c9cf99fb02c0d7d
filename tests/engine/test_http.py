"""The http piece against a local aiohttp server on 127.0.0.1 (allowed via the allow list).

Names are resolved by a static resolver that maps them to 127.0.0.1 only, so nothing here
can leave loopback.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from conveyor.engine.context import RunOutcome, Services
from conveyor.engine.executor import Executor
from conveyor.engine.flow import parse_flow
from conveyor.engine.ssrf import SsrfPolicy, create_http_session
from conveyor.status import RunStatus
from tests.engine.support import MemorySink, StaticResolver, flow_doc, make_ctx


class Server:
    """A loopback test server recording requests."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.flaky = 0
        self.port = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/echo", self.echo)
        app.router.add_get("/fail", self.fail)
        app.router.add_get("/flaky", self.flaky_handler)
        app.router.add_get("/slow", self.slow)
        app.router.add_get("/text", self.text)
        app.router.add_route("*", "/redirect", self.redirect)
        return app

    async def echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.seen.append(
            {
                "method": request.method,
                "headers": dict(request.headers),
                "query": dict(request.query),
                "body": body.decode(),
                "host": request.host,
            }
        )
        return web.json_response(
            {"method": request.method, "query": dict(request.query), "body": body.decode()},
            headers={"X-Custom": "yes"},
        )

    async def fail(self, request: web.Request) -> web.Response:
        return web.json_response({"error": "nope"}, status=500)

    async def flaky_handler(self, request: web.Request) -> web.Response:
        self.flaky += 1
        if self.flaky < 3:
            return web.Response(status=503, text="try later")
        return web.json_response({"calls": self.flaky})

    async def slow(self, request: web.Request) -> web.Response:
        await asyncio.sleep(2)
        return web.Response(text="late")

    async def text(self, request: web.Request) -> web.Response:
        return web.Response(text="plain words", content_type="text/plain")

    async def redirect(self, request: web.Request) -> web.Response:
        to = request.query["to"]
        status = int(request.query.get("status", "302"))
        return web.Response(status=status, headers={"Location": to})


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    """The loopback server, on a free port."""
    srv = Server()
    runner = web.AppRunner(srv.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    srv.port = runner.addresses[0][1]
    try:
        yield srv
    finally:
        await runner.cleanup()


async def run_http(
    sink: MemorySink,
    *steps: dict[str, Any],
    allow: tuple[str, ...] = ("127.0.0.1",),
) -> RunOutcome:
    policy = SsrfPolicy(enabled=True, allow_list=allow)
    resolver = StaticResolver({"loop.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})
    session = create_http_session(policy, resolver=resolver)
    try:
        services = Services(sink=sink, http=session, ssrf=policy)
        return await Executor(services).run(parse_flow(flow_doc(*steps)), make_ctx(run_id="r-9"))
    finally:
        await session.close()


def http(name: str, url: str, **input: Any) -> dict[str, Any]:
    return {"name": name, "type": "http", "input": {"url": url, **input}}


async def test_get_json_output_shape(sink: MemorySink, server: Server) -> None:
    """Output is {status, headers lower-cased, body parsed from JSON}; query is sent."""
    base = f"http://127.0.0.1:{server.port}"
    out = await run_http(sink, http("call", f"{base}/echo?a=1", query={"b": 2}))
    assert out.status is RunStatus.SUCCEEDED
    assert out.output["status"] == 200
    assert out.output["headers"]["x-custom"] == "yes"
    assert out.output["headers"]["content-type"].startswith("application/json")
    assert out.output["body"] == {"method": "GET", "query": {"a": "1", "b": "2"}, "body": ""}


async def test_idempotency_key_and_json_body(sink: MemorySink, server: Server) -> None:
    """POST json is serialised; every request carries Idempotency-Key: {run_id}:{step}."""
    base = f"http://127.0.0.1:{server.port}"
    out = await run_http(
        sink, http("post", f"{base}/echo", method="POST", json={"x": [1, 2]}, headers={"X-A": "b"})
    )
    assert out.status is RunStatus.SUCCEEDED
    seen = server.seen[0]
    assert seen["headers"]["Idempotency-Key"] == "r-9:post"
    assert seen["headers"]["X-A"] == "b"
    assert seen["headers"]["Content-Type"] == "application/json"
    assert seen["body"] == '{"x":[1,2]}'


async def test_text_body_stays_text(sink: MemorySink, server: Server) -> None:
    """A non-JSON response body is returned as text; a text request body is sent as is."""
    base = f"http://127.0.0.1:{server.port}"
    out = await run_http(
        sink, http("t", f"{base}/text"), http("p", f"{base}/echo", method="PUT", body="raw")
    )
    assert sink.one("t")["output"]["body"] == "plain words"
    assert out.output["body"]["body"] == "raw"


async def test_fail_on_error(sink: MemorySink, server: Server) -> None:
    """Non-2xx fails the step by default; fail_on_error false returns the response."""
    base = f"http://127.0.0.1:{server.port}"
    out = await run_http(sink, http("bad", f"{base}/fail"))
    assert out.status is RunStatus.FAILED
    assert out.error is not None and "answered 500" in out.error["message"]
    assert sink.one("bad")["output"]["body"] == {"error": "nope"}
    sink2 = MemorySink()
    out2 = await run_http(sink2, http("ok", f"{base}/fail", fail_on_error=False))
    assert out2.status is RunStatus.SUCCEEDED and out2.output["status"] == 500


async def test_retry_on_http_failure(sink: MemorySink, server: Server) -> None:
    """A step retried after 503s succeeds on the third attempt."""
    base = f"http://127.0.0.1:{server.port}"
    step = http("flaky", f"{base}/flaky") | {"retry": {"attempts": 3, "backoff_s": 0.01}}
    out = await run_http(sink, step)
    assert out.status is RunStatus.SUCCEEDED and out.output["body"] == {"calls": 3}
    assert sink.one("flaky")["attempt"] == 3


async def test_request_timeout(sink: MemorySink, server: Server) -> None:
    """input.timeout_s bounds the request; the step fails saying it timed out."""
    base = f"http://127.0.0.1:{server.port}"
    out = await run_http(sink, http("slow", f"{base}/slow", timeout_s=0.2))
    assert out.status is RunStatus.FAILED
    assert out.error is not None and "timed out" in out.error["message"]


async def test_step_timeout(sink: MemorySink, server: Server) -> None:
    """The step's own timeout_s also bounds it, ending the run TIMEOUT."""
    base = f"http://127.0.0.1:{server.port}"
    out = await run_http(sink, http("slow", f"{base}/slow") | {"timeout_s": 0.2})
    assert out.status is RunStatus.TIMEOUT


async def test_redirects_are_followed_and_rechecked(sink: MemorySink, server: Server) -> None:
    """Redirects are followed by hand; 303 turns POST into GET."""
    base = f"http://127.0.0.1:{server.port}"
    out = await run_http(
        sink,
        http("r", f"{base}/redirect", method="POST", json={}, query={"to": "/echo", "status": 303}),
    )
    assert out.status is RunStatus.SUCCEEDED
    assert out.output["body"]["method"] == "GET"


async def test_credentials_dropped_on_cross_origin_redirect(
    sink: MemorySink, server: Server
) -> None:
    """Authorization is not carried to another host on redirect; kept on the same origin."""
    to = f"http://other.test:{server.port}/echo"
    url = f"http://loop.test:{server.port}/redirect"
    out = await run_http(
        sink,
        http("r", url, query={"to": to}, headers={"Authorization": "Bearer t"}),
        allow=("127.0.0.1", "loop.test", "other.test"),
    )
    assert out.status is RunStatus.SUCCEEDED
    assert server.seen[0]["host"].startswith("other.test")
    assert "Authorization" not in server.seen[0]["headers"]


async def test_loopback_refused_without_allow_list(sink: MemorySink, server: Server) -> None:
    """With an empty allow list the loopback server is refused by SSRF protection."""
    out = await run_http(sink, http("x", f"http://127.0.0.1:{server.port}/echo"), allow=())
    assert out.status is RunStatus.FAILED
    assert out.error is not None and "SSRF" in out.error["message"]
    out2 = await run_http(MemorySink(), http("y", f"http://loop.test:{server.port}/echo"), allow=())
    assert out2.error is not None and "loop.test (127.0.0.1)" in out2.error["message"]
    assert server.seen == []


async def test_allow_list_by_host_name(sink: MemorySink, server: Server) -> None:
    """A host name on the allow list is allowed whatever it resolves to."""
    out = await run_http(
        sink, http("x", f"http://loop.test:{server.port}/echo"), allow=("loop.test",)
    )
    assert out.status is RunStatus.SUCCEEDED
