"""Producer.enqueue_batch: a caller's batch joins the next script call of its shard (one
future per shard, not per job), per-job results returned."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from conveyor.queue import Producer, QueueConfig, QueueFull, QueueUnavailable
from conveyor.queue import keys as k
from tests.queue.servers import free_port


async def test_a_batch_is_one_script_call_with_a_result_per_job(redis: aioredis.Redis) -> None:
    """Ids in order; a repeated dedup key answers with the first job's id; one round trip."""
    producer = Producer(redis)
    jobs = [("a", {"n": 1}, None), ("b", {"n": 2}, "dk"), ("c", b'{"n":3}', "dk")]
    assert await producer.enqueue_batch("runs", jobs) == ["a", "b", "b"]
    assert producer.round_trips == 1
    entries = await redis.xrange(k.ShardKeys("runs", 0).stream)
    assert [(f[b"i"], f[b"p"]) for _, f in entries] == [(b"a", b'{"n":1}'), (b"b", b'{"n":2}')]
    # A job id still queued is not added twice.
    assert await producer.enqueue_batch("runs", [("a", {}, None)]) == ["a"]
    assert await redis.xlen(k.ShardKeys("runs", 0).stream) == 2


async def test_over_the_cap_only_the_jobs_past_it_are_refused(redis: aioredis.Redis) -> None:
    """The cap is checked job by job: the ones that fit are in, the rest get QueueFull."""
    producer = Producer(redis, QueueConfig(max_length=2))
    out = await producer.enqueue_batch("sync", [(f"j{i}", i, None) for i in range(4)])
    assert out[:2] == ["j0", "j1"]
    assert all(isinstance(x, QueueFull) for x in out[2:])
    assert await redis.xlen(k.ShardKeys("sync", 0).stream) == 2


async def test_shards_each_get_their_call_and_results_keep_the_order(
    redis: aioredis.Redis,
) -> None:
    """Jobs spread over shards: one call per shard touched, results in the jobs' order."""
    cfg = QueueConfig(shards=3)
    producer = Producer(redis, cfg)
    ids = [f"job-{i}" for i in range(12)]
    assert await producer.enqueue_batch("runs", [(j, {}, None) for j in ids]) == ids
    touched = {k.shard_for(j, 3) for j in ids}
    assert producer.round_trips == len(touched)
    lengths = [await redis.xlen(sk.stream) for sk in cfg.shard_keys("runs")]
    assert sum(lengths) == 12


async def test_redis_down_is_a_result_not_a_raise() -> None:
    """Unreachable Redis: every job's result is QueueUnavailable (returned, not raised)."""
    client = aioredis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.5)
    try:
        out = await Producer(client).enqueue_batch("runs", [("x", {}, None), ("y", {}, None)])
    finally:
        await client.aclose()
    assert len(out) == 2 and all(isinstance(x, QueueUnavailable) for x in out)


async def test_a_bad_queue_or_job_id_raises(redis: aioredis.Redis) -> None:
    """Caller errors (unknown queue, a job id that is not one line) raise at once."""
    producer = Producer(redis)
    for queue, job_id in (("nope", "a"), ("runs", "a\nb"), ("runs", "")):
        with pytest.raises(ValueError):
            await producer.enqueue_batch(queue, [(job_id, {}, None)])
    assert producer.round_trips == 0


async def test_a_batch_coalesces_with_single_enqueues_and_other_batches(
    redis: aioredis.Redis,
) -> None:
    """Batches and single enqueues made together share one script call (the chained enqueues
    of two insert batches in flight at once go as one), each caller getting its own results."""
    producer = Producer(redis)
    one, b1, b2 = await asyncio.gather(
        producer.enqueue("runs", {}, job_id="single"),
        producer.enqueue_batch("runs", [("x1", {}, None), ("x2", {}, None)]),
        producer.enqueue_batch("runs", [("y1", {}, None), ("x1", {}, None)]),
    )
    assert (one, b1, b2) == ("single", ["x1", "x2"], ["y1", "x1"])
    assert producer.round_trips == 1
    assert await redis.xlen(k.ShardKeys("runs", 0).stream) == 4
