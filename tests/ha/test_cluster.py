"""A real Redis Cluster (3 masters + 3 replicas) losing a master under load: its replica is
promoted, Conveyor's cluster client follows the new slot map, and no accepted run is lost."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from tests.ha.conftest import Stack
from tests.ha.load import Conveyor, Load, check_runs, slowest_runs, wait_terminal
from tests.ha.servers import RedisNode, cluster_nodes, start_cluster
from tests.polling import eventually
from tests.processes import conveyor_env, free_port


def stream_count(node: RedisNode) -> int:
    with node.client() as c:
        return sum(1 for _ in c.scan_iter(_type="stream", count=1000))


async def promoted(witness: RedisNode, victim_id: str, heir_id: str) -> bool:
    """Whether ``witness`` sees the victim failed, its replica master and the cluster ok."""
    client = aioredis.Redis(host="127.0.0.1", port=witness.port)
    try:
        info = (await client.execute_command("CLUSTER", "INFO")).decode()
        text = (await client.execute_command("CLUSTER", "NODES")).decode()
    finally:
        await client.aclose()
    flags = {f[0]: f[2].split(",") for f in (line.split() for line in text.splitlines())}
    return "cluster_state:ok" in info and "fail" in flags[victim_id] and "master" in flags[heir_id]


#: Webhooks accepted before the kill, and after the switch, before the load stops: the
#: failure lands mid-load and Conveyor is seen taking work on the new topology (at 40 per
#: second about 2 s and 3 s of load, as the fixed waits these replace).
BEFORE_KILL = 80
SYNC_FLOW: dict[str, Any] = {
    "name": "ha-sync",
    "trigger": {"type": "webhook"},
    "steps": [{"name": "reply", "type": "respond", "input": {"body": {"n": "{{trigger.body.n}}"}}}],
}
AFTER_SWITCH = 120


def accepted_since(load: Load, t: float) -> int:
    return sum(1 for accepted_at in load.accepted.values() if accepted_at > t)


@pytest.mark.slow
@pytest.mark.timeout(150)
@pytest.mark.usefixtures("db")
async def test_cluster_master_failover_loses_no_run(
    stack: Stack, ha_dir: Path, postgres_url: str
) -> None:
    """A master of a 6-node cluster SIGKILLed mid-load: every 202 run SUCCEEDS once."""
    nodes = start_cluster(ha_dir)
    for n in nodes:
        stack.server(n)
    port = free_port()
    env = conveyor_env(
        postgres_url,
        f"redis://{nodes[0].address}/0",
        AP_REDIS_TYPE="CLUSTER",
        AP_QUEUE_SHARDS="3",
        AP_PORT=str(port),
        AP_WORKER_CONCURRENCY="20",
    )
    conveyor = stack.conveyor(Conveyor(env, port, ha_dir / "conveyor.log"))
    await conveyor.start()
    flow_id = await conveyor.create_flow()
    # Sync replies on a cluster: runs finishing together publish in one batch, which redis-py
    # cannot pipeline there (PUBLISH is refused in a cluster pipeline).
    echo = await conveyor.create_flow(SYNC_FLOW)
    async with aiohttp.ClientSession() as http:

        async def sync(n: int) -> tuple[int, object]:
            url = f"{conveyor.base}/api/v1/webhooks/{echo}/sync"
            async with http.post(url, json={"n": n}) as r:
                return r.status, await r.json()

        answers = await asyncio.gather(*(sync(n) for n in range(24)))
    assert sorted(answers, key=str) == sorted(((200, {"n": n}) for n in range(24)), key=str)

    load = Load(conveyor.base, flow_id, rate_per_s=40)
    load.start()
    try:
        await eventually(
            lambda: len(load.accepted) >= BEFORE_KILL,
            timeout_s=30,
            what="load flowing before the kill",
        )
        before = len(load.accepted)
        # The victim is the master holding the most queue streams (shards spread over slots).
        topology = cluster_nodes(nodes[0])
        by_port = {str(n.port): n for n in nodes}
        masters = [t for t in topology if "master" in t["flags"].split(",")]
        assert len(masters) == 3, topology
        counts = {m["id"]: stream_count(by_port[m["port"]]) for m in masters}
        victim = max(masters, key=lambda m: counts[m["id"]])
        assert counts[victim["id"]] > 0, f"no stream on any master: {counts}"
        heir = next(t for t in topology if t["master"] == victim["id"])
        witness = next(n for n in nodes if str(n.port) not in (victim["port"], heir["port"]))
        killed_wall, killed = time.time(), time.monotonic()
        by_port[victim["port"]].kill()
        await eventually(
            lambda: promoted(witness, victim["id"], heir["id"]),
            timeout_s=30,
            interval_s=0.05,
            what="failover (replica promoted, cluster ok)",
        )
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
    log_lines = len(conveyor.log.read_bytes().splitlines())
    assert b"RedisClusterException" not in conveyor.log.read_bytes(), conveyor.tail()
    slow = await slowest_runs(postgres_url, flow_id, 0, killed_wall, killed_wall + switch_s)
    print(
        f"\ncluster: replica promoted {switch_s:.1f} s after SIGKILL of the master holding "
        f"{counts[victim['id']]} of {sum(counts.values())} streams; {load.summary()}; "
        f"{before} before the kill, {after_switch} after the switch; {terminal} terminal, all "
        f"{len(load.accepted)} accepted SUCCEEDED {drain_s:.1f} s after the load stopped "
        f"(slowest before/during/after the outage: {slow[0]:.1f}/{slow[1]:.1f}/{slow[2]:.1f} s)"
        f"; conveyor logged {log_lines} lines"
    )
    assert before > 0 and after_switch > 0, load.summary()
    await stack.close_cleanly()
