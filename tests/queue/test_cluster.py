"""Redis Cluster: every script touches one slot, so the queue works under CROSSSLOT rules."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio.cluster import RedisCluster

from conveyor.queue import Consumer, Job, Producer, QueueAdmin, QueueConfig
from tests.polling import eventually
from tests.queue.servers import RedisServer


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[RedisCluster]:
    """A one-node Redis Cluster owning all slots (cross-slot commands are refused)."""
    server = RedisServer(tmp_path / "cluster", fsync="everysec", cluster=True)
    server.start()
    client = RedisCluster(host="127.0.0.1", port=server.port)
    try:
        await client.initialize()
        yield client
    finally:
        await client.aclose()
        server.kill()


@pytest.mark.slow
async def test_queue_round_trip_on_a_cluster(cluster: RedisCluster) -> None:
    """Enqueue, dedup, delay, drain, stats, listings and pause all work on a Cluster."""
    cfg = QueueConfig(shards=2, concurrency=8, delayed_poll_s=0.02, pause_poll_s=0.05)
    producer = Producer(cluster, cfg)  # type: ignore[arg-type]
    await asyncio.gather(*(producer.enqueue("runs", {"i": i}, job_id=f"c{i}") for i in range(20)))
    assert await producer.enqueue("sync", {}, job_id="s1", dedup_key="d") == "s1"
    assert await producer.enqueue("sync", {}, job_id="s2", dedup_key="d") == "s1"
    await producer.enqueue("runs", {}, job_id="late", delay_s=0.1)
    seen: list[str] = []

    async def handler(job: Job) -> None:
        seen.append(job.id)

    consumer = Consumer(cluster, handler, cfg)  # type: ignore[arg-type]
    assert await consumer.drain(wait_delayed_s=5) == 22
    assert seen[0] == "s1" and sorted(seen[1:]) == sorted([*(f"c{i}" for i in range(20)), "late"])
    admin = QueueAdmin(cluster, cfg)  # type: ignore[arg-type]
    st = await admin.stats("runs")
    assert (st.waiting, st.active, st.completed, st.throughput_1m) == (0, 0, 21, 21)
    assert await admin.locate("runs", ["c1"]) == {"c1": None}
    assert len((await admin.list_jobs("runs", "completed", limit=100))[0]) == 21
    await admin.pause("runs")
    await admin.resume("runs")
    async with Consumer(cluster, handler, cfg):  # type: ignore[arg-type]
        await producer.enqueue("runs", {}, job_id="bg")
        await eventually(lambda: "bg" in seen, timeout_s=4, what="bg handled")
