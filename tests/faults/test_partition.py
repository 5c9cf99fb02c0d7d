"""Redis unreachable for longer than the visibility timeout while two WORKERs have runs in
flight (a partition: Redis and its clock run on, every worker looks silent meanwhile). When it
is back neither worker takes the other's live runs over, and a run taken over anyway would be
fenced: every run ends SUCCEEDED once, no step is checkpointed twice."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.faults.harness import (
    Deployment,
    Endpoint,
    all_terminal,
    completed_jobs,
    create_flow,
    post_runs,
)
from tests.polling import eventually
from tests.queue.proxy import TcpProxy
from tests.queue.servers import RedisServer

#: Longer than the default visibility timeout (6 s): every consumer's idle time passes it.
OUTAGE_S = 9.0
#: The first step's first call is answered after this long: the runs are still in it when
#: Redis comes back (and a worker that wrongly took one over would be in the second step
#: when the first owner's call returns).
FIRST_HOLD_S = 13.0
SECOND_HOLD_S = 8.0
RUNS = 8


def _flow(endpoint: Endpoint) -> dict[str, Any]:
    return {
        "name": "partition",
        "trigger": {"type": "webhook"},
        "steps": [
            {"name": "call", "type": "http", "input": {"url": endpoint.url(FIRST_HOLD_S)}},
            {"name": "second", "type": "http", "input": {"url": endpoint.url(SECOND_HOLD_S)}},
            {"name": "done", "type": "transform", "input": {"n": "{{trigger.body.n}}"}},
        ],
    }


@pytest.mark.slow
async def test_partition_past_visibility_runs_each_run_once(
    tmp_path: Path, private_redis: RedisServer, fault_db: str, endpoint: Endpoint
) -> None:
    """Two WORKERs holding 8 runs mid-step lose Redis for 9 s (> the 6 s visibility timeout):
    afterwards every run is SUCCEEDED and acknowledged once, each step checkpointed once, and
    no step's call was repeated (nothing was taken over)."""
    proxy = TcpProxy(private_redis.port)
    await proxy.start()
    deployment = Deployment(tmp_path, proxy.url(), fault_db)
    try:
        app = await deployment.start("APP")
        await deployment.start("WORKER")
        await deployment.start("WORKER")
        flow_id = await create_flow(app, _flow(endpoint))
        run_ids = await post_runs(app, flow_id, RUNS)
        await eventually(
            lambda: endpoint.first_calls(1) == RUNS,
            timeout_s=30,
            interval_s=0.2,
            what="every run in its first step",
        )
        await proxy.cut()
        # Fault schedule: the partition lasts OUTAGE_S, past the visibility timeout.
        await asyncio.sleep(OUTAGE_S)
        await proxy.restore()
        await eventually(
            lambda: all_terminal(fault_db, run_ids),
            timeout_s=60,
            interval_s=0.2,
            what="every run terminal",
        )
        conn = await asyncpg.connect(fault_db)
        try:
            ids = [uuid.UUID(r) for r in run_ids]
            runs = await conn.fetch("SELECT id, status FROM runs WHERE id = ANY($1::uuid[])", ids)
            steps = await conn.fetch(
                "SELECT run_id, name, count(*) AS n FROM step_runs"
                " WHERE run_id = ANY($1::uuid[]) GROUP BY run_id, name",
                ids,
            )
        finally:
            await conn.close()
        assert {r["status"] for r in runs} == {"SUCCEEDED"}, [dict(r) for r in runs]
        assert len(runs) == RUNS
        assert sorted((str(r["run_id"]), r["name"], r["n"]) for r in steps) == sorted(
            (run, name, 1) for run in run_ids for name in ("call", "second", "done")
        )
        # Each http step was called once: no run was executed twice.
        assert {key: len(times) for key, times in endpoint.calls.items()} == {
            f"{run}:{name}": 1 for run in run_ids for name in ("call", "second")
        }
        done: list[str] = []

        async def acknowledged() -> bool:
            done[:] = await completed_jobs(deployment.redis_url)
            return set(run_ids) <= set(done)

        await eventually(
            acknowledged, timeout_s=30, interval_s=0.2, what="every run's job acknowledged"
        )
        assert sorted(done) == sorted(run_ids), "a job completed twice, or a stranger"
        await deployment.kill_all()
        assert await deployment.leftovers() == []
    finally:
        await deployment.kill_all()
        await proxy.close()
