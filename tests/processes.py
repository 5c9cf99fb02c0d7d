"""Helpers for tests that run `conveyor up` as a real process on a free loopback port."""

from __future__ import annotations

import asyncio
import os
import socket
import sys

import aiohttp


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
    async with aiohttp.ClientSession() as http:
        for _ in range(300):
            try:
                async with http.get(f"http://127.0.0.1:{port}/readyz") as r:
                    if r.status == 200:
                        return proc
            except aiohttp.ClientError:
                pass
            if proc.returncode is not None:
                break
            await asyncio.sleep(0.05)
    proc.kill()
    await proc.wait()
    raise AssertionError(f"conveyor up did not become ready on port {port}")


async def stop_conveyor(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM, and the process must drain and exit 0."""
    proc.terminate()
    assert await asyncio.wait_for(proc.wait(), 30) == 0
