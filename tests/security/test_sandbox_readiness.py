"""Issue 10: ``/readyz`` and the board show the sandbox's mode, and a dead sandbox is not ready."""

from __future__ import annotations

import os
import signal
from typing import Any

import psutil

from tests.api.conftest import make_client
from tests.polling import eventually

__all__ = ["make_client"]


async def test_readyz_and_board_show_the_mode_and_readiness(make_client: Any) -> None:
    """Mode and limit mechanism in /readyz and on the board; fork-server killed → 503, then back."""

    def fork_servers() -> set[int]:
        return {
            p.pid
            for p in psutil.Process().children()
            if "conveyor.sandbox.forkserver" in " ".join(p.cmdline())
        }

    before = fork_servers()  # other tests' sandboxes may live in this process too
    client = await make_client(AP_CONTAINER_TYPE="WORKER_AND_APP")
    resp = await client.get("/readyz")
    body = await resp.json()
    assert resp.status == 200, body
    sandbox = body["checks"]["sandbox"]
    assert sandbox["ok"] is True and sandbox["code_steps"] == "enabled"
    assert sandbox["isolation"] in ("full", "partial")
    assert sandbox["limits"] in ("cgroup-v2", "cgroup-v1", "rlimit")
    page = await (await client.get("/admin/workers")).text()
    assert f'data-sandbox="{sandbox["isolation"]}"' in page
    assert f"limits {sandbox['limits']}" in page
    servers = fork_servers() - before
    assert len(servers) == 1, servers
    os.kill(servers.pop(), signal.SIGKILL)
    seen: list[int] = []

    async def down_then_up() -> dict[str, Any] | None:
        resp = await client.get("/readyz")
        seen.append(resp.status)
        return await resp.json() if 503 in seen and resp.status == 200 else None

    body = await eventually(
        down_then_up, timeout_s=10, interval_s=0.05, what="/readyz 503, then 200"
    )
    assert 503 in seen, seen  # not ready while the fork-server is down …
    assert seen[-1] == 200, seen  # … and ready again once it restarted by itself
    assert body["checks"]["sandbox"]["ok"] is True
    metrics = await (await client.get("/metrics")).text()
    assert "conveyor_sandbox_ready 1.0" in metrics
    assert "conveyor_sandbox_free_uids" in metrics
