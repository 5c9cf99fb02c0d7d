"""Split roles: an APP process ingests, a separate WORKER process runs, replies cross over."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from tests.processes import conveyor_env, free_port, start_conveyor, stop_conveyor

FLOW = {
    "name": "split",
    "trigger": {"type": "webhook"},
    "steps": [
        {
            "name": "double",
            "type": "code",
            "input": {"n": "{{trigger.body.n}}"},
            "code": "def run(input):\n    return input['n'] * 2\n",
        },
        {"name": "reply", "type": "respond", "input": {"status": 200, "body": "{{double}}"}},
    ],
}


Start = Callable[..., Any]


@pytest.fixture
async def start_role(
    db: Any, redis: Any, postgres_url: str, redis_url: str
) -> AsyncIterator[Start]:
    """Start `conveyor up` in a given role against the test servers; stopped afterwards."""
    procs: list[asyncio.subprocess.Process] = []

    async def start(role: str, port: int) -> asyncio.subprocess.Process:
        listen = "AP_METRICS_PORT" if role == "WORKER" else "AP_PORT"
        env = conveyor_env(postgres_url, redis_url, AP_CONTAINER_TYPE=role, **{listen: str(port)})
        proc = await start_conveyor(env, port)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        await stop_conveyor(proc)


async def test_app_ingests_worker_runs(start_role: Start) -> None:
    """A sync webhook to the APP process is run by the WORKER process and answered."""
    app_port, worker_port = free_port(), free_port()
    await start_role("APP", app_port)
    await start_role("WORKER", worker_port)
    base = f"http://127.0.0.1:{app_port}"
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{base}/api/v1/flows", json=FLOW) as r:
            fid = (await r.json())["id"]
        async with http.post(f"{base}/api/v1/webhooks/{fid}/sync", json={"n": 21}) as r:
            assert r.status == 200
            assert await r.json() == 42
        # The worker serves only health and metrics on its port, no API.
        async with http.get(f"http://127.0.0.1:{worker_port}/healthz") as r:
            assert r.status == 200
        async with http.get(f"http://127.0.0.1:{worker_port}/api/v1/flows") as r:
            assert r.status == 404
        async with http.get(f"http://127.0.0.1:{worker_port}/metrics") as r:
            assert r.status == 200 and "conveyor_" in await r.text()
