"""Round trips of a consumer under a moderate load: entries arriving one at a time cost one
blocking read each (no empty non-blocking read first), a blocking read never takes more
entries than there are free slots, and acknowledgements finishing a few at a time share
a script call."""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from typing import Any

import redis.asyncio as aioredis

from conveyor.queue import Consumer, Job, Producer, QueueConfig
from conveyor.queue import keys as k
from conveyor.queue.scripts import ACK, FETCH


class _Counting(aioredis.Redis):
    """A real client that counts the commands (scripts by name) it sends."""

    calls: Counter[str]

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        name = args[0] if isinstance(args[0], str) else args[0].decode()
        if name.upper() == "EVALSHA":
            name = {FETCH.sha: "FETCH", ACK.sha: "ACK"}.get(str(args[1]), "script")
        self.calls[name.upper()] += 1
        return await super().execute_command(*args, **options)


def _client(redis_url: str) -> _Counting:
    client = _Counting.from_url(redis_url, decode_responses=False)
    client.calls = Counter()
    return client


async def _until(cond: Any, timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while True:
            if cond():
                return
            await asyncio.sleep(0.002)


async def test_entries_arriving_one_by_one_cost_one_read_each(
    redis: aioredis.Redis, redis_url: str, cfg: QueueConfig
) -> None:
    """After a read that emptied the streams, the next one blocks at once: one XREADGROUP
    per arrival, and the non-blocking FETCH is not called again."""
    client = _client(redis_url)
    producer = Producer(redis, cfg)
    done: list[str] = []

    async def handler(job: Job) -> None:
        done.append(job.id)

    consumer = Consumer(client, handler, dataclasses.replace(cfg, block_ms=2000))
    try:
        await consumer.start()
        await producer.enqueue("sync", {}, job_id="first")
        await _until(lambda: done == ["first"])
        client.calls.clear()
        for i in range(10):
            await producer.enqueue("sync" if i % 2 else "runs", {}, job_id=f"j{i}")
            await _until(lambda n=i: len(done) == n + 2)
        await asyncio.sleep(0.05)
    finally:
        await consumer.close()
        await client.aclose()
    assert client.calls["FETCH"] == 0
    # One blocking read per arrival (plus the one waiting now, maybe already counted).
    assert 10 <= client.calls["XREADGROUP"] <= 11


async def test_a_blocking_read_at_once_never_takes_more_than_the_free_slots(
    redis: aioredis.Redis, cfg: QueueConfig
) -> None:
    """Both streams filled while the consumer waits: however many entries there are, it
    never holds more than its concurrency, sync entries first."""
    producer = Producer(redis, cfg)
    gate = asyncio.Event()
    started: list[str] = []
    most = 0

    async def handler(job: Job) -> None:
        started.append(job.id)
        await gate.wait()

    conf = dataclasses.replace(cfg, concurrency=4, block_ms=2000)
    consumer = Consumer(redis, handler, conf)
    try:
        await consumer.start()
        await producer.enqueue("runs", {}, job_id="warm")
        await _until(lambda: started == ["warm"])
        gate.set()
        await _until(lambda: consumer.busy == 0)
        gate.clear()
        started.clear()
        # One script call adds both streams' entries at once, as far as the reader goes.
        await asyncio.gather(
            *(producer.enqueue("runs", {}, job_id=f"r{i}") for i in range(10)),
            *(producer.enqueue("sync", {}, job_id=f"s{i}") for i in range(10)),
        )
        for _ in range(50):
            most = max(most, consumer.busy)
            await asyncio.sleep(0.002)
        gate.set()
        await _until(lambda: len(started) == 20)
    finally:
        gate.set()
        await consumer.close()
    assert most <= 4
    assert sorted(started) == sorted([f"r{i}" for i in range(10)] + [f"s{i}" for i in range(10)])


async def test_acknowledgements_finishing_apart_share_a_call(
    redis: aioredis.Redis, redis_url: str, cfg: QueueConfig
) -> None:
    """Handlers finishing a few loop turns apart are acknowledged by one ACK call (they
    linger for each other), and every entry does leave the stream."""
    client = _client(redis_url)
    producer = Producer(redis, cfg)
    await asyncio.gather(*(producer.enqueue("runs", {}, job_id=f"a{i}") for i in range(3)))

    async def handler(job: Job) -> None:
        for _ in range(4 * int(job.id[1:])):
            await asyncio.sleep(0)

    try:
        assert await Consumer(client, handler, cfg).drain() == 3
    finally:
        await client.aclose()
    assert client.calls["ACK"] == 1
    sk = k.ShardKeys("runs", 0)
    assert await redis.xlen(sk.stream) == 0
    assert int(await redis.get(sk.count) or 0) == 0
