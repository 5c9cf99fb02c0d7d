"""A Redis Cluster client raises ``RedisClusterException`` — not a ``RedisError`` — while its
nodes disagree on the slot map or leave slots uncovered (a master's failover; redis-py's
``RedisCluster`` re-initializes outside its retry loop). The consumer treats it as Redis being
unavailable for a moment: one such error neither ends its reads nor its heartbeat (either
stopped for good before, with nothing logged, the process still answering 202)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisClusterException

from conveyor.queue import Consumer, Job, Producer, QueueConfig
from conveyor.queue import consumer as consumer_module
from conveyor.queue.errors import is_unavailable
from tests.polling import eventually
from tests.queue.test_cluster import cluster  # noqa: F401  (the fixture)


def _fail_once(monkeypatch: pytest.MonkeyPatch, name: str, message: str) -> list[int]:
    """Make the consumer's script ``name`` raise one RedisClusterException; returns a list
    that holds an item once it did."""
    real = getattr(consumer_module, name)
    failed: list[int] = []

    async def flaky(redis: Any, keys: Any, args: Any) -> Any:
        if not failed:
            failed.append(1)
            raise RedisClusterException(message)
        return await real(redis, keys, args)

    monkeypatch.setattr(consumer_module, name, flaky)
    return failed


def test_a_slot_map_in_flux_is_redis_unavailable() -> None:
    assert is_unavailable(RedisClusterException("All slots are not covered"))


@pytest.mark.slow
async def test_one_slot_map_error_in_a_read_does_not_stop_consumption(
    cluster: RedisCluster,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = QueueConfig(shards=1, concurrency=4, delayed_poll_s=0.02, pause_poll_s=0.05)
    failed = _fail_once(
        monkeypatch, "FETCH", "startup_nodes could not agree on a valid slots cache"
    )
    seen: list[str] = []

    async def handler(job: Job) -> None:
        seen.append(job.id)

    producer = Producer(cluster, cfg)  # type: ignore[arg-type]
    consumer = Consumer(cluster, handler, cfg)  # type: ignore[arg-type]
    async with consumer:
        await eventually(lambda: bool(failed), timeout_s=4, what="the failing read")
        await asyncio.sleep(0.2)
        assert consumer._main is not None and not consumer._main.done()
        await producer.enqueue("runs", {}, job_id="after")
        await eventually(lambda: "after" in seen, timeout_s=4, what="a job after the error")


@pytest.mark.slow
async def test_one_slot_map_error_in_a_heartbeat_does_not_hang_fenced_writes(
    cluster: RedisCluster,  # noqa: F811
    cfg: QueueConfig,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the conftest's sub-second visibility timeout and heartbeat."""
    _fail_once(monkeypatch, "TOUCH", "All slots are not covered after query all startup_nodes")
    done: list[str] = []

    async def handler(job: Job) -> None:
        await asyncio.sleep(1.0)  # longer than the ownership margin
        await job.ensure_owned()  # a checkpoint's fence
        done.append(job.id)

    producer = Producer(cluster, cfg)  # type: ignore[arg-type]
    async with Consumer(cluster, handler, cfg):  # type: ignore[arg-type]
        await producer.enqueue("runs", {}, job_id="long")
        await eventually(lambda: "long" in done, timeout_s=5, what="the fenced write")
