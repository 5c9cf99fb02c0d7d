"""The blocking read after an empty exact FETCH asks each stream for its share of the free
slots (XREADGROUP's COUNT is per stream): entries landing on both streams between the FETCH
and the XREADGROUP BLOCK are not taken twice over the free slots, where they would wait in
the consumer's buffer (sync jobs behind runs jobs, and out of other workers' reach)."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import redis.asyncio as aioredis

from conveyor.queue import Consumer, Job, Producer, QueueConfig
from conveyor.queue.scripts import FETCH


class _Racing(aioredis.Redis):
    arm: Any = None

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        reply = await super().execute_command(*args, **options)
        name = args[0] if isinstance(args[0], str) else args[0].decode()
        if name.upper() == "EVALSHA" and str(args[1]) == FETCH.sha and not reply and self.arm:
            arm, self.arm = self.arm, None
            await arm()  # entries land on both streams right after the empty FETCH
        return reply


async def test_the_blocking_read_takes_no_more_than_the_free_slots(
    redis: aioredis.Redis, redis_url: str, cfg: QueueConfig
) -> None:
    producer = Producer(redis, cfg)
    gate = asyncio.Event()
    client = _Racing.from_url(redis_url, decode_responses=False)

    async def handler(job: Job) -> None:
        await gate.wait()

    async def fill() -> None:
        await asyncio.gather(
            *(producer.enqueue("runs", {}, job_id=f"r{i}") for i in range(10)),
            *(producer.enqueue("sync", {}, job_id=f"s{i}") for i in range(10)),
        )

    conf = dataclasses.replace(cfg, concurrency=4, block_ms=2000)
    consumer = Consumer(client, handler, conf)
    most = 0
    try:
        client.arm = fill
        await consumer.start()
        for _ in range(100):
            most = max(most, consumer.busy)
            await asyncio.sleep(0.002)
    finally:
        gate.set()
        await consumer.close()
        await client.aclose()
    assert most <= conf.concurrency
