"""A real streaming replica (``pg_basebackup -R``) behind ``AP_POSTGRES_READ_REPLICA_URL``:
listings are served from it, writes go to the primary, and when the replica dies reads fall
back to the primary without an error."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from tests.ha.conftest import Stack
from tests.ha.load import Conveyor, check_runs, wait_terminal
from tests.ha.servers import Postgres
from tests.polling import eventually
from tests.processes import conveyor_env, free_port

BATCH = 30


async def caught_up(primary: Postgres, replica: Postgres) -> None:
    """Wait until the replica has replayed everything the primary has written so far."""
    p = await asyncpg.connect(primary.url())
    r = await asyncpg.connect(replica.url())
    try:
        target = await p.fetchval("SELECT pg_current_wal_lsn()")

        async def replayed() -> bool:
            return bool(await r.fetchval("SELECT pg_last_wal_replay_lsn() >= $1::pg_lsn", target))

        await eventually(replayed, timeout_s=10, interval_s=0.05, what="the replica caught up")
    finally:
        await p.close()
        await r.close()


async def post_batch(http: aiohttp.ClientSession, base: str, flow_id: str) -> set[str]:
    """``BATCH`` async webhooks, all of which must be accepted (writes reach the primary)."""

    async def one(n: int) -> str:
        async with http.post(f"{base}/api/v1/webhooks/{flow_id}", json={"n": n}) as r:
            assert r.status == 202, await r.text()
            return str((await r.json())["run_id"])

    return set(await asyncio.gather(*(one(n) for n in range(BATCH))))


async def listed(http: aiohttp.ClientSession, base: str, flow_id: str) -> dict[str, Any]:
    """The flow's runs as the API lists them (``id -> status``); the request must succeed."""
    async with http.get(
        f"{base}/api/v1/flow-runs", params={"flow_id": flow_id, "limit": "100"}
    ) as r:
        assert r.status == 200, await r.text()
        return {run["id"]: run["status"] for run in (await r.json())["data"]}


@pytest.mark.slow
@pytest.mark.timeout(90)
@pytest.mark.usefixtures("redis")
async def test_listings_from_streaming_replica_fall_back_to_primary(
    stack: Stack, ha_dir: Path, redis_url: str
) -> None:
    """Listings come from the replica (stale while its replay is paused), writes from the
    primary; with the replica SIGKILLed every listing is answered from the primary."""
    primary = stack.server(Postgres(ha_dir, "primary"))
    primary.initdb()
    primary.start()
    replica = stack.server(Postgres(ha_dir, "replica"))
    replica.basebackup(primary)
    replica.start()
    port = free_port()
    env = conveyor_env(
        primary.url(),
        redis_url,
        AP_POSTGRES_READ_REPLICA_URL=replica.url(),
        AP_PORT=str(port),
        AP_WORKER_CONCURRENCY="20",
    )
    conveyor = stack.conveyor(Conveyor(env, port, ha_dir / "conveyor.log"))
    await conveyor.start()
    flow_id = await conveyor.create_flow()
    standby = await asyncpg.connect(replica.url())
    try:
        assert await standby.fetchval("SELECT pg_is_in_recovery()")
        async with aiohttp.ClientSession() as http:
            first = await post_batch(http, conveyor.base, flow_id)
            await wait_terminal(primary.url(), flow_id, len(first), timeout_s=30)
            await caught_up(primary, replica)
            assert await listed(http, conveyor.base, flow_id) == dict.fromkeys(first, "SUCCEEDED")

            # Freeze the replica: new runs are written (so not to the read-only replica) and
            # run, but the listing does not show them — it is read from the replica.
            await standby.execute("SELECT pg_wal_replay_pause()")
            second = await post_batch(http, conveyor.base, flow_id)
            await wait_terminal(primary.url(), flow_id, len(first | second), timeout_s=30)
            assert set(await listed(http, conveyor.base, flow_id)) == first
            await standby.execute("SELECT pg_wal_replay_resume()")
            await caught_up(primary, replica)
            assert set(await listed(http, conveyor.base, flow_id)) == first | second

            # Replica crashes: every listing is answered, now from the primary.
            await standby.close()
            replica.kill(crash=True)
            third = await post_batch(http, conveyor.base, flow_id)
            await wait_terminal(primary.url(), flow_id, 3 * BATCH, timeout_s=30)
            for _ in range(5):
                runs = await listed(http, conveyor.base, flow_id)
                assert runs == dict.fromkeys(first | second | third, "SUCCEEDED")
        await check_runs(primary.url(), flow_id, first | second | third)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{conveyor.tail()}") from None
    finally:
        await standby.close()
    print(f"\nreplica: {3 * BATCH} runs SUCCEEDED; listings from the replica, then the primary")
    await stack.close_cleanly()
