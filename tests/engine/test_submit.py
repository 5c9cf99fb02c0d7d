"""Run submission (engine/submit.py): the typed job and the one insert → enqueue → full policy,
against real PostgreSQL and Redis."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from conveyor.engine.submit import OnFull, RunJob, Submitter
from conveyor.ids import uuid7
from conveyor.queue import Producer, QueueConfig, QueueFull
from conveyor.queue import keys as k
from conveyor.store import flows as flow_store
from conveyor.store.db import Database
from conveyor.store.runs import NewRun, RunWriter

DOC = {"name": "s", "trigger": {"type": "webhook"}, "steps": []}


@pytest.fixture
async def make_submitter(
    db: Database, redis: aioredis.Redis
) -> AsyncIterator[Callable[..., Awaitable[Submitter]]]:
    """Submitters over their own writer and producer (queue cap ``max_length``); closed after."""
    made: list[tuple[RunWriter, Producer]] = []

    async def build(max_length: int = 100) -> Submitter:
        writer = RunWriter(db)
        producer = Producer(redis, QueueConfig(max_length=max_length))
        made.append((writer, producer))
        return Submitter(writer, producer)

    yield build
    for writer, producer in made:
        await producer.close()
        await writer.close()


async def _new(db: Database, key: str | None = None) -> NewRun:
    flow = await flow_store.create_flow(db, f"s-{uuid.uuid4().hex[:8]}", DOC)
    return NewRun(uuid7(), flow.id, flow.version, {"body": {"n": 1}}, idempotency_key=key)


async def _run_ids(db: Database) -> set[uuid.UUID]:
    async with db.writer() as conn:
        return {r["id"] for r in await conn.fetch("SELECT id FROM runs")}


async def _jobs(redis: aioredis.Redis) -> list[dict[str, Any]]:
    entries = await redis.xrange(k.ShardKeys("runs", 0).stream)
    return [orjson.loads(fields[b"p"]) for _, fields in entries]


def test_run_job_round_trips_and_leaves_unset_fields_out() -> None:
    """to_payload keeps only what is set; from_payload reads it back to an equal job."""
    job = RunJob(run_id="r", flow_id="f", version=3, trigger={"a": 1}, reply="ch", retry=True)
    payload = job.to_payload()
    assert payload == {
        "run_id": "r",
        "flow_id": "f",
        "version": 3,
        "trigger": {"a": 1},
        "reply": "ch",
        "retry": True,
    }
    assert RunJob.from_payload(payload) == job
    bare = RunJob.from_payload({"run_id": "r", "flow_id": "f", "version": "2"})
    assert bare.to_payload() == {"run_id": "r", "flow_id": "f", "version": 2}
    assert bare.fresh and not RunJob.from_payload({**payload, "resume": True}).fresh


def test_run_job_refuses_a_payload_without_its_run() -> None:
    """A payload missing run_id or with a non-numeric version is an error, not a half job."""
    with pytest.raises(KeyError):
        RunJob.from_payload({"flow_id": "f", "version": 1})
    with pytest.raises(ValueError):
        RunJob.from_payload({"run_id": "r", "flow_id": "f", "version": "x"})


async def test_submit_inserts_then_enqueues_the_typed_job(
    db: Database, redis: aioredis.Redis, make_submitter: Any
) -> None:
    """A new run is a row and one job carrying it; a repeat of its key adds neither."""
    sub = await make_submitter()
    new = await _new(db, key="k1")
    first = await sub.submit(new, on_full=OnFull.REFUSE)
    assert first.created and first.enqueued and first.run_id == new.id
    again = await sub.submit(
        NewRun(uuid7(), new.flow_id, new.flow_version, new.trigger, idempotency_key="k1"),
        on_full=OnFull.REFUSE,
    )
    assert not again.created and not again.enqueued and again.run_id == new.id
    assert await _run_ids(db) == {new.id}
    (job,) = await _jobs(redis)
    assert RunJob.from_payload(job) == RunJob(
        str(new.id), str(new.flow_id), new.flow_version, trigger=new.trigger
    )


async def test_full_backlog_refuse_deletes_the_row(
    db: Database, redis: aioredis.Redis, make_submitter: Any
) -> None:
    """OnFull.REFUSE over the cap raises QueueFull and leaves no row to run later."""
    sub = await make_submitter(max_length=1)
    kept = await sub.submit(await _new(db), on_full=OnFull.REFUSE)
    with pytest.raises(QueueFull):
        await sub.submit(await _new(db), on_full=OnFull.REFUSE)
    assert await _run_ids(db) == {kept.run_id}
    assert len(await _jobs(redis)) == 1


async def test_full_backlog_defer_keeps_the_row_queued(
    db: Database, redis: aioredis.Redis, make_submitter: Any
) -> None:
    """OnFull.DEFER over the cap keeps the QUEUED row (the reconciler's) and enqueues nothing."""
    sub = await make_submitter(max_length=1)
    await sub.submit(await _new(db), on_full=OnFull.DEFER)
    deferred = await sub.submit(await _new(db), on_full=OnFull.DEFER)
    assert deferred.created and not deferred.enqueued and deferred.outage is None
    assert deferred.run_id in await _run_ids(db)
    assert len(await _jobs(redis)) == 1
    again = await sub.resubmit(RunJob(str(deferred.run_id), "f", 1, retry=True))
    assert not again.enqueued and again.outage is None
