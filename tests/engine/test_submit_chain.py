"""Submitter: the enqueue is chained to the insert's group commit (one script call per
insert batch and queue), with the same outcomes as before for full, down and repeated."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio as aioredis

from conveyor.engine.submit import OnFull, Submitter
from conveyor.ids import uuid7
from conveyor.queue import Producer, QueueConfig, QueueFull
from conveyor.queue import keys as k
from conveyor.store import flows as flow_store
from conveyor.store.db import Database
from conveyor.store.runs import NewRun, RunWriter
from tests.queue.servers import free_port

DOC = {"name": "s", "trigger": {"type": "webhook"}, "steps": []}


async def _flow(db: Database) -> uuid.UUID:
    return (await flow_store.create_flow(db, f"s-{uuid.uuid4().hex[:8]}", DOC)).id


async def _rows(db: Database) -> set[uuid.UUID]:
    async with db.writer() as conn:
        return {r["id"] for r in await conn.fetch("SELECT id FROM runs")}


async def test_one_insert_batch_is_one_enqueue_per_queue(
    db: Database, redis: aioredis.Redis
) -> None:
    """Concurrent submissions on two queues: every run is a row and a job, and the jobs went
    in one script call per queue."""
    fid = await _flow(db)
    writer, producer = RunWriter(db), Producer(redis)
    sub = Submitter(writer, producer)
    news = [NewRun(uuid7(), fid, 1, {"i": i}, queue="sync" if i % 2 else "runs") for i in range(20)]
    try:
        out = await asyncio.gather(*(sub.submit(n, on_full=OnFull.REFUSE) for n in news))
    finally:
        await writer.close()
    assert all(s.created and s.enqueued for s in out)
    assert producer.round_trips == 2
    assert await _rows(db) == {n.id for n in news}
    for queue in ("runs", "sync"):
        assert await redis.xlen(k.ShardKeys(queue, 0).stream) == 10


async def test_full_backlog_in_one_batch_refuses_only_the_runs_past_the_cap(
    db: Database, redis: aioredis.Redis
) -> None:
    """A batch over the cap: the runs that fit are queued; the rest are refused (rows deleted,
    QueueFull) under REFUSE, or kept QUEUED and not enqueued under DEFER."""
    fid = await _flow(db)
    writer, producer = RunWriter(db), Producer(redis, QueueConfig(max_length=2))
    sub = Submitter(writer, producer)
    news = [NewRun(uuid7(), fid, 1, {}) for _ in range(4)]
    deferred = NewRun(uuid7(), fid, 1, {})
    try:
        out = await asyncio.gather(
            *(sub.submit(n, on_full=OnFull.REFUSE) for n in news), return_exceptions=True
        )
        later = await sub.submit(deferred, on_full=OnFull.DEFER)
    finally:
        await writer.close()
    accepted = [n.id for n, o in zip(news, out, strict=True) if not isinstance(o, BaseException)]
    assert len(accepted) == 2
    assert sum(isinstance(o, QueueFull) for o in out) == 2
    assert later.created and not later.enqueued and later.outage is None
    assert await _rows(db) == {*accepted, deferred.id}


async def test_redis_down_keeps_the_row_and_reports_the_outage(db: Database) -> None:
    """Redis unreachable: the run is committed, not enqueued, and the outage is carried."""
    fid = await _flow(db)
    client = aioredis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.5)
    writer = RunWriter(db)
    new = NewRun(uuid7(), fid, 1, {})
    try:
        got = await Submitter(writer, Producer(client)).submit(new, on_full=OnFull.REFUSE)
    finally:
        await writer.close()
        await client.aclose()
    assert got.created and not got.enqueued and got.outage is not None
    assert await _rows(db) == {new.id}


async def test_an_unknown_queue_is_raised_with_the_row_committed(
    db: Database, redis: aioredis.Redis
) -> None:
    """A caller error in the enqueue still surfaces as the exception it was."""
    fid = await _flow(db)
    writer = RunWriter(db)
    try:
        with pytest.raises(ValueError):
            await Submitter(writer, Producer(redis)).submit(
                NewRun(uuid7(), fid, 1, {}, queue="nope"), on_full=OnFull.REFUSE
            )
    finally:
        await writer.close()


class _SyncBreaks(Producer):
    """A producer whose batch enqueue on the sync queue breaks (a programming error)."""

    async def enqueue_batch(self, queue, jobs):  # type: ignore[no-untyped-def]
        if queue == "sync":
            raise RuntimeError("the sync enqueue broke")
        return await super().enqueue_batch(queue, jobs)


async def test_one_queue_failing_fails_only_its_own_runs(
    db: Database, redis: aioredis.Redis
) -> None:
    """One insert batch on both queues, the sync queue's enqueue raising: the runs of the
    runs queue are enqueued as usual; only the sync runs get the error."""
    fid = await _flow(db)
    writer = RunWriter(db)
    sub = Submitter(writer, _SyncBreaks(redis))
    news = [NewRun(uuid7(), fid, 1, {"i": i}, queue="sync" if i % 2 else "runs") for i in range(6)]
    try:
        out = await asyncio.gather(
            *(sub.submit(n, on_full=OnFull.REFUSE) for n in news), return_exceptions=True
        )
    finally:
        await writer.close()
    for new, result in zip(news, out, strict=True):
        if new.queue == "sync":
            assert isinstance(result, RuntimeError)
        else:
            assert not isinstance(result, BaseException) and result.enqueued
    assert await redis.xlen(k.ShardKeys("runs", 0).stream) == 3
