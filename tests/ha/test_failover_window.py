"""The seconds a Redis failover takes, seen from ingest: webhooks are still accepted (the run
is committed to PostgreSQL first) and the outage is logged once, not once per webhook."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from tests.ha.conftest import Stack
from tests.ha.load import Conveyor
from tests.ha.servers import RedisNode
from tests.polling import eventually
from tests.processes import conveyor_env, free_port

WEBHOOKS = 100


@pytest.mark.timeout(60)
@pytest.mark.usefixtures("db")
async def test_ingest_logs_a_redis_outage_once(
    stack: Stack, ha_dir: Path, postgres_url: str
) -> None:
    """100 webhooks while Redis is down: all 202, and far fewer log lines than webhooks."""
    node = stack.server(RedisNode(ha_dir, "redis"))
    node.start()
    port = free_port()
    env = conveyor_env(postgres_url, f"redis://{node.address}/0", AP_PORT=str(port))
    conveyor = stack.conveyor(Conveyor(env, port, ha_dir / "conveyor.log"))
    await conveyor.start()
    flow_id = await conveyor.create_flow()
    mark = conveyor.log.stat().st_size
    node.kill()
    # Counting starts once the outage has been noticed (and logged, after the kill) without
    # any webhook.
    await eventually(
        lambda: b"backend.unavailable" in conveyor.log.read_bytes()[mark:],
        timeout_s=10,
        what="the Redis outage logged",
    )
    lines_before = len(conveyor.log.read_bytes().splitlines())
    async with aiohttp.ClientSession() as http:

        async def post(n: int) -> int:
            async with http.post(f"{conveyor.base}/api/v1/webhooks/{flow_id}", json={"n": n}) as r:
                return r.status

        statuses = [await post(n) for n in range(WEBHOOKS)]
    lines = len(conveyor.log.read_bytes().splitlines()) - lines_before
    node.start()
    assert statuses == [202] * WEBHOOKS, statuses
    assert lines < WEBHOOKS // 5, f"{lines} log lines for {WEBHOOKS} webhooks:\n{conveyor.tail()}"
    await stack.close_cleanly()
