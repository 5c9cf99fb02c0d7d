"""Producer: durable, coalesced, deduplicated, capped enqueues."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from conveyor.queue import Producer, QueueConfig, QueueFull, QueueUnavailable
from conveyor.queue import keys as k
from conveyor.queue.consumer import Consumer
from conveyor.queue.job import Job
from tests.queue.servers import free_port


async def test_enqueue_writes_one_stream_entry_with_the_payload(redis: aioredis.Redis) -> None:
    """An enqueued job is one stream entry carrying its id and JSON payload."""
    producer = Producer(redis)
    job_id = await producer.enqueue("runs", {"a": 1}, job_id="run-1")
    assert job_id == "run-1"
    entries = await redis.xrange(k.ShardKeys("runs", 0).stream)
    assert len(entries) == 1
    assert entries[0][1] == {b"i": b"run-1", b"p": b'{"a":1}'}


async def test_concurrent_enqueues_coalesce_into_few_round_trips(redis: aioredis.Redis) -> None:
    """Hundreds of concurrent enqueues travel in a handful of script calls, all durable."""
    producer = Producer(redis)
    ids = await asyncio.gather(*(producer.enqueue("runs", i, job_id=f"j{i}") for i in range(500)))
    assert ids == [f"j{i}" for i in range(500)]
    assert producer.round_trips <= 5
    assert await redis.xlen(k.ShardKeys("runs", 0).stream) == 500


async def test_dedup_key_returns_the_first_job_id(redis: aioredis.Redis) -> None:
    """A repeated dedup key within the window adds nothing and returns the first job's id."""
    producer = Producer(redis)
    first = await producer.enqueue("runs", {}, job_id="a", dedup_key="order-7")
    again = await producer.enqueue("runs", {}, job_id="b", dedup_key="order-7")
    assert (first, again) == ("a", "a")
    assert await redis.xlen(k.ShardKeys("runs", 0).stream) == 1


async def test_same_job_id_is_not_enqueued_twice_while_live(redis: aioredis.Redis) -> None:
    """Enqueueing a job id the queue still holds (e.g. a reconciler race) adds no second entry."""
    producer = Producer(redis)
    await producer.enqueue("runs", {}, job_id="x")
    await producer.enqueue("runs", {}, job_id="x")
    assert await redis.xlen(k.ShardKeys("runs", 0).stream) == 1


async def test_backlog_over_the_cap_raises_queue_full(redis: aioredis.Redis) -> None:
    """Past max_length waiting + delayed jobs the producer refuses with QueueFull, never drops."""
    cfg = QueueConfig(max_length=5)
    producer = Producer(redis, cfg)
    for i in range(4):
        await producer.enqueue("runs", i, job_id=f"w{i}")
    await producer.enqueue("runs", 4, job_id="d0", delay_s=60)
    with pytest.raises(QueueFull) as info:
        await producer.enqueue("runs", 5, job_id="over")
    assert info.value.retry_after_s == 1
    assert await redis.xlen(k.ShardKeys("runs", 0).stream) == 4

    async def handler(job: Job) -> None:
        return None

    await Consumer(redis, handler, cfg, queues=["runs"]).drain()
    assert await producer.enqueue("runs", 5, job_id="fits-now") == "fits-now"


async def test_unreachable_redis_raises_queue_unavailable() -> None:
    """With Redis down the producer raises the typed QueueUnavailable, not a socket error."""
    client = aioredis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.5)
    try:
        with pytest.raises(QueueUnavailable):
            await Producer(client).enqueue("runs", {}, job_id="lost")
    finally:
        await client.aclose()


async def test_delayed_job_waits_in_the_delayed_set(redis: aioredis.Redis) -> None:
    """delay_s puts the job in the delayed set, not the stream, until it is due."""
    await Producer(redis).enqueue("runs", {"x": 1}, job_id="later", delay_s=30)
    sk = k.ShardKeys("runs", 0)
    assert await redis.xlen(sk.stream) == 0
    assert await redis.zscore(sk.delayed, "later") is not None


async def test_bytes_payload_is_stored_as_given(redis: aioredis.Redis) -> None:
    """Pre-encoded JSON bytes are stored verbatim (the API hands over what it received)."""
    await Producer(redis).enqueue("sync", b'{"raw": true}', job_id="b1")
    entries = await redis.xrange(k.ShardKeys("sync", 0).stream)
    assert entries[0][1][b"p"] == b'{"raw": true}'


async def test_unknown_queue_is_rejected(redis: aioredis.Redis) -> None:
    """Only the runs and sync queues exist."""
    with pytest.raises(ValueError, match="unknown queue"):
        await Producer(redis).enqueue("nope", {}, job_id="z")


async def test_shards_spread_jobs_and_consumers_read_them_all(redis: aioredis.Redis) -> None:
    """With several shards, jobs spread across streams and one consumer drains every shard."""
    cfg = QueueConfig(shards=3, concurrency=16)
    producer = Producer(redis, cfg)
    await asyncio.gather(*(producer.enqueue("runs", i, job_id=f"s{i}") for i in range(60)))
    lengths = [await redis.xlen(sk.stream) for sk in k.shard_keys("runs", 3)]
    assert sum(lengths) == 60 and all(n > 0 for n in lengths)
    seen: list[str] = []

    async def handler(job: Job) -> None:
        seen.append(job.id)

    await Consumer(redis, handler, cfg).drain()
    assert sorted(seen) == sorted(f"s{i}" for i in range(60))


async def test_job_id_must_be_one_nonempty_line(redis: aioredis.Redis) -> None:
    """Empty or multi-line job ids are refused before anything reaches Redis."""
    producer = Producer(redis)
    for bad in ("", "a\nb"):
        with pytest.raises(ValueError, match="job_id"):
            await producer.enqueue("runs", {}, job_id=bad)
    assert producer.round_trips == 0
