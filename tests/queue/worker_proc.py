"""A real worker process for the SIGKILL test: consumes ``runs`` with a slow no-op handler.

Usage: ``python -m tests.queue.worker_proc REDIS_URL CONCURRENCY SLEEP_S``. It prints
``ready`` once consuming, then runs until killed.
"""

from __future__ import annotations

import asyncio
import sys

import redis.asyncio as aioredis
import uvloop

from conveyor.queue import Consumer, Job, QueueConfig


async def main(url: str, concurrency: int, sleep_s: float) -> None:
    client = aioredis.Redis.from_url(url, decode_responses=False)

    async def handler(job: Job) -> None:
        await asyncio.sleep(sleep_s)  # the job: slow on purpose, still running when killed

    cfg = QueueConfig(concurrency=concurrency, completed_retention_max_count=100_000)
    consumer = Consumer(client, handler, cfg, queues=["runs"], name="victim")
    await consumer.start()
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3])))
