"""PM2-style cluster mode: N children on one port, restarted when they die, drained on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from typing import Any

import psutil

from tests.polling import eventually_sync
from tests.processes import free_port


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def _children(proc: subprocess.Popen[bytes]) -> set[int]:
    """Live (non-zombie) child processes of the supervisor."""
    live = set()
    for child in psutil.Process(proc.pid).children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                live.add(child.pid)
        except psutil.Error:
            continue
    return live


def _merged_concurrency(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    line = next(x for x in text.splitlines() if x.startswith("conveyor_worker_concurrency "))
    return float(line.split()[1])


async def test_cluster_restarts_dead_child_and_drains(
    db: Any, postgres_url: str, redis_url: str
) -> None:
    """Two children serve one port; a SIGKILLed child is replaced; SIGTERM stops them all."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AP_")}
    env.update(
        {
            "AP_POSTGRES_URL": postgres_url,
            "AP_REDIS_URL": redis_url,
            "AP_ENCRYPTION_KEY": "ef" * 32,
            "AP_PORT": str(port),
            "AP_PM2_ENABLED": "true",
            "AP_PM2_INSTANCES": "2",
            "AP_LOG_LEVEL": "warning",
        }
    )
    proc = subprocess.Popen(  # noqa: ASYNC220 - the test's loop serves nothing meanwhile
        [sys.executable, "-m", "conveyor", "up"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait = {"timeout_s": 20.0, "interval_s": 0.1}
        eventually_sync(
            lambda: _ready(port) and len(_children(proc)) == 2, what="cluster ready", **wait
        )
        first = _children(proc)
        victim = sorted(first)[0]
        os.kill(victim, signal.SIGKILL)
        eventually_sync(
            lambda: len(_children(proc) - {victim}) == 2 and victim not in _children(proc),
            what="dead child replaced",
            **wait,
        )
        eventually_sync(lambda: _ready(port), what="ready again", **wait)
        kids = _children(proc)
        # One /metrics merges every child: two live children with one slot each.
        eventually_sync(lambda: _merged_concurrency(port) == 2.0, what="concurrency 2", **wait)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    assert code == 0
    assert not any(
        psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie" for pid in kids
    )
