"""Redis Sentinel failover under load: the master is killed, a Sentinel promotes the replica,
Conveyor follows it, and every accepted webhook still runs to completion."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.ha.conftest import Stack
from tests.ha.load import Conveyor, Load, check_runs, slowest_runs, wait_terminal
from tests.ha.servers import start_sentinel_group
from tests.polling import eventually
from tests.processes import conveyor_env, free_port

NAME = "mymaster"

#: Webhooks accepted before the kill, and after the switch, before the load stops: the
#: failure lands mid-load and Conveyor is seen taking work on the new topology (at 40 per
#: second about 2 s and 3 s of load, as the fixed waits these replace).
BEFORE_KILL = 80
AFTER_SWITCH = 120


def accepted_since(load: Load, t: float) -> int:
    return sum(1 for accepted_at in load.accepted.values() if accepted_at > t)


@pytest.mark.slow
@pytest.mark.timeout(150)
@pytest.mark.usefixtures("db")
async def test_sentinel_failover_loses_no_run(
    stack: Stack, ha_dir: Path, postgres_url: str
) -> None:
    """Master SIGKILLed mid-load: the replica is promoted and every 202 run SUCCEEDS once."""
    master, replica, sentinels = start_sentinel_group(ha_dir, NAME)
    for server in (master, replica, *sentinels):
        stack.server(server)
    port = free_port()
    env = conveyor_env(
        postgres_url,
        "",
        AP_REDIS_TYPE="SENTINEL",
        AP_REDIS_SENTINEL_HOSTS=",".join(f"127.0.0.1:{s.port}" for s in sentinels),
        AP_REDIS_SENTINEL_NAME=NAME,
        AP_PORT=str(port),
        AP_WORKER_CONCURRENCY="20",
    )
    del env["AP_REDIS_URL"]
    conveyor = stack.conveyor(Conveyor(env, port, ha_dir / "conveyor.log"))
    await conveyor.start()
    flow_id = await conveyor.create_flow()

    load = Load(conveyor.base, flow_id, rate_per_s=40)
    load.start()
    try:
        await eventually(
            lambda: len(load.accepted) >= BEFORE_KILL,
            timeout_s=30,
            what="load flowing before the kill",
        )
        before = len(load.accepted)
        watcher = aioredis.Redis(host="127.0.0.1", port=sentinels[0].port)
        killed_wall, killed = time.time(), time.monotonic()
        master.kill()
        try:

            async def switched() -> bool:
                _host, port_now = await watcher.execute_command(
                    "SENTINEL", "GET-MASTER-ADDR-BY-NAME", NAME
                )
                return int(port_now) == replica.port

            await eventually(
                switched,
                timeout_s=30,
                interval_s=0.05,
                what="failover (Sentinel names the replica)",
            )
        finally:
            await watcher.aclose()
        switch_s = time.monotonic() - killed
        await eventually(
            lambda: accepted_since(load, killed + switch_s) >= AFTER_SWITCH,
            timeout_s=30,
            what=f"{AFTER_SWITCH} webhooks accepted after the switch",
        )
    finally:
        await load.stop()  # also when a wait above fails: no load left running
    after_switch = accepted_since(load, killed + switch_s)

    try:
        terminal, drain_s = await wait_terminal(
            postgres_url, flow_id, len(load.accepted), timeout_s=75
        )
        await check_runs(postgres_url, flow_id, set(load.accepted))
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{load.summary()}\n{conveyor.tail()}") from None
    # The new master carries the queue: Conveyor writes to it, not only to PostgreSQL.
    promoted = aioredis.Redis(host="127.0.0.1", port=replica.port)
    try:
        assert (await promoted.info("replication"))["role"] == "master"
        assert await promoted.dbsize() > 0
    finally:
        await promoted.aclose()
    log_lines = len(conveyor.log.read_bytes().splitlines())
    slow = await slowest_runs(postgres_url, flow_id, 0, killed_wall, killed_wall + switch_s)
    print(
        f"\nsentinel: switch {switch_s:.1f} s after SIGKILL; {load.summary()}; "
        f"{before} before the kill, {after_switch} after the switch; "
        f"{terminal} terminal, all {len(load.accepted)} accepted SUCCEEDED "
        f"(slowest before/during/after the outage: {slow[0]:.1f}/{slow[1]:.1f}/{slow[2]:.1f} s) "
        f"{drain_s:.1f} s after the load stopped"
        f"; conveyor logged {log_lines} lines"
    )
    assert before > 0 and after_switch > 0, load.summary()
    await stack.close_cleanly()
