"""The Operations service (conveyor/operations.py) built from its dependencies, no application:
operator actions on real PostgreSQL and Redis, refusals as domain errors, not HTTP answers."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis.asyncio as aioredis

from conveyor.engine.registry import FlowRegistry
from conveyor.engine.submit import Submitter
from conveyor.errors import InvalidArgument, NotFound
from conveyor.operations import (
    Operations,
    RunFinished,
    RunNotFinished,
    UnknownJob,
    UnknownQueue,
    check_queue,
)
from conveyor.queue import JobState, Producer, QueueAdmin, QueueConfig
from conveyor.records import StepRecord
from conveyor.status import RunStatus
from conveyor.store import runs as run_store
from conveyor.store.db import Database
from conveyor.store.runs import RunWriter, Transition

DOC = {"name": "ops", "trigger": {"type": "webhook"}, "steps": []}


class Workers:
    """A worker registry reader that records how it was asked."""

    def __init__(self) -> None:
        self.asked: list[bool] = []

    async def __call__(self, *, include_lost: bool) -> list[dict[str, Any]]:
        self.asked.append(include_lost)
        return [{"id": "w1", "lost": False, "concurrency": 4, "busy": 1}]


@dataclass
class Parts:
    """The dependencies the service was built from, for the tests to look through."""

    writer: RunWriter
    registry: FlowRegistry
    workers: Workers


@pytest.fixture
async def parts(db: Database) -> AsyncIterator[Parts]:
    writer = RunWriter(db)
    # A head cached for an hour: only invalidation makes a change visible.
    yield Parts(writer, FlowRegistry(db, head_ttl_s=3600), Workers())
    await writer.close()


@pytest.fixture
async def ops(db: Database, redis: aioredis.Redis, parts: Parts) -> AsyncIterator[Operations]:
    config = QueueConfig()
    producer = Producer(redis, config)
    yield Operations(
        db,
        writer=parts.writer,
        submitter=Submitter(parts.writer, producer),
        registry=parts.registry,
        queues=QueueAdmin(redis, config),
        workers=parts.workers,
    )
    await producer.close()


async def test_a_manual_run_is_queued_and_its_job_enqueued(ops: Operations) -> None:
    flow = await ops.create_flow(DOC)
    run_id = await ops.start_run(flow, {"n": 1})
    row = await run_store.get_run(ops.db, run_id)
    assert (row["status"], row["trigger"]["body"]) == (RunStatus.QUEUED.value, {"n": 1})
    jobs, _ = await ops.queues.list_jobs("runs", JobState.WAITING)
    assert [j.id for j in jobs] == [str(run_id)]


async def test_cancel_then_retry_and_their_refusals(ops: Operations, parts: Parts) -> None:
    """Cancel a queued run; cancelling it again or retrying a live run is a Conflict with its
    own code; an unknown strategy is InvalidArgument; an unknown run NotFound."""
    flow = await ops.create_flow(DOC)
    queued = await ops.start_run(flow, None)
    with pytest.raises(RunNotFinished, match="only finished runs retry") as not_finished:
        await ops.retry_run(queued, "FROM_FAILED_STEP")
    assert not_finished.value.code == "RUN_NOT_FINISHED"
    assert (await ops.cancel_run(queued))["status"] == RunStatus.CANCELED.value
    other = await ops.start_run(flow, None)
    assert await parts.writer.transition(Transition(other, RunStatus.SUCCEEDED))
    with pytest.raises(RunFinished, match="already ended as SUCCEEDED") as finished:
        await ops.cancel_run(other)
    assert finished.value.code == "RUN_FINISHED"
    with pytest.raises(InvalidArgument, match="strategy must be one of") as bad:
        await ops.retry_run(other, "BOGUS")
    assert bad.value.code == "BAD_REQUEST"
    with pytest.raises(NotFound):
        await ops.cancel_run(uuid.uuid4())
    row = await ops.retry_run(queued, "ON_LATEST_VERSION")
    assert row["status"] == RunStatus.QUEUED.value


async def test_flow_changes_reach_the_cached_head(ops: Operations, parts: Parts) -> None:
    """Update, disable and delete invalidate the registry's head (cached for an hour here)."""
    flow = await ops.create_flow(DOC)
    registry = parts.registry
    head = await registry.head(flow.id)
    assert head is not None and (head.version, head.enabled) == (1, True)
    await ops.update_flow(flow.id, {**DOC, "steps": []})
    head = await registry.head(flow.id)
    assert head is not None and head.version == 2
    await ops.set_flow_enabled(flow.id, False)
    head = await registry.head(flow.id)
    assert head is not None and head.enabled is False
    await ops.delete_flow(flow.id)
    assert await registry.head(flow.id) is None


async def test_unknown_queues_and_jobs_are_not_found(ops: Operations) -> None:
    assert check_queue("sync") == "sync"
    with pytest.raises(UnknownQueue, match="queues are") as queue:
        check_queue("nope")
    assert (queue.value.code, isinstance(queue.value, NotFound)) == ("QUEUE_NOT_FOUND", True)
    with pytest.raises(UnknownJob, match="no failed job 'zzz'") as job:
        await ops.retry_dead_job("runs", "zzz")
    assert job.value.code == "JOB_NOT_FOUND"
    with pytest.raises(UnknownJob, match="no job 'zzz'"):
        await ops.delete_job("runs", "zzz")
    assert await ops.retry_all_dead("runs") == 0


async def test_unknown_queues_are_refused_by_the_service_itself(ops: Operations) -> None:
    """Not only the handlers check the queue: the service refuses an unknown one too."""
    for call in (
        ops.retry_dead_job("nope", "x"),
        ops.delete_job("nope", "x"),
        ops.retry_all_dead("nope"),
    ):
        with pytest.raises(UnknownQueue):
            await call


@pytest.mark.parametrize("ended", [RunStatus.CANCELED, RunStatus.SUCCEEDED])
async def test_a_refused_dead_job_retry_leaves_the_run_alone(
    ops: Operations, parts: Parts, ended: RunStatus
) -> None:
    """Retrying a job that is not dead-lettered (here: still waiting on ``runs``, and asked of
    the other queue too) is UnknownJob, and the finished run keeps its status and steps."""
    flow = await ops.create_flow(DOC)
    run_id = await ops.start_run(flow, None)
    record = {"name": "a", "type": "transform", "status": "SUCCEEDED", "output": {"x": 1}}
    step = run_store.StepRow(run_id, 0, StepRecord.of(record))
    assert await parts.writer.add_step(step)
    assert await parts.writer.transition(Transition(run_id, ended, output={"x": 1}))
    for queue in ("runs", "sync"):
        with pytest.raises(UnknownJob):
            await ops.retry_dead_job(queue, str(run_id))
    row = await run_store.get_run(ops.db, run_id)
    assert (row["status"], row["output"]) == (ended.value, {"x": 1})
    assert [s.name for s in await run_store.get_steps(ops.db, run_id)] == ["a"]


async def test_cancelling_a_paused_run_cancels_its_paused_step(
    ops: Operations, parts: Parts
) -> None:
    """A run paused on a delay, then canceled: the delay's PAUSED record becomes CANCELED (it
    will never resume); a FROM_FAILED_STEP retry drops it so the delay runs again."""
    flow = await ops.create_flow(DOC)
    run_id = await ops.start_run(flow, None)
    done = {"name": "a", "type": "transform", "status": "SUCCEEDED", "output": {"x": 1}}
    paused = {"name": "wait", "type": "delay", "status": "PAUSED", "output": {"resume_at": "x"}}
    for seq, record in enumerate((done, paused)):
        assert await parts.writer.add_step(run_store.StepRow(run_id, seq, StepRecord.of(record)))
    assert await parts.writer.transition(Transition(run_id, RunStatus.PAUSED))
    assert (await ops.cancel_run(run_id))["status"] == RunStatus.CANCELED.value
    steps = await run_store.get_steps(ops.db, run_id)
    assert [(s.name, s.status) for s in steps] == [("a", "SUCCEEDED"), ("wait", "CANCELED")]
    await ops.retry_run(run_id, "FROM_FAILED_STEP")
    assert [s.name for s in await run_store.get_steps(ops.db, run_id)] == ["a"]


async def test_workers_and_scaling_read_the_injected_registry(
    ops: Operations, parts: Parts
) -> None:
    workers = parts.workers
    assert [w["id"] for w in await ops.workers(include_lost=True)] == ["w1"]
    rules = await ops.scaling_report()
    assert rules and {"rule", "breached", "recommendation"} <= set(rules[0])
    assert workers.asked == [True, False]  # the scaling advice counts live workers only
