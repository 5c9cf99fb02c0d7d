"""Stats from Redis itself, and the board's sampled history."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from conveyor.queue import Consumer, Job, Producer, QueueAdmin, QueueConfig, Sampler
from conveyor.queue import keys as k
from conveyor.queue.stats import sample
from tests.polling import eventually


async def _noop(job: Job) -> None:
    return None


async def test_stats_count_every_state(redis: aioredis.Redis) -> None:
    """waiting, active, delayed, dead, completed, lag and throughput add up."""
    producer = Producer(redis)
    admin = QueueAdmin(redis)
    for i in range(3):
        await producer.enqueue("runs", {}, job_id=f"done{i}")
    await Consumer(redis, _noop).drain()
    for i in range(4):
        await producer.enqueue("runs", {}, job_id=f"w{i}")
    await redis.xreadgroup(k.GROUP, "w1", {k.ShardKeys("runs", 0).stream: ">"}, count=1)
    await producer.enqueue("runs", {}, job_id="later", delay_s=60)
    st = await admin.stats("runs")
    assert (st.waiting, st.active, st.delayed, st.dead, st.completed) == (3, 1, 1, 0, 3)
    assert st.lag == 3
    assert st.throughput_1m == 3
    assert st.consumers >= 1
    assert st.oldest_wait_s >= 0
    empty = await admin.stats("sync")
    assert (empty.waiting, empty.active, empty.throughput_1m, empty.oldest_wait_s) == (0, 0, 0, 0)


async def test_wait_times_come_from_stream_ids(redis: aioredis.Redis) -> None:
    """Oldest waiting age and average wait derive from the entries' millisecond ids."""
    producer = Producer(redis)
    await producer.enqueue("runs", {}, job_id="old")
    await asyncio.sleep(0.05)  # time gap: the entry has waited at least this long
    st = await QueueAdmin(redis).stats("runs")
    assert st.oldest_wait_s >= 0.04
    await Consumer(redis, _noop).drain()
    st = await QueueAdmin(redis).stats("runs")
    assert st.avg_wait_s >= 0.04 and st.oldest_wait_s == 0


async def test_sampler_records_one_point_per_slot(redis: aioredis.Redis) -> None:
    """Two processes sampling the same slot record one point; history is capped, oldest first."""
    cfg = QueueConfig(sample_interval_s=3600, history_length=3)
    assert await sample(redis, cfg) == 2
    assert await sample(redis, cfg) == 0
    admin = QueueAdmin(redis, cfg)
    points = await admin.history("runs")
    assert len(points) == 1 and points[0]["waiting"] == 0
    for i in range(5):
        await redis.lpush(k.history("runs"), b'{"t": %d}' % i)
    await redis.delete(*[key async for key in redis.scan_iter(match=b"conveyor:*lock*")])
    await sample(redis, cfg)
    assert len(await admin.history("runs")) == 3


async def test_sampler_runs_in_the_background(redis: aioredis.Redis) -> None:
    """A started Sampler records a first point at once and stops cleanly on close."""
    cfg = QueueConfig(sample_interval_s=60)
    async with Sampler(redis, cfg):

        async def sampled() -> int:
            return int(await redis.llen(k.history("sync")))

        await eventually(sampled, timeout_s=2, interval_s=0.01, what="a first sampled point")
    assert len(await QueueAdmin(redis, cfg).history("sync")) == 1
