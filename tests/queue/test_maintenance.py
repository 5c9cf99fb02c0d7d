"""Retention: trimming never cuts unacknowledged work, dead letters and summaries are capped,
memory levels off under a steady load."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from conveyor.queue import Consumer, Job, Producer, QueueAdmin, QueueConfig, maintenance
from conveyor.queue import keys as k
from tests.queue.servers import RedisServer


async def _noop(job: Job) -> None:
    return None


async def _fail(job: Job) -> None:
    raise RuntimeError("dead on arrival")


async def test_trim_never_cuts_pending_or_undelivered_entries(redis: aioredis.Redis) -> None:
    """With a backlog larger than the retention, trimming removes only acknowledged entries."""
    cfg = QueueConfig(max_length=1000, completed_retention_max_count=10)
    producer = Producer(redis, cfg)
    await asyncio.gather(*(producer.enqueue("runs", {}, job_id=f"t{i}") for i in range(400)))
    sk = k.ShardKeys("runs", 0)
    acked = await redis.xreadgroup(k.GROUP, "fast", {sk.stream: ">"}, count=200)
    await redis.xack(sk.stream, k.GROUP, *[eid for eid, _ in acked[0][1]])
    held = await redis.xreadgroup(k.GROUP, "ghost", {sk.stream: ">"}, count=50)
    unacked = [eid for eid, _ in held[0][1]]
    unacked += [eid for eid, _ in await redis.xrange(sk.stream, f"({unacked[-1].decode()}", "+")]
    assert len(unacked) == 200
    for _ in range(3):
        await maintenance.trim(redis, sk)
    remaining = {eid for eid, _ in await redis.xrange(sk.stream)}
    assert set(unacked) <= remaining
    assert len(remaining) < 400  # acknowledged entries did go
    fast = QueueConfig(concurrency=64, visibility_timeout_s=0.2, heartbeat_s=0.05)
    await Consumer(redis, _noop, fast).drain(wait_pending=True)
    await maintenance.trim(redis, sk)
    assert await redis.xlen(sk.stream) <= 100  # one macro node at most (approximate trim)
    assert (await QueueAdmin(redis).stats("runs")).waiting == 0


async def test_dead_letters_expire_by_count_and_age(redis: aioredis.Redis) -> None:
    """Dead letters past the max count or the age limit go, index entries with them."""
    cfg = QueueConfig(max_deliveries=1, failed_retention_max_count=3)
    producer = Producer(redis, cfg)
    for i in range(5):
        await producer.enqueue("runs", {}, job_id=f"x{i}")
    await Consumer(redis, _fail, cfg).drain()
    sk = k.ShardKeys("runs", 0)
    assert await maintenance.expire_dead(redis, sk, cfg) == 2
    failed, _ = await QueueAdmin(redis, cfg).list_jobs("runs", "failed")
    assert sorted(j.id for j in failed) == ["x2", "x3", "x4"]
    assert await QueueAdmin(redis).locate("runs", ["x0"]) == {"x0": None}
    await asyncio.sleep(0.01)  # time gap: the dead letters are now older than zero days
    zero_days = QueueConfig(failed_retention_days=0)
    assert await maintenance.expire_dead(redis, sk, zero_days) == 3
    assert await redis.hlen(sk.index) == 0


async def test_completed_summaries_are_capped(redis: aioredis.Redis) -> None:
    """Only the newest AP_REDIS_COMPLETED_JOB_RETENTION_MAX_COUNT summaries are kept."""
    cfg = QueueConfig(completed_retention_max_count=5, concurrency=4)
    producer = Producer(redis, cfg)
    for i in range(20):
        await producer.enqueue("runs", {}, job_id=f"c{i}")
    await Consumer(redis, _noop, cfg).drain()
    assert await redis.llen(k.ShardKeys("runs", 0).completed) == 5


@pytest.mark.slow
async def test_memory_levels_off_under_steady_load(tmp_path: Path) -> None:
    """Under steady load used_memory at 8 s is within 10 % of 2.5 s (shortened 2 vs 10 min)."""
    server = RedisServer(tmp_path / "redis", fsync="everysec")
    server.start()
    try:
        client = aioredis.Redis.from_url(server.url, decode_responses=False)
        try:
            await _steady_load(client)
        finally:
            await client.aclose()
    finally:
        server.kill()


async def _steady_load(own_redis: aioredis.Redis) -> None:
    cfg = QueueConfig(
        concurrency=32, trim_interval_s=0.2, visibility_timeout_s=5, heartbeat_s=1, block_ms=100
    )
    producer = Producer(own_redis, cfg)
    stop = asyncio.Event()

    async def load() -> None:
        n = 0
        while not stop.is_set():
            await asyncio.gather(
                *(producer.enqueue("runs", {"n": n + i, "pad": "x" * 200}, job_id=f"m{n + i}")
                  for i in range(100))
            )  # fmt: skip
            n += 100
            await asyncio.sleep(0.05)  # the load's pace (~2000 jobs/s), not a wait

    async def used() -> int:
        return int((await own_redis.info("memory"))["used_memory"])

    async def samples(at_s: float) -> list[int]:
        """Five readings 0.1 s apart from ``at_s`` seconds into the load (a measurement
        schedule: the time under load is what is measured, so these waits are the test)."""
        await asyncio.sleep(max(0.0, at_s - (time.monotonic() - start)))
        out = []
        for _ in range(5):
            await asyncio.sleep(0.1)
            out.append(await used())
        return out

    async with Consumer(own_redis, _noop, cfg):
        loader = asyncio.ensure_future(load())
        start = time.monotonic()
        early = await samples(2.5)
        late = await samples(8)
        stop.set()
        await loader
    e, l_ = sorted(early)[2], sorted(late)[2]
    assert abs(l_ - e) <= 0.10 * e, (early, late)


async def test_idle_consumers_without_pending_are_forgotten(redis: aioredis.Redis) -> None:
    """Consumers of gone processes leave the group once idle with nothing pending."""
    await Producer(redis).enqueue("runs", {}, job_id="held")
    sk = k.ShardKeys("runs", 0)
    await redis.xreadgroup(k.GROUP, "holder", {sk.stream: ">"}, count=1)
    await redis.execute_command("XGROUP", "CREATECONSUMER", sk.stream, k.GROUP, "gone")
    assert await maintenance.forget_idle_consumers(redis, sk, idle_ms=0) == 1
    names = [c["name"] for c in await redis.xinfo_consumers(sk.stream, k.GROUP)]
    assert names == [b"holder"]
