"""Helpers for tests that run `conveyor up` as a real process on a free loopback port."""

from __future__ import annotations

import asyncio
import os
import socket
import sys

import aiohttp

from tests.polling import eventually


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def conveyor_env(postgres_url: str, redis_url: str, **ap: str) -> dict[str, str]:
    """This process's environment without any AP_* of its own, pointed at the test servers."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AP_")}
    env.update(
        {
            "AP_POSTGRES_URL": postgres_url,
            "AP_REDIS_URL": redis_url,
            "AP_ENCRYPTION_KEY": "cd" * 32,
            "AP_LOG_LEVEL": "warning",
            **ap,
        }
    )
    return env


async def start_conveyor(env: dict[str, str], port: int) -> asyncio.subprocess.Process:
    """`python -m conveyor up` with ``env``; returns once ``port`` answers /readyz 200."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "conveyor", "up", env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await wait_ready(f"http://127.0.0.1:{port}", proc)
    except AssertionError:
        proc.kill()
        await proc.wait()
        raise
    return proc


async def wait_ready(base: str, proc: asyncio.subprocess.Process, timeout_s: float = 15.0) -> None:
    """Wait until ``base``/readyz answers 200; fail at once if ``proc`` exits meanwhile."""
    async with aiohttp.ClientSession() as http:

        async def ready() -> bool:
            assert proc.returncode is None, f"conveyor up exited with {proc.returncode}"
            async with http.get(f"{base}/readyz") as r:
                return r.status == 200

        await eventually(
            ready, timeout_s=timeout_s, interval_s=0.05, what=f"{base}/readyz 200",
            ignore=(aiohttp.ClientError,),
        )  # fmt: skip


async def stop_conveyor(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM, and the process must drain and exit 0."""
    proc.terminate()
    assert await asyncio.wait_for(proc.wait(), 30) == 0
