"""Poison jobs against the real engine worker: whatever cannot be understood (no JSON, a run id
that is not a UUID, fields missing) reaches the dead letters after max_deliveries and leaves
nothing pending; a healthy job next to them still runs."""

from __future__ import annotations

import asyncio
import dataclasses

import redis.asyncio as aioredis

from conveyor.engine.registry import FlowRegistry
from conveyor.engine.worker import RunWorker
from conveyor.queue import Producer, QueueAdmin, QueueConfig
from conveyor.queue import keys as k
from conveyor.settings import Settings
from conveyor.store.db import Database
from conveyor.store.runs import RunWriter
from conveyor.store.secrets import SecretBox
from tests.api.conftest import ENCRYPTION_KEY, make_settings


async def test_poison_jobs_are_dead_lettered(
    db: Database, redis: aioredis.Redis, postgres_url: str, redis_url: str
) -> None:
    """Undecodable, non-UUID and incomplete jobs all end in the dead letters, none pending."""
    settings: Settings = make_settings(postgres_url, redis_url, AP_CONTAINER_TYPE="WORKER")
    cfg = dataclasses.replace(
        QueueConfig.from_settings(settings),
        max_deliveries=2,
        backoff_base_s=0.01,
        backoff_cap_s=0.05,
        delayed_poll_s=0.02,
    )
    writer = RunWriter(db)
    worker = RunWorker(
        settings,
        writer=writer,
        registry=FlowRegistry(db),
        box=SecretBox(ENCRYPTION_KEY),
        redis=redis,
        sandbox=None,
        http=None,
        queue_config=cfg,
    )
    sk = k.ShardKeys("runs", 0)
    await redis.xgroup_create(sk.stream, k.GROUP, id="0", mkstream=True)
    await redis.xadd(sk.stream, {b"i": b"garbled", b"p": b"\xff{"})
    await redis.incr(sk.count)
    producer = Producer(redis, cfg)
    await producer.enqueue("runs", {"run_id": "not-a-uuid", "flow_id": "x"}, job_id="bad-id")
    await producer.enqueue("runs", {"flow_id": "x"}, job_id="no-run-id")
    await producer.enqueue("runs", ["not", "an", "object"], job_id="a-list")
    try:
        await asyncio.wait_for(worker.consumer.drain(wait_delayed_s=5, wait_pending=True), 30)
    finally:
        await writer.close()
    failed, _ = await QueueAdmin(redis, cfg).list_jobs("runs", "failed")
    assert sorted(j.id for j in failed) == ["a-list", "bad-id", "garbled", "no-run-id"]
    assert (await redis.xpending(sk.stream, k.GROUP))["pending"] == 0
