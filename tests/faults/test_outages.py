"""Redis or PostgreSQL goes down mid-run and comes back: while it is down a worker idles (a
few percent of a core, a bounded number of log lines), afterwards every accepted run ends
SUCCEEDED once, and sync callers get their answer. Both tests print CPU and log figures."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from conveyor.embedded import EmbeddedPostgres
from tests.faults.harness import (
    Deployment,
    Endpoint,
    Role,
    all_terminal,
    check_invariants,
    cpu_share,
    create_flow,
    flow,
    post_runs,
)
from tests.polling import eventually
from tests.queue.servers import RedisServer

#: Generous behaviour bounds (not speed): a spinning loop takes a whole core and thousands of
#: lines a second; backing off takes a few percent and a handful of lines.
MAX_CPU_SHARE = 0.2
MAX_LOG_LINES = 60
WINDOW_S = 5.0


async def _sync_calls(port: int, flow_id: str, n: int) -> list[tuple[int, object]]:
    async def one(i: int) -> tuple[int, object]:
        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{port}/api/v1/webhooks/{flow_id}/sync"
            async with http.post(url, json={"n": 100 + i}) as r:
                return r.status, await r.json()

    return list(await asyncio.gather(*(one(i) for i in range(n))))


async def _idle_while_down(worker: Role, since: int) -> tuple[float, int]:
    """CPU share and new log lines over WINDOW_S, counted once the worker noticed the outage
    (logged after byte ``since`` of its log: a line from before the fault does not count)."""
    await eventually(
        lambda: worker.logged("backend.unavailable", since=since),
        timeout_s=15,
        what="the outage logged",
    )
    lines = worker.log_lines()
    share = await cpu_share(worker, WINDOW_S)()
    return share, worker.log_lines() - lines


@pytest.mark.slow
async def test_redis_down_then_up(
    deployment: Deployment, endpoint: Endpoint, private_redis: RedisServer
) -> None:
    """Redis killed while runs finish (acknowledgements and replies fail): the worker stays
    near idle; once Redis is back every run ends SUCCEEDED and the sync callers get 200."""
    app = await deployment.start("APP")
    worker = await deployment.start("WORKER", AP_WORKER_CONCURRENCY="8")
    flow_id = await create_flow(app, flow(endpoint, 2.0))
    run_ids = await post_runs(app, flow_id, 4)
    sync = asyncio.ensure_future(_sync_calls(app.port, flow_id, 2))
    await eventually(
        lambda: endpoint.first_calls(1) == 6, timeout_s=30, interval_s=0.1, what="six runs mid-step"
    )
    mark = worker.log_size()
    private_redis.kill()
    share, lines = await _idle_while_down(worker, mark)
    print(f"\nworker while Redis is down: {share:.1%} of a core, {lines} log lines")
    assert share < MAX_CPU_SHARE
    assert lines < MAX_LOG_LINES
    private_redis.start()
    answers = await asyncio.wait_for(sync, 40)
    assert sorted(answers, key=str) == [(200, {"n": 100}), (200, {"n": 101})]
    run_ids += [k.split(":")[0] for k in endpoint.calls if k.split(":")[0] not in run_ids]
    assert len(run_ids) == 6
    await eventually(
        lambda: all_terminal(deployment.postgres_url, run_ids),
        timeout_s=40,
        interval_s=0.1,
        what="runs terminal",
    )
    await check_invariants(deployment.postgres_url, run_ids, endpoint, deployment)


@pytest.fixture
def private_postgres() -> Iterator[EmbeddedPostgres]:
    """A PostgreSQL on a unix socket of its own that the test may stop and start."""
    base = Path(tempfile.mkdtemp(prefix="conveyor-fault-pg-"))
    base.chmod(0o755)
    server = EmbeddedPostgres(base / "pg")
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
async def test_postgres_down_then_up(
    tmp_path: Path,
    endpoint: Endpoint,
    private_redis: RedisServer,
    private_postgres: EmbeddedPostgres,
) -> None:
    """PostgreSQL stopped while runs finish (checkpoints and final states fail): the worker
    stays near idle; once it is back every run ends SUCCEEDED, nothing checkpointed twice."""
    deployment = Deployment(tmp_path, private_redis.url, private_postgres.url())
    try:
        app = await deployment.start("APP")
        worker = await deployment.start("WORKER")
        flow_id = await create_flow(app, flow(endpoint, 2.0))
        run_ids = await post_runs(app, flow_id, 4)
        await eventually(
            lambda: endpoint.first_calls(1) == 4,
            timeout_s=30,
            interval_s=0.1,
            what="four runs mid-step",
        )
        mark = worker.log_size()
        private_postgres.stop()
        share, lines = await _idle_while_down(worker, mark)
        print(f"\nworker while PostgreSQL is down: {share:.1%} of a core, {lines} log lines")
        assert share < MAX_CPU_SHARE
        assert lines < MAX_LOG_LINES
        private_postgres.start()
        await eventually(
            lambda: all_terminal(deployment.postgres_url, run_ids),
            timeout_s=60,
            interval_s=0.1,
            what="runs terminal",
        )
        await check_invariants(deployment.postgres_url, run_ids, endpoint, deployment)
    finally:
        await deployment.kill_all()
