"""A lazy RUNNING write (worker ``_Sink._write_running``, due LAZY_RUNNING_S after a first
delivery's contained code step started) that fails with a database error: the error reaches
the run's handler, which raises — the consumer then retries the job instead of acknowledging
it — and nothing of the run is written (no INTERNAL_ERROR state, no step record, the attempt
not counted); the redelivery runs it to the end. Real PostgreSQL (its connection killed, or
its statement canceled, while it waits for a lock on ``runs``), Redis and the real sandbox."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from conveyor.engine import worker as worker_module
from conveyor.engine.submit import RunJob
from conveyor.engine.worker import RunWorker, backend_down
from conveyor.ids import uuid7
from conveyor.queue.job import Job
from conveyor.store import flows as flow_store
from conveyor.store import runs as run_store
from conveyor.store.db import Database
from conveyor.store.runs import NewRun
from tests.engine.test_in_memory_runs import (  # noqa: F401  (contained is a fixture)
    _close,
    _CountingWriter,
    _slow,
    _worker,
    contained,
)


async def _waiter(conn: asyncpg.Connection, within_s: float) -> int:
    """The backend of this database waiting for a lock (the worker's RUNNING write)."""
    deadline = asyncio.get_running_loop().time() + within_s
    while True:
        pid = await conn.fetchval(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid() AND wait_event_type = 'Lock' LIMIT 1"
        )
        if pid is not None:
            return int(pid)
        assert asyncio.get_running_loop().time() < deadline, "no RUNNING write waited"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("kill", ["pg_terminate_backend", "pg_cancel_backend"])
async def test_a_failed_lazy_running_write_fails_the_job_with_nothing_written(
    db: Database,
    contained: RunWorker,  # noqa: F811
    postgres_url: str,
    monkeypatch: pytest.MonkeyPatch,
    kill: str,
) -> None:
    """The RUNNING write, blocked by a lock on ``runs`` while the code step sleeps, loses its
    connection (or its statement is canceled): the handler raises that error once the step is
    done — not an INTERNAL_ERROR state committed as the job's end — and nothing is stored."""
    monkeypatch.setattr(worker_module, "LAZY_RUNNING_S", 0.02)
    doc = _slow(1.0)
    flow = await flow_store.create_flow(db, f"slow-{uuid.uuid4().hex[:6]}", doc)
    rid = uuid7()
    trigger = {"body": {"n": 5}}
    await contained.writer.insert(NewRun(rid, flow.id, flow.version, trigger, queue="sync"))
    payload = RunJob(
        run_id=str(rid), flow_id=str(flow.id), version=flow.version, trigger=trigger
    ).to_payload()
    await contained.registry.version(flow.id, flow.version)  # cached: no read under the lock

    locker = await asyncpg.connect(postgres_url)
    try:
        tx = locker.transaction()
        await tx.start()
        await locker.execute("LOCK TABLE runs IN ACCESS EXCLUSIVE MODE")
        handled = asyncio.create_task(
            contained.handle(Job(str(rid), "sync", payload, 1, "1-0", 0, 0))
        )
        try:
            pid = await _waiter(locker, 10.0)
            assert not handled.done()  # the code step still runs
            assert await locker.fetchval(f"SELECT {kill}($1)", pid)
        finally:
            await tx.rollback()
        with pytest.raises(Exception) as failed:
            await asyncio.wait_for(handled, 30)
    finally:
        await locker.close()
    assert isinstance(failed.value, asyncpg.PostgresError | OSError)
    if kill == "pg_terminate_backend":
        assert backend_down(failed.value) == "postgres"  # retried without spending a delivery
    run = await run_store.get_run(db, rid)
    assert (run["status"], run["attempt"], run["error"]) == ("QUEUED", 0, None)
    assert await run_store.get_steps(db, rid) == []
    assert isinstance(contained.writer, _CountingWriter)
    assert [status for status, _ in contained.writer.writes] == ["RUNNING"]

    # The redelivery runs it to the end.
    await contained.handle(Job(str(rid), "sync", payload, 2, "1-0", 0, 0))
    run = await run_store.get_run(db, rid)
    assert (run["status"], run["attempt"], run["output"]) == (
        "SUCCEEDED",
        1,
        {"status": 200, "headers": {}, "body": 7},
    )
    assert [s.name for s in await run_store.get_steps(db, rid)] == ["parse", "score", "reply"]
