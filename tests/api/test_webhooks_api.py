"""Webhook ingest: durable 202, 404, 413, signatures, idempotency, raw text bodies."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
import uuid
from typing import Any

import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from conveyor.store import runs as run_store
from conveyor.store.db import Database

FLOW = {
    "name": "hook",
    "trigger": {"type": "webhook"},
    "steps": [{"name": "t", "type": "transform", "input": {"b": "{{trigger.body}}"}}],
}


async def _flow(client: TestClient[Any, Any], doc: dict[str, Any] = FLOW) -> str:
    resp = await client.post("/api/v1/flows", json=doc)
    assert resp.status == 201, await resp.text()
    return str((await resp.json())["id"])


async def test_async_webhook_commits_then_enqueues(
    client: TestClient[Any, Any], db: Database, redis: aioredis.Redis
) -> None:
    """202 with run id only after the run row exists and the job is in the stream."""
    fid = await _flow(client)
    resp = await client.post(f"/api/v1/webhooks/{fid}?x=1", json={"amount": 5})
    assert resp.status == 202
    body = await resp.json()
    assert body["status"] == "QUEUED" and resp.headers["x-run-id"] == body["run_id"]
    row = await run_store.get_run(db, uuid.UUID(body["run_id"]))
    assert row["status"] == "QUEUED"
    assert row["trigger"]["body"] == {"amount": 5} and row["trigger"]["query"] == {"x": "1"}
    assert await redis.xlen("conveyor:{runs:0}:stream") == 1


async def test_malformed_json_kept_as_text(client: TestClient[Any, Any], db: Database) -> None:
    """A JSON content type with a broken body is accepted; the run keeps the raw text."""
    fid = await _flow(client)
    resp = await client.post(
        f"/api/v1/webhooks/{fid}", data=b"{oops", headers={"Content-Type": "application/json"}
    )
    assert resp.status == 202
    row = await run_store.get_run(db, uuid.UUID((await resp.json())["run_id"]))
    assert row["trigger"]["body"] == "{oops"


async def test_unknown_and_disabled_flow_404(client: TestClient[Any, Any]) -> None:
    """Unknown and disabled flows answer 404 with a JSON error."""
    resp = await client.post("/api/v1/webhooks/00000000-0000-7000-8000-000000000000", json={})
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "FLOW_NOT_FOUND"
    fid = await _flow(client)
    await client.post(f"/api/v1/flows/{fid}/disable")
    assert (await client.get(f"/api/v1/webhooks/{fid}")).status == 404


async def test_body_over_limit_413_also_chunked(make_client: Any) -> None:
    """Over AP_MAX_WEBHOOK_PAYLOAD_SIZE_MB: 413, with Content-Length and when chunked."""
    c = await make_client(AP_CONTAINER_TYPE="APP", AP_MAX_WEBHOOK_PAYLOAD_SIZE_MB="1")
    fid = await _flow(c)
    big = b"x" * (1024 * 1024 + 1)
    resp = await c.post(f"/api/v1/webhooks/{fid}", data=big)
    assert resp.status == 413 and (await resp.json())["error"]["code"] == "PAYLOAD_TOO_LARGE"

    async def chunks() -> Any:
        for _ in range(40):
            yield b"y" * 65536

    resp2 = await c.post(f"/api/v1/webhooks/{fid}", data=chunks())
    assert resp2.status == 413


async def test_signature_required(client: TestClient[Any, Any]) -> None:
    """A trigger with a secret needs X-Conveyor-Signature t=<unix>,v1=<HMAC of "t.body">."""
    await client.put("/api/v1/secrets/HOOK_KEY", json={"value": "s3"})
    fid = await _flow(
        client, {**FLOW, "trigger": {"type": "webhook", "secret": "{{secrets.HOOK_KEY}}"}}
    )
    payload = b'{"a":1}'
    assert (await client.post(f"/api/v1/webhooks/{fid}", data=payload)).status == 401
    wrong = await client.post(
        f"/api/v1/webhooks/{fid}", data=payload, headers={"X-Conveyor-Signature": "sha256=00"}
    )
    assert wrong.status == 401
    t = str(int(time.time()))
    sig = f"t={t},v1=" + hmac.new(b"s3", t.encode() + b"." + payload, hashlib.sha256).hexdigest()
    ok = await client.post(
        f"/api/v1/webhooks/{fid}", data=payload, headers={"X-Conveyor-Signature": sig}
    )
    assert ok.status == 202


async def test_idempotency_key_replays_first_answer(
    client: TestClient[Any, Any], redis: aioredis.Redis
) -> None:
    """A repeated Idempotency-Key gets the first status and run id, and enqueues nothing."""
    fid = await _flow(client)
    first = await client.post(f"/api/v1/webhooks/{fid}", json={}, headers={"Idempotency-Key": "a"})
    again = await client.post(f"/api/v1/webhooks/{fid}", json={}, headers={"Idempotency-Key": "a"})
    assert first.status == again.status == 202
    assert first.headers["x-run-id"] == again.headers["x-run-id"]
    assert await redis.xlen("conveyor:{runs:0}:stream") == 1


async def test_backlog_cap_429(make_client: Any, db: Database) -> None:
    """Over AP_QUEUE_MAX_LENGTH: 429 + Retry-After, and no run row is left behind."""
    c = await make_client(AP_CONTAINER_TYPE="APP", AP_QUEUE_MAX_LENGTH="2")
    fid = await _flow(c)
    statuses = [(await c.post(f"/api/v1/webhooks/{fid}", json={})).status for _ in range(4)]
    assert statuses == [202, 202, 429, 429]
    refused = await c.post(f"/api/v1/webhooks/{fid}", json={})
    assert refused.status == 429 and refused.headers["Retry-After"] == "1"
    async with db.writer() as conn:
        assert await conn.fetchval("SELECT count(*) FROM runs") == 2


async def test_nul_bytes_fail_nobody(client: TestClient[Any, Any], db: Database) -> None:
    """A body with NUL characters is accepted, and concurrent neighbours are unaffected."""
    fid = await _flow(client)
    bodies = [b'{"a": "\\u0000x"}', b"text\x00body"] + [b'{"ok": 1}'] * 5
    resps = await asyncio.gather(
        *(
            client.post(
                f"/api/v1/webhooks/{fid}",
                data=b,
                headers={
                    "Content-Type": "application/json" if b.startswith(b"{") else "text/plain"
                },
            )
            for b in bodies
        )
    )
    assert [r.status for r in resps] == [202] * len(bodies)
    first = await run_store.get_run(db, uuid.UUID((await resps[0].json())["run_id"]))
    assert first["trigger"]["body"] == {"a": "\ufffdx"}


async def test_manual_run_refused_leaves_no_run(make_client: Any, db: Database) -> None:
    """A manual run refused with 429 (backlog full) leaves no row to run later."""
    c = await make_client(AP_CONTAINER_TYPE="APP", AP_QUEUE_MAX_LENGTH="1")
    fid = await _flow(c)
    assert (await c.post(f"/api/v1/flows/{fid}/run", json={})).status == 202
    refused = await c.post(f"/api/v1/flows/{fid}/run", json={})
    assert refused.status == 429 and refused.headers["Retry-After"] == "1"
    async with db.writer() as conn:
        assert await conn.fetchval("SELECT count(*) FROM runs") == 1
