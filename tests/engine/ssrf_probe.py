"""SSRF probe: runs hostile http steps and prints one JSON object of outcomes.

Meant to run inside a fresh network namespace (``unshare -n``) that only has loopback, so even
a regressed protection cannot send a packet anywhere else. A loopback server inside the
namespace provides the redirect-into-private-space case; a static resolver supplies hostile
answers for names.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import orjson
from aiohttp import web

from conveyor.engine.context import Services
from conveyor.engine.executor import Executor
from conveyor.engine.flow import parse_flow
from conveyor.engine.ssrf import SsrfPolicy, create_http_session
from tests.engine.support import MemorySink, StaticResolver, flow_doc, make_ctx

HOSTILE = {
    "lo.test": ["127.0.0.2"],
    "ten.test": ["10.0.0.5"],
    "meta.test": ["169.254.169.254"],
    "v6.test": ["::1"],
    "mixed.test": ["93.184.216.34", "10.0.0.5"],
    "mapped.test": ["::ffff:10.0.0.5"],
    "cgnat.test": ["100.64.0.1"],
}


async def _redirect(request: web.Request) -> web.Response:
    return web.Response(status=302, headers={"Location": request.query["to"]})


async def _ok(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def main() -> dict[str, Any]:
    app = web.Application()
    app.router.add_get("/redirect", _redirect)
    app.router.add_get("/ok", _ok)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    local = f"http://127.0.0.1:{port}"
    cases = {
        "name_to_loopback": "http://lo.test/",
        "name_to_private": "http://ten.test/",
        "name_to_metadata": "http://meta.test/latest/meta-data/",
        "name_to_ipv6_loopback": "http://v6.test/",
        "name_with_one_private_address": "http://mixed.test/",
        "name_to_mapped_private": "http://mapped.test/",
        "name_to_cgnat": "http://cgnat.test/",
        "literal_metadata": "http://169.254.169.254/latest/meta-data/",
        "literal_private": "http://10.0.0.5:8080/",
        "literal_ipv6_loopback": f"http://[::1]:{port}/ok",
        "literal_mapped_loopback": f"http://[::ffff:127.0.0.1]:{port}/ok",
        "literal_unspecified": f"http://0.0.0.0:{port}/ok",
        "redirect_to_private_name": f"{local}/redirect?to=http://ten.test/",
        "redirect_to_metadata": f"{local}/redirect?to=http://169.254.169.254/",
        "allowed_loopback": f"{local}/ok",
    }
    results: dict[str, Any] = {}
    policy = SsrfPolicy(enabled=True, allow_list=("127.0.0.1",))
    session = create_http_session(policy, resolver=StaticResolver(HOSTILE))
    try:
        ex = Executor(Services(sink=MemorySink(), http=session, ssrf=policy))
        for case, url in cases.items():
            flow = parse_flow(flow_doc({"name": "call", "type": "http", "input": {"url": url}}))
            out = await ex.run(flow, make_ctx())
            results[case] = {"status": out.status.value, "error": out.error}
    finally:
        await session.close()
    # The connector alone (no pre-check, aiohttp following redirects itself) also refuses.
    session = create_http_session(policy, resolver=StaticResolver(HOSTILE))
    try:
        for case, url in {
            "connector_literal_private": "http://10.0.0.5/",
            "connector_redirect_to_private": f"{local}/redirect?to=http://ten.test/",
        }.items():
            try:
                async with session.get(url) as resp:
                    results[case] = {"status": resp.status, "error": None}
            except Exception as exc:
                results[case] = {"status": "RAISED", "error": f"{type(exc).__name__}: {exc}"}
    finally:
        await session.close()
    # Control: protection off. The namespace has no route off loopback, so the request must
    # fail at the network layer — proof that a regression would not have escaped either.
    off = SsrfPolicy(enabled=False)
    session = create_http_session(off, resolver=StaticResolver(HOSTILE))
    try:
        ex = Executor(Services(sink=MemorySink(), http=session, ssrf=off))
        flow = parse_flow(
            flow_doc(
                {
                    "name": "call",
                    "type": "http",
                    "input": {"url": "http://ten.test/", "timeout_s": 3},
                }
            )
        )
        out = await ex.run(flow, make_ctx())
        results["control_protection_off"] = {"status": out.status.value, "error": out.error}
    finally:
        await session.close()
        await runner.cleanup()
    return results


if __name__ == "__main__":
    sys.stdout.write(orjson.dumps(asyncio.run(main())).decode())
