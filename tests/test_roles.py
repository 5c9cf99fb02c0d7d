"""Split roles: an APP process ingests, a separate WORKER process runs, replies cross over."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


Start = Callable[..., Any]


@pytest.fixture
async def start_role(
    db: Any, redis: Any, postgres_url: str, redis_url: str
) -> AsyncIterator[Start]:
    """Start `conveyor up` in a given role against the test servers; stopped afterwards."""
    procs: list[asyncio.subprocess.Process] = []

    async def start(role: str, port: int, **extra: str) -> asyncio.subprocess.Process:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AP_")}
        env.update(
            {
                "AP_POSTGRES_URL": postgres_url,
                "AP_REDIS_URL": redis_url,
                "AP_ENCRYPTION_KEY": "12" * 32,
                "AP_CONTAINER_TYPE": role,
                "AP_LOG_LEVEL": "warning",
                **extra,
            }
        )
        env["AP_METRICS_PORT" if role == "WORKER" else "AP_PORT"] = str(port)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "conveyor",
            "up",
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        procs.append(proc)
        async with aiohttp.ClientSession() as http:
            for _ in range(300):
                try:
                    async with http.get(f"http://127.0.0.1:{port}/readyz") as r:
                        if r.status == 200:
                            return proc
                except aiohttp.ClientError:
                    pass
                assert proc.returncode is None, f"{role} exited"
                await asyncio.sleep(0.05)
        raise AssertionError(f"{role} not ready")

    yield start
    for proc in procs:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 30) == 0


async def test_app_ingests_worker_runs(start_role: Start) -> None:
    """A sync webhook to the APP process is run by the WORKER process and answered."""
    app_port, worker_port = _free_port(), _free_port()
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
