"""Backends down at ingest: 202 once committed (Redis down), 503 for sync and for PostgreSQL."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from conveyor.embedded import EmbeddedPostgres
from conveyor.engine.reconciler import Reconciler
from conveyor.queue import Location, Producer, QueueConfig
from conveyor.queue.admin import QueueAdmin
from conveyor.store import runs as run_store
from conveyor.store.db import Database
from conveyor.store.runs import RunWriter
from tests.queue.servers import RedisServer

FLOW = {
    "name": "faulty",
    "trigger": {"type": "webhook"},
    "steps": [{"name": "t", "type": "transform", "input": {"a": 1}}],
}


@pytest.fixture
def own_redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server this test may kill (never the shared one)."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.kill()


async def test_redis_down_async_202_sync_503(
    make_client: Any, db: Database, own_redis_server: RedisServer
) -> None:
    """Redis down: async webhooks still get 202 (run committed), sync get 503 and CANCELED;
    once Redis is back the reconciler enqueues the accepted run."""
    client = await make_client(AP_CONTAINER_TYPE="APP", AP_REDIS_URL=own_redis_server.url)
    fid = (await (await client.post("/api/v1/flows", json=FLOW)).json())["id"]
    own_redis_server.kill()

    accepted = await client.post(f"/api/v1/webhooks/{fid}", json={"x": 1})
    assert accepted.status == 202
    run_id = (await accepted.json())["run_id"]
    assert (await run_store.get_run(db, uuid.UUID(run_id)))["status"] == "QUEUED"

    key = {"Idempotency-Key": "order-7"}
    refused = await client.post(f"/api/v1/webhooks/{fid}/sync", json={"x": 2}, headers=key)
    assert refused.status == 503 and refused.headers["Retry-After"] == "1"
    body = await refused.json()
    assert body["error"]["code"] == "UNAVAILABLE"
    rows = await run_store.list_runs(db, status="CANCELED")
    assert len(rows) == 1 and str(rows[0]["id"]) == refused.headers["x-run-id"]
    # The caller's retry with the same key is a new attempt, not a replay of the refusal.
    again = await client.post(f"/api/v1/webhooks/{fid}/sync", json={"x": 2}, headers=key)
    assert again.status == 503 and again.headers["x-run-id"] != refused.headers["x-run-id"]

    own_redis_server.wipe()
    own_redis_server.restart()  # back, and empty
    redis = aioredis.Redis.from_url(own_redis_server.url)
    try:
        writer = RunWriter(db)
        config = QueueConfig()
        rec = Reconciler(
            writer,
            Producer(redis, config),
            QueueAdmin(redis, config),
            flow_timeout_s=600,
            grace_s=0,
        )
        assert (await rec.run_once())["requeued"] == 1
        where = await QueueAdmin(redis, config).locate("runs", [run_id])
        assert where[run_id] is Location.STREAM
        await writer.close()
    finally:
        await redis.aclose()


@pytest.fixture
def own_postgres() -> Iterator[EmbeddedPostgres]:
    """A private PostgreSQL this test may stop (never the shared one)."""
    base = Path(tempfile.mkdtemp(prefix="conveyor-pgfault-"))
    base.chmod(0o755)
    server = EmbeddedPostgres(base / "pg")
    server.start()
    yield server
    server.stop()
    shutil.rmtree(base, ignore_errors=True)


async def test_postgres_down_503_retry_after_5(
    make_client: Any, own_postgres: EmbeddedPostgres
) -> None:
    """PostgreSQL unreachable: webhooks answer 503 with Retry-After: 5 and a JSON error."""
    client = await make_client(AP_CONTAINER_TYPE="APP", AP_POSTGRES_URL=own_postgres.url())
    fid = (await (await client.post("/api/v1/flows", json=FLOW)).json())["id"]
    assert (await client.post(f"/api/v1/webhooks/{fid}", json={})).status == 202
    own_postgres.stop()
    for path in (f"/api/v1/webhooks/{fid}", f"/api/v1/webhooks/{uuid.uuid4()}"):
        resp = await client.post(path, json={})
        assert resp.status == 503, await resp.text()
        assert resp.headers["Retry-After"] == "5"
        assert (await resp.json())["error"]["code"] == "UNAVAILABLE"
    listed = await client.get("/api/v1/flows")
    assert listed.status == 503 and (await listed.json())["error"]["code"] == "UNAVAILABLE"
