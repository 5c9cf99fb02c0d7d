"""PgBouncer in transaction mode in front of PostgreSQL: with ``AP_POSTGRES_USE_PGBOUNCER``
Conveyor migrates, ingests and runs through a pool of fewer server connections than it uses."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from tests.ha.conftest import Stack
from tests.ha.load import Conveyor, check_runs, wait_terminal
from tests.ha.servers import PgBouncer, Postgres
from tests.processes import conveyor_env, free_port

ASYNC_RUNS = 200
SYNC_RUNS = 20
POOL = 3


@pytest.mark.slow
@pytest.mark.timeout(90)
@pytest.mark.usefixtures("redis")
async def test_runs_through_pgbouncer_transaction_pooling(
    stack: Stack, ha_dir: Path, redis_url: str
) -> None:
    """Async and sync webhooks through PgBouncer (transaction mode, 3 server connections for
    a pool of 10) all SUCCEED, each step recorded once."""
    pg = stack.server(Postgres(ha_dir, "pg"))
    pg.initdb()
    pg.start()
    bouncer = stack.server(PgBouncer(ha_dir, pg, pool_size=POOL))
    bouncer.start()
    port = free_port()
    env = conveyor_env(
        bouncer.url,
        redis_url,
        AP_POSTGRES_USE_PGBOUNCER="true",
        AP_POSTGRES_POOL_SIZE="10",
        AP_PORT=str(port),
        AP_WORKER_CONCURRENCY="20",
    )
    conveyor = stack.conveyor(Conveyor(env, port, ha_dir / "conveyor.log"))
    await conveyor.start()
    flow_id = await conveyor.create_flow()

    accepted: set[str] = set()
    answers: list[int] = []
    slots = asyncio.Semaphore(40)
    async with aiohttp.ClientSession() as http:

        async def post(n: int, sync: bool) -> None:
            url = f"{conveyor.base}/api/v1/webhooks/{flow_id}" + ("/sync" if sync else "")
            async with slots, http.post(url, json={"n": n}) as r:
                answers.append(r.status)
                if r.status in (200, 202):
                    accepted.add(r.headers["x-run-id"])

        await asyncio.gather(
            *(post(n, False) for n in range(ASYNC_RUNS)),
            *(post(n, True) for n in range(SYNC_RUNS)),
        )
    assert sorted(set(answers)) == [200, 202], sorted(answers)
    assert answers.count(202) == ASYNC_RUNS and answers.count(200) == SYNC_RUNS
    try:
        terminal, _ = await wait_terminal(pg.url(), flow_id, len(accepted), timeout_s=45)
        await check_runs(pg.url(), flow_id, accepted)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{conveyor.tail()}") from None

    # Everything went through PgBouncer, multiplexed over at most POOL server connections.
    (pool,) = [p for p in bouncer.show("POOLS") if p["database"] == bouncer.database]
    assert pool["pool_mode"] == "transaction"
    servers = [s for s in bouncer.show("SERVERS") if s["database"] == bouncer.database]
    assert 0 < len(servers) <= POOL
    (stats,) = [s for s in bouncer.show("STATS") if s["database"] == bouncer.database]
    # Conveyor knows only the bouncer's address, so every run row above came through it; run
    # writes are group-committed (many runs per transaction), so the count is not per run.
    assert int(stats["total_xact_count"]) > 0
    print(
        f"\npgbouncer: {ASYNC_RUNS} async + {SYNC_RUNS} sync webhooks, {terminal} runs "
        f"terminal, all SUCCEEDED; {stats['total_xact_count']} transactions over "
        f"{len(servers)} server connections"
    )
    await stack.close_cleanly()
