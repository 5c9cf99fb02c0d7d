"""A repeat of an Idempotency-Key whose first run the full backlog refused is refused too."""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from conveyor.app import SUBMITTER
from conveyor.store.db import Database

FLOW = {
    "name": "hook",
    "trigger": {"type": "webhook"},
    "steps": [{"name": "t", "type": "transform", "input": {"b": "{{trigger.body}}"}}],
}


async def _lock_waiters(conn: asyncpg.Connection, n: int) -> None:
    """Until ``n`` statements wait for the lock on ``runs``."""
    bound = time.monotonic() + 10
    q = "SELECT count(*) FROM pg_locks WHERE relation = 'runs'::regclass AND NOT granted"
    while await conn.fetchval(q) < n:
        assert time.monotonic() < bound, "the insert batches never reached PostgreSQL"
        await asyncio.sleep(0.01)


async def test_same_key_in_one_batch_refused_alike(
    make_client: Any, db: Database, redis: aioredis.Redis, postgres_url: str
) -> None:
    """Two requests with one Idempotency-Key in one insert batch, backlog full: the first
    run is refused (429, row deleted), and so is the second — not a 202 replay of the run
    that no longer exists (nor a 404 when the row is already gone)."""
    c = await make_client(AP_CONTAINER_TYPE="APP", AP_QUEUE_MAX_LENGTH="1")
    resp = await c.post("/api/v1/flows", json=FLOW)
    fid = (await resp.json())["id"]
    url = f"/api/v1/webhooks/{fid}"
    assert (await c.post(url, json={})).status == 202  # the backlog is full now

    lock = await asyncpg.connect(postgres_url)
    try:
        tx = lock.transaction()
        await tx.start()
        await lock.execute("LOCK TABLE runs IN SHARE MODE")  # inserts wait
        # Two fillers take the writer's two insert slots (each waits on the lock) …
        fillers = [asyncio.create_task(c.post(url, json={"n": 1}))]
        await _lock_waiters(lock, 1)
        fillers.append(asyncio.create_task(c.post(url, json={"n": 2})))
        await _lock_waiters(lock, 2)
        # … so both repeats of the key wait for a slot together: one batch.
        headers = {"Idempotency-Key": "k-1"}
        same = [asyncio.create_task(c.post(url, json={"x": 1}, headers=headers)) for _ in range(2)]
        await asyncio.sleep(0.3)
        await tx.rollback()
    finally:
        await lock.close()
    answers = [await t for t in (*fillers, *same)]
    statuses = [r.status for r in answers]
    bodies = [await r.json() for r in answers[2:]]
    assert statuses == [429, 429, 429, 429], (statuses, bodies)
    assert all(b["error"]["code"] == "QUEUE_FULL" for b in bodies)
    assert all(r.headers["Retry-After"] == "1" for r in answers)
    async with db.writer() as conn:
        assert await conn.fetchval("SELECT count(*) FROM runs") == 1
    assert await redis.xlen("conveyor:{runs:0}:stream") == 1

    # What the refusals are remembered by holds none of the refused requests' data (a
    # remembered exception's traceback kept each request's frames, trigger and body alive).
    seen, todo, sizes = set(), [c.app[SUBMITTER]._refused], 0
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, type):
            continue
        seen.add(id(obj))
        assert not isinstance(obj, BaseException), obj
        if isinstance(obj, (bytes, str)):
            sizes += len(obj)
        todo.extend(gc.get_referents(obj))
    assert seen and sizes < 200, sizes

    # Room again: a retry of the key gets a run of its own.
    await redis.flushdb()
    retry = await c.post(url, json={"x": 1}, headers={"Idempotency-Key": "k-1"})
    assert retry.status == 202, await retry.text()
    again = await c.post(url, json={"x": 1}, headers={"Idempotency-Key": "k-1"})
    assert again.status == 202 and (await again.json())["idempotent_replay"] is True
    assert again.headers["x-run-id"] == retry.headers["x-run-id"]
