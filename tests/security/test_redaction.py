"""Issue 10, finding 6: secrets never show as dict keys, in echoed inputs, or in headers.

Redaction covers keys as well as values, in every form a secret takes after an upper-case,
a URL or a JSON encoding; the http step's errors never echo a rendered input; the caller's
``Authorization``/``Cookie``/API-key/signature headers are stored as ``***``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from conveyor.engine.context import Services
from conveyor.engine.executor import Executor
from conveyor.engine.flow import parse_flow
from conveyor.engine.ssrf import SsrfPolicy, create_http_session
from conveyor.engine.templating import redact
from conveyor.status import RunStatus
from conveyor.store import runs as run_store
from conveyor.store.db import Database
from tests.api.conftest import make_client
from tests.board.conftest import wait_status
from tests.engine.local_sandbox import LocalSandbox
from tests.engine.support import MemorySink, flow_doc, make_ctx

__all__ = ["make_client"]

Client = TestClient[Any, Any]
TOKEN = "Tok/en+42 x"


def test_redact_covers_keys_and_encoded_forms() -> None:
    """Keys, upper/lower case, percent-encoded, JSON- and repr-escaped forms are all caught."""
    s = 'Se"cr/et 9'
    value = {
        s: 1,
        "nested": [{f"pre-{s}": s.upper()}],
        "url": "https://x.test/?q=Se%22cr%2Fet%209",
        "plus": "q=Se%22cr%2Fet+9",
        "json": '{"k": "Se\\"cr/et 9"}',
        "repr": "value 'Se\"cr/et 9'",
    }
    out = redact(value, [s])
    assert s.lower() not in repr(out).lower()
    assert "cr%2Fet" not in repr(out) and "Se%22" not in repr(out)
    assert set(out) == {"***", "nested", "url", "plus", "json", "repr"}
    assert out["nested"] == [{"pre-***": "***"}]


def test_redact_keeps_keys_that_collide_after_redaction() -> None:
    """Two keys that differ only by a secret both survive redaction."""
    out = redact({"a-s3cr3t": 1, "a-S3CR3T": 2}, ["s3cr3t"])
    assert sorted(out.values()) == [1, 2]
    assert all("s3cr3t" not in k.lower() for k in out)


async def test_secret_returned_as_a_key_is_redacted_in_records() -> None:
    """A code step returning {secret: ...} and an upper-cased secret in logs: both redacted."""
    sink = MemorySink()
    src = "def run(i):\n    print(i['t'].upper())\n    return {i['t']: 'v', 'n': {i['t']: 1}}\n"
    steps = [{"name": "c", "type": "code", "input": {"t": "{{secrets.T}}"}, "code": src}]
    services = Services(sink=sink, sandbox=LocalSandbox(memory_kb=512 * 1024))
    ctx = make_ctx(secrets={"T": "key-secret-77"})
    out = await Executor(services).run(parse_flow(flow_doc(*steps)), ctx)
    assert out.status is RunStatus.SUCCEEDED, out.error
    text = repr(sink.records) + repr(out)
    assert "key-secret-77" not in text.lower()
    assert sink.one("c")["output"] == {"***": "v", "n": {"***": 1}}


async def test_http_method_error_does_not_echo_the_secret() -> None:
    """A secret-templated method fails without the (upper-cased) value in the error."""
    sink = MemorySink()
    steps = [
        {
            "name": "h",
            "type": "http",
            "input": {"method": "{{secrets.M}}", "url": "https://example.invalid/"},
        }
    ]
    policy = SsrfPolicy(enabled=True, allow_list=())
    session = create_http_session(policy)
    try:
        services = Services(sink=sink, http=session, ssrf=policy)
        ctx = make_ctx(secrets={"M": "zz-method-secret"})
        out = await Executor(services).run(parse_flow(flow_doc(*steps)), ctx)
    finally:
        await session.close()
    assert out.status is RunStatus.FAILED
    text = (repr(sink.records) + repr(out)).lower()
    assert "zz-method-secret" not in text and "***" not in repr(out.error)
    assert out.error is not None and "must be one of" in out.error["message"]


SENSITIVE = {
    "Authorization": "Bearer inbound-tok-1",
    "Cookie": "sid=inbound-cookie-2",
    "Proxy-Authorization": "Basic aW5ib3VuZA==",
    "X-Api-Key": "inbound-key-3",
    "X-Hub-Signature-256": "sha256=inbound-sig-4",
    "X-Custom-Auth-Token": "inbound-tok-5",
    "Stripe-Signature": "t=1,v1=inbound-sig-6",
}


async def test_inbound_sensitive_headers_stored_redacted(make_client: Any, db: Database) -> None:
    """Authorization, Cookie, API keys, tokens, signatures: stored and shown as ***."""
    client: Client = await make_client(AP_CONTAINER_TYPE="APP")
    doc = {
        "name": "hdr",
        "trigger": {"type": "webhook"},
        "steps": [{"name": "t", "type": "transform", "input": {"h": "{{trigger.headers}}"}}],
    }
    fid = (await (await client.post("/api/v1/flows", json=doc)).json())["id"]
    resp = await client.post(
        f"/api/v1/webhooks/{fid}", json={}, headers={**SENSITIVE, "X-Plain": "visible"}
    )
    assert resp.status == 202
    run_id = (await resp.json())["run_id"]
    row = await run_store.get_run(db, uuid.UUID(run_id))
    headers = row["trigger"]["headers"]
    for name in SENSITIVE:
        assert headers[name.lower()] == "***", name
    assert headers["x-plain"] == "visible"
    shown = await (await client.get(f"/api/v1/flow-runs/{run_id}")).text()
    page = await (await client.get(f"/admin/runs/{run_id}")).text()
    for text in (shown, page, repr(row)):
        assert "inbound-" not in text and "aW5ib3VuZA" not in text


class Inverter:
    """A loopback server answering a JSON object with keys and values swapped."""

    async def handle(self, request: web.Request) -> web.Response:
        data = await request.json()
        return web.json_response({str(v): k for k, v in data.items()})


@pytest.fixture
async def inverter() -> AsyncIterator[str]:
    """Base URL of the inverting server on 127.0.0.1."""
    app = web.Application()
    app.router.add_post("/invert", Inverter().handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def test_secret_key_from_a_remote_is_redacted_everywhere(
    make_client: Any, inverter: str, postgres_url: str
) -> None:
    """A secret that comes back as a dict key is absent from the API, board and PostgreSQL."""
    client: Client = await make_client(AP_SSRF_ALLOW_LIST="127.0.0.1")
    assert (await client.put("/api/v1/secrets/TOKEN", json={"value": TOKEN})).status == 201
    doc = {
        "name": "keys",
        "trigger": {"type": "webhook"},
        "steps": [
            {
                "name": "inv",
                "type": "http",
                "input": {
                    "method": "POST",
                    "url": f"{inverter}/invert",
                    "json": {"k": "{{secrets.TOKEN}}"},
                },
            },
            {"name": "copy", "type": "transform", "input": {"b": "{{inv.body}}"}},
        ],
    }
    fid = (await (await client.post("/api/v1/flows", json=doc)).json())["id"]
    resp = await client.post(f"/api/v1/webhooks/{fid}", json={})
    run_id = (await resp.json())["run_id"]
    run = await wait_status(client, run_id, "SUCCEEDED", "FAILED")
    assert run["status"] == "SUCCEEDED", run
    assert run["steps"][1]["output"] == {"b": {"***": "k"}}
    page = await (await client.get(f"/admin/runs/{run_id}")).text()
    conn = await asyncpg.connect(postgres_url)
    try:
        rows = await conn.fetch("SELECT row_to_json(s)::text AS t FROM step_runs s")
        runs = await conn.fetch("SELECT row_to_json(r)::text AS t FROM runs r")
    finally:
        await conn.close()
    stored = " ".join(r["t"] for r in [*rows, *runs])
    for text in (str(run), page, stored):
        assert TOKEN not in text and "Tok/en" not in text and "Tok%2Fen" not in text


async def test_inbound_sensitive_query_parameters_stored_redacted(
    make_client: Any, db: Database
) -> None:
    """?token=, ?api_key= … follow the headers' rule: stored, shown by the API and on the
    board as ***, the other parameters as sent."""
    client: Client = await make_client(AP_CONTAINER_TYPE="APP")
    doc = {
        "name": "qry",
        "trigger": {"type": "webhook"},
        "steps": [{"name": "t", "type": "transform", "input": {"q": "{{trigger.query}}"}}],
    }
    fid = (await (await client.post("/api/v1/flows", json=doc)).json())["id"]
    resp = await client.post(f"/api/v1/webhooks/{fid}?token=abc&x=1", json={})
    assert resp.status == 202
    run_id = (await resp.json())["run_id"]
    row = await run_store.get_run(db, uuid.UUID(run_id))
    assert row["trigger"]["query"] == {"token": "***", "x": "1"}
    resp = await client.post(
        f"/api/v1/webhooks/{fid}?api_key=inbound-q1&Access_Token=inbound-q2&sig=ok&page=2",
        json={},
    )
    run_id = (await resp.json())["run_id"]
    row = await run_store.get_run(db, uuid.UUID(run_id))
    assert row["trigger"]["query"] == {
        "api_key": "***",
        "Access_Token": "***",
        "sig": "ok",
        "page": "2",
    }
    shown = await (await client.get(f"/api/v1/flow-runs/{run_id}")).text()
    page = await (await client.get(f"/admin/runs/{run_id}")).text()
    live = await (await client.get(f"/admin/api/runs/{run_id}")).text()
    for text in (shown, page, live, repr(row)):
        assert "inbound-q" not in text
