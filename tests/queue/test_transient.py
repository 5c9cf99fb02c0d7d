"""Backend-down retries: only real connection failures count as "backend down", and even those
retries are capped in wall time, so every job eventually spends deliveries and can be
dead-lettered."""

from __future__ import annotations

import asyncio
import dataclasses
import socket

import asyncpg
import redis.asyncio as aioredis

from conveyor.engine.worker import backend_down
from conveyor.queue import Consumer, Job, Producer, QueueConfig
from tests.polling import eventually


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _raised(coro: object) -> Exception:
    try:
        await coro  # type: ignore[misc]
    except Exception as exc:
        return exc
    raise AssertionError("no exception")


async def _sleepy() -> None:
    await asyncio.sleep(10)  # the operation that times out


async def test_real_connection_failures_are_backend_down() -> None:
    """A refused PostgreSQL or Redis connection (real clients, closed loopback ports) is
    "backend down"; a timeout, a broken pipe, a missing file or an asyncpg misuse is not."""
    port = _free_port()
    refused = await _raised(asyncpg.connect(f"postgresql://x@127.0.0.1:{port}/x", timeout=5))
    assert isinstance(refused, OSError)
    assert backend_down(refused) == "postgres"
    client = aioredis.Redis(port=port, socket_connect_timeout=2)
    try:
        assert backend_down(await _raised(client.ping())) == "redis"
    finally:
        await client.aclose()
    timeout = await _raised(asyncio.wait_for(_sleepy(), 0.01))  # e.g. a sandbox spawn wait
    assert isinstance(timeout, TimeoutError)
    assert backend_down(timeout) is None
    missing = await _raised(asyncio.to_thread(open, "/nonexistent/conveyor-test"))
    assert backend_down(missing) is None
    assert backend_down(BrokenPipeError()) is None
    assert backend_down(asyncpg.exceptions.InterfaceError("cannot call this now")) is None
    assert backend_down(asyncpg.exceptions.CannotConnectNowError("starting up")) == "postgres"


async def test_backend_down_retries_are_capped(redis: aioredis.Redis, cfg: QueueConfig) -> None:
    """A job whose handler always fails with what the classifier calls "backend down" is
    retried without spending deliveries only for ``transient_retry_max_s``, then spends them
    and reaches the dead letters (it used to come back every few seconds forever)."""
    short = dataclasses.replace(cfg, transient_retry_max_s=0.5, max_deliveries=2)
    calls: list[int] = []

    async def handler(job: Job) -> None:
        calls.append(job.attempt)
        raise ConnectionRefusedError("the database never comes back")

    await Producer(redis, short).enqueue("runs", {}, job_id="stuck")
    consumer = Consumer(redis, handler, short, transient=lambda _e: "postgres", name="capped")
    async with consumer:
        await eventually(
            lambda: consumer.dead_lettered, timeout_s=30, interval_s=0.05,
            what="the job dead-lettered",
        )  # fmt: skip
    (sk,) = short.shard_keys("runs")
    (dead,) = await redis.xrange(sk.dead)
    assert b"[backend down since " in dead[1][b"e"]
    # Retried for free first (more calls than deliveries), then the deliveries were spent.
    assert len(calls) > short.max_deliveries
