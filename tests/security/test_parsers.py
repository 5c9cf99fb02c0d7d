"""Issue 10, finding 8: parser bombs and hostile bytes get a 4xx or are stored — never a 500.

YAML aliases ("billion laughs") and anchors are refused, documents are parsed off the event
loop within size and time caps, 100k-deep JSON/YAML is a 422, webhook JSON nested deeper
than orjson can encode is kept as text (a webhook is never dropped), raw ``\\xff`` in a
header is stored as U+FFFD, in an ``Idempotency-Key`` it is a 400, and NUL in a flow name or
a query is a 422.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from conveyor.store import runs as run_store
from conveyor.store.db import Database
from tests.api.conftest import make_client

__all__ = ["make_client"]

Client = TestClient[Any, Any]
HOOK = {
    "name": "hook",
    "trigger": {"type": "webhook"},
    "steps": [{"name": "t", "type": "transform", "input": {"b": "{{trigger.body}}"}}],
}
# 302 bytes that expand to 9^9 list elements once aliases are followed.
LAUGHS = (
    "name: lol\ntrigger: {type: webhook}\nsteps: []\n"
    'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    + "".join(
        f"{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]\n"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    )
)
YAML = {"Content-Type": "application/yaml"}


async def _error(resp: Any, status: int) -> dict[str, Any]:
    assert resp.status == status, await resp.text()
    body: dict[str, Any] = await resp.json()
    assert set(body["error"]) >= {"code", "message"}
    return body["error"]


async def test_yaml_alias_bomb_is_refused(make_client: Any) -> None:
    """The nested-alias document gets 422 naming aliases; health answers meanwhile."""
    client: Client = await make_client(AP_CONTAINER_TYPE="APP")
    post = asyncio.ensure_future(client.post("/api/v1/flows", data=LAUGHS, headers=YAML))
    health = await client.get("/healthz")
    assert health.status == 200
    err = await _error(await post, 422)
    message = err["details"][0]["message"]
    assert err["code"] == "FLOW_INVALID" and ("alias" in message or "anchor" in message)


async def test_yaml_anchor_alone_is_refused(make_client: Any) -> None:
    """An anchor without aliases is refused too (it exists only to be aliased)."""
    client: Client = await make_client(AP_CONTAINER_TYPE="APP")
    doc = "name: &n x\ntrigger: {type: webhook}\nsteps: []\n"
    err = await _error(await client.post("/api/v1/flows", data=doc, headers=YAML), 422)
    assert "anchor" in err["details"][0]["message"]


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        ("[" * 100_000 + "]" * 100_000, {"Content-Type": "application/json"}),
        ("[" * 100_000 + "]" * 100_000, {}),
        ("[" * 100_000 + "]" * 100_000, YAML),
        ("a:\n" + "".join(" " * i + "- \n" for i in range(1, 1500)), YAML),
        ('{"a":' * 300 + "1" + "}" * 300, {"Content-Type": "application/json"}),
        ("{" * 100_000, YAML),
    ],
    ids=["json", "untyped", "yaml-flow", "yaml-block", "json-300", "unclosed"],
)
async def test_deep_documents_are_422(make_client: Any, body: str, headers: dict[str, str]) -> None:
    """100k-deep JSON or YAML (and 300-deep JSON) is a 422 FLOW_INVALID, not a 500."""
    client: Client = await make_client(AP_CONTAINER_TYPE="APP")
    err = await _error(await client.post("/api/v1/flows", data=body, headers=headers), 422)
    assert err["code"] == "FLOW_INVALID"


async def test_oversized_document_is_413(make_client: Any) -> None:
    """A flow document over the size cap is refused before it is parsed."""
    client: Client = await make_client(AP_CONTAINER_TYPE="APP")
    resp = await client.post("/api/v1/flows", data=b" " * (5 * 1024 * 1024), headers=YAML)
    assert (await _error(resp, 413))["code"] == "PAYLOAD_TOO_LARGE"


async def test_nul_in_flow_name_or_document_is_422(make_client: Any) -> None:
    """NUL in the name (or anywhere in the document) names its path; NUL in ?name= is 422."""
    client: Client = await make_client(AP_CONTAINER_TYPE="APP")
    err = await _error(await client.post("/api/v1/flows", json={**HOOK, "name": "a\x00b"}), 422)
    assert err["details"][0]["path"] == "name"
    doc = {**HOOK, "description": "x\x00"}
    err = await _error(await client.post("/api/v1/flows", json=doc), 422)
    assert err["details"][0]["path"] == "description"
    await _error(await client.get("/api/v1/flows", params={"name": "a\x00"}), 422)


@pytest.mark.parametrize("depth", [200, 256, 600, 1024, 1500])
async def test_deep_webhook_json_is_stored(make_client: Any, db: Database, depth: int) -> None:
    """Webhook JSON 200–1500 deep is accepted (202) and stored, as text past 128 levels."""
    client: Client = await make_client(AP_CONTAINER_TYPE="APP")
    fid = (await (await client.post("/api/v1/flows", json=HOOK)).json())["id"]
    raw = "[" * depth + "]" * depth
    resp = await client.post(
        f"/api/v1/webhooks/{fid}", data=raw, headers={"Content-Type": "application/json"}
    )
    assert resp.status == 202, await resp.text()
    row = await run_store.get_run(db, uuid.UUID((await resp.json())["run_id"]))
    assert row["trigger"]["body"] == raw


async def test_moderately_deep_webhook_json_stays_parsed(make_client: Any, db: Database) -> None:
    """JSON up to 128 levels is kept parsed."""
    client: Client = await make_client(AP_CONTAINER_TYPE="APP")
    fid = (await (await client.post("/api/v1/flows", json=HOOK)).json())["id"]
    resp = await client.post(f"/api/v1/webhooks/{fid}", data="[" * 100 + "]" * 100,
                             headers={"Content-Type": "application/json"})  # fmt: skip
    row = await run_store.get_run(db, uuid.UUID((await resp.json())["run_id"]))
    assert isinstance(row["trigger"]["body"], list)


async def _raw(client: Client, request: bytes) -> tuple[int, bytes]:
    """Send raw bytes (aiohttp's client refuses non-Latin-1 headers) and read the answer."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(65536), 10)
    finally:
        writer.close()
    status = int(data.split(b" ", 2)[1])
    return status, data


def _request(path: str, *headers: bytes, body: bytes = b"{}") -> bytes:
    lines = [f"POST {path} HTTP/1.1".encode(), b"Host: 127.0.0.1", *headers]
    lines += [b"Content-Type: application/json", f"Content-Length: {len(body)}".encode()]
    lines += [b"Connection: close", b"", body]
    return b"\r\n".join(lines)


async def test_raw_ff_in_header_is_stored_replaced(make_client: Any, db: Database) -> None:
    """A header value with a raw 0xFF byte is accepted and stored with U+FFFD."""
    client: Client = await make_client(AP_CONTAINER_TYPE="APP")
    fid = (await (await client.post("/api/v1/flows", json=HOOK)).json())["id"]
    status, data = await _raw(client, _request(f"/api/v1/webhooks/{fid}", b"X-Odd: a\xffb"))
    assert status == 202, data
    run_id = data.split(b'"run_id":"')[1].split(b'"')[0].decode()
    row = await run_store.get_run(db, uuid.UUID(run_id))
    assert row["trigger"]["headers"]["x-odd"] == "a\ufffdb"


async def test_raw_ff_in_idempotency_key_is_400(make_client: Any) -> None:
    """An Idempotency-Key that is not printable ASCII is a 400 with a JSON error."""
    client: Client = await make_client(AP_CONTAINER_TYPE="APP")
    fid = (await (await client.post("/api/v1/flows", json=HOOK)).json())["id"]
    status, data = await _raw(
        client, _request(f"/api/v1/webhooks/{fid}", b"Idempotency-Key: k\xff")
    )
    assert status == 400 and b"Idempotency-Key" in data
    too_long = await client.post(
        f"/api/v1/webhooks/{fid}", json={}, headers={"Idempotency-Key": "k" * 256}
    )
    assert too_long.status == 400


async def test_nul_in_webhook_query_and_body_is_stored(make_client: Any, db: Database) -> None:
    """NUL in a webhook's query or JSON body is stored (as U+FFFD), never a 500."""
    client: Client = await make_client(AP_CONTAINER_TYPE="APP")
    fid = (await (await client.post("/api/v1/flows", json=HOOK)).json())["id"]
    resp = await client.post(
        f"/api/v1/webhooks/{fid}?q=%00", data=b'{"a\\u0000": "\\u0000"}',
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    assert resp.status == 202, await resp.text()
    row = await run_store.get_run(db, uuid.UUID((await resp.json())["run_id"]))
    assert row["trigger"]["query"] == {"q": "\ufffd"}
    assert row["trigger"]["body"] == {"a\ufffd": "\ufffd"}


@pytest.mark.parametrize("depth", [300, 3000])
async def test_deep_manual_run_body_is_4xx(make_client: Any, depth: int) -> None:
    """A manual run's body too deep to store is a 4xx (the caller is authenticated, told)."""
    client: Client = await make_client(AP_CONTAINER_TYPE="APP")
    fid = (await (await client.post("/api/v1/flows", json=HOOK)).json())["id"]
    raw = "[" * depth + "]" * depth
    resp = await client.post(f"/api/v1/flows/{fid}/run", data=raw)
    assert resp.status in (400, 422), await resp.text()
    ok = await client.post(f"/api/v1/flows/{fid}/run", data="[" * 100 + "]" * 100)
    assert ok.status == 202


async def test_retry_body_that_is_not_an_object_is_400(make_client: Any) -> None:
    """Found by the fuzzer: a retry body that is a list, or nests 3000 deep, is a 400."""
    client: Client = await make_client(AP_CONTAINER_TYPE="APP")
    fid = (await (await client.post("/api/v1/flows", json=HOOK)).json())["id"]
    run_id = (await (await client.post(f"/api/v1/webhooks/{fid}", json={})).json())["run_id"]
    for body in ("[[]]", "[" * 3000 + "]" * 3000, '"FROM_FAILED_STEP"'):
        resp = await client.post(f"/api/v1/flow-runs/{run_id}/retry", data=body)
        assert (await _error(resp, 400))["code"] == "BAD_REQUEST"


async def test_deep_json_bodies_of_other_routes_are_400(make_client: Any) -> None:
    """Secrets and queue admin bodies nested 100k deep are a 400, not a RecursionError 500."""
    client: Client = await make_client(AP_CONTAINER_TYPE="APP")
    deep = "[" * 100_000 + "]" * 100_000
    for method, path in (("PUT", "/api/v1/secrets/DEEP"), ("POST", "/api/v1/queues/runs/clean")):
        resp = await client.request(method, path, data=deep)
        assert (await _error(resp, 400))["code"] == "BAD_REQUEST", path
