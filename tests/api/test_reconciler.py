"""Reconciler: runs whose queue entry vanished are enqueued again; abandoned runs time out."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import redis.asyncio as aioredis

from conveyor.engine.reconciler import Reconciler, resume_job_id
from conveyor.queue import Consumer, Job, Location, Producer, QueueConfig
from conveyor.queue.admin import QueueAdmin
from conveyor.status import RunStatus
from conveyor.store import runs as run_store
from conveyor.store.db import Database
from conveyor.store.runs import RunWriter

FLOW = {
    "name": "r",
    "trigger": {"type": "webhook"},
    "steps": [{"name": "t", "type": "transform", "input": {"a": 1}}],
}


async def test_redis_lost_everything_runs_come_back(
    make_client: Any, db: Database, redis: aioredis.Redis
) -> None:
    """Accepted runs survive a Redis that restarted empty: the reconciler re-enqueues them."""
    client = await make_client(AP_CONTAINER_TYPE="APP")
    fid = (await (await client.post("/api/v1/flows", json=FLOW)).json())["id"]
    ids = [
        (await (await client.post(f"/api/v1/webhooks/{fid}", json={})).json())["run_id"]
        for _ in range(3)
    ]
    await redis.flushdb()  # Redis lost everything
    writer = RunWriter(db)
    config = QueueConfig()
    rec = Reconciler(
        writer, Producer(redis, config), QueueAdmin(redis, config), flow_timeout_s=600, grace_s=0
    )
    assert (await rec.run_once(page=2))["requeued"] == 3  # across two pages
    where = await QueueAdmin(redis, config).locate("runs", ids)
    assert all(loc is not None for loc in where.values())
    assert (await rec.run_once())["requeued"] == 0  # nothing added twice
    await writer.close()


async def test_abandoned_running_run_times_out(
    make_client: Any, db: Database, redis: aioredis.Redis
) -> None:
    """A RUNNING run older than the flow timeout ends TIMEOUT even with no worker alive."""
    client = await make_client(AP_CONTAINER_TYPE="APP")
    fid = (await (await client.post("/api/v1/flows", json=FLOW)).json())["id"]
    rid = (await (await client.post(f"/api/v1/webhooks/{fid}", json={})).json())["run_id"]
    async with db.writer() as conn:
        await conn.execute(
            "UPDATE runs SET status = 'RUNNING', started_at = now() - interval '1 hour', "
            "updated_at = now() - interval '1 hour' WHERE id = $1",
            uuid.UUID(rid),
        )
    writer = RunWriter(db)
    config = QueueConfig()
    rec = Reconciler(
        writer, Producer(redis, config), QueueAdmin(redis, config), flow_timeout_s=60, grace_s=0
    )
    assert (await rec.run_once())["timed_out"] == 1
    row = await run_store.get_run(db, uuid.UUID(rid))
    assert row["status"] == "TIMEOUT" and "AP_FLOW_TIMEOUT_SECONDS" in row["error"]["message"]
    await writer.close()


async def test_resumed_run_is_neither_requeued_nor_timed_out(
    make_client: Any, db: Database, redis: aioredis.Redis
) -> None:
    """A run resumed after a long pause: its resumption job counts, its pause does not."""
    client = await make_client(AP_CONTAINER_TYPE="APP")
    fid = (await (await client.post("/api/v1/flows", json=FLOW)).json())["id"]
    rid = (await (await client.post(f"/api/v1/webhooks/{fid}", json={})).json())["run_id"]
    resume_at = datetime.now(UTC) - timedelta(minutes=30)
    async with db.writer() as conn:
        # Started 2 hours ago, paused, resumed 30 minutes ago: running now, within its budget.
        await conn.execute(
            "UPDATE runs SET status = 'RUNNING', resume_at = $2, "
            "started_at = now() - interval '2 hours', updated_at = now() - interval '40 seconds' "
            "WHERE id = $1",
            uuid.UUID(rid),
            resume_at,
        )
    config = QueueConfig()
    producer = Producer(redis, config)
    await redis.flushdb()
    await producer.enqueue("runs", {"run_id": rid}, job_id=resume_job_id(rid, resume_at))
    writer = RunWriter(db)
    rec = Reconciler(writer, producer, QueueAdmin(redis, config), flow_timeout_s=600, grace_s=0)
    assert await rec.run_once() == {"requeued": 0, "timed_out": 0}
    assert (await run_store.get_run(db, uuid.UUID(rid)))["status"] == "RUNNING"
    await writer.close()


async def test_retention_deletes_old_finished_runs_only(
    make_client: Any, db: Database, redis: aioredis.Redis
) -> None:
    """Finished runs older than the retention go (with their steps); live and recent stay."""
    client = await make_client(AP_CONTAINER_TYPE="APP")
    fid = (await (await client.post("/api/v1/flows", json=FLOW)).json())["id"]
    ids = [
        (await (await client.post(f"/api/v1/webhooks/{fid}", json={})).json())["run_id"]
        for _ in range(3)
    ]
    old_done, old_live, recent_done = (uuid.UUID(i) for i in ids)
    async with db.writer() as conn:
        await conn.execute(
            "UPDATE runs SET status = 'SUCCEEDED' WHERE id = ANY($1::uuid[])",
            [old_done, recent_done],
        )
        await conn.execute(
            "UPDATE runs SET created_at = now() - interval '40 days' WHERE id = ANY($1::uuid[])",
            [old_done, old_live],
        )
    writer = RunWriter(db)
    config = QueueConfig()
    rec = Reconciler(
        writer,
        Producer(redis, config),
        QueueAdmin(redis, config),
        flow_timeout_s=600,
        retention_days=30,
    )
    assert await rec.apply_retention() == 1
    left = {r["id"] for r in await run_store.list_runs(db, limit=10)}
    assert left == {old_live, recent_done}
    await writer.close()


async def test_run_of_a_dead_lettered_job_ends_internal_error(
    make_client: Any, db: Database, redis: aioredis.Redis
) -> None:
    """A job dead-lettered while its run could not be ended (PostgreSQL was down for on_dead)
    is not run again: the reconciler ends the run INTERNAL_ERROR."""
    client = await make_client(AP_CONTAINER_TYPE="APP")
    fid = (await (await client.post("/api/v1/flows", json=FLOW)).json())["id"]
    rid = (await (await client.post(f"/api/v1/webhooks/{fid}", json={})).json())["run_id"]
    config = QueueConfig(max_deliveries=1)

    async def explode(job: Job) -> None:
        raise RuntimeError("bug")

    async def on_dead(job: Job, error: str) -> None:
        raise ConnectionError("postgres down")

    await Consumer(redis, explode, config, on_dead=on_dead).drain()
    assert (await QueueAdmin(redis, config).locate("runs", [rid]))[rid] is Location.DEAD
    writer = RunWriter(db)
    rec = Reconciler(
        writer, Producer(redis, config), QueueAdmin(redis, config), flow_timeout_s=600, grace_s=0
    )
    assert (await rec.run_once())["requeued"] == 0
    row = await run_store.get_run(db, uuid.UUID(rid))
    assert row["status"] == "INTERNAL_ERROR" and "dead-lettered" in row["error"]["message"]
    assert (await QueueAdmin(redis, config).locate("runs", [rid]))[rid] is Location.DEAD
    await writer.close()


async def test_a_run_finished_while_the_pass_looks_is_not_enqueued_again(
    make_client: Any, db: Database, redis: aioredis.Redis
) -> None:
    """The race a pass has with a worker: the pass reads a QUEUED run, the worker commits it
    and acknowledges its job, then the pass finds no job. The pass looks at PostgreSQL again
    and leaves the finished run alone (before: enqueued again, delivered and completed
    twice)."""
    client = await make_client(AP_CONTAINER_TYPE="APP")
    fid = (await (await client.post("/api/v1/flows", json=FLOW)).json())["id"]
    rid = (await (await client.post(f"/api/v1/webhooks/{fid}", json={})).json())["run_id"]
    writer = RunWriter(db)
    config = QueueConfig()
    producer = Producer(redis, config)

    class FinishesFirst(QueueAdmin):
        """The worker's commit and acknowledgement land between the pass's read and lookup."""

        async def locate(self, queue: str, job_ids: Any) -> dict[str, Location | None]:
            await writer.transition(run_store.Transition(uuid.UUID(rid), RunStatus.SUCCEEDED))
            await QueueAdmin(redis, config).delete_job("runs", rid)
            return await super().locate(queue, job_ids)

    rec = Reconciler(writer, producer, FinishesFirst(redis, config), flow_timeout_s=600, grace_s=0)
    assert (await rec.run_once())["requeued"] == 0
    assert (await QueueAdmin(redis, config).locate("runs", [rid]))[rid] is None
    await writer.close()
    await producer.close()
