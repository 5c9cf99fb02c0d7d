"""Embedded default: real Redis and PostgreSQL start, keep data, stop, and leave no orphans."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psutil
import pytest
import redis.asyncio as aioredis

from conveyor.embedded import EmbeddedServers, ensure_encryption_key
from conveyor.settings import Settings
from tests.polling import eventually_sync
from tests.processes import free_port

pytestmark = pytest.mark.embedded


@pytest.fixture
def config_dir() -> Iterator[Path]:
    """A fresh AP_CONFIG_PATH the embedded PostgreSQL user can traverse."""
    path = Path(tempfile.mkdtemp(prefix="conveyor-emb-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _servers_under(path: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
        except psutil.Error:
            continue
        if str(path) in cmd and ("redis-server" in cmd or "postgres" in cmd):
            found.append(proc)
    return found


def _wait_gone(path: Path, timeout_s: float = 10.0) -> list[psutil.Process]:
    """The servers still running under ``path`` once they are gone or ``timeout_s`` passed."""
    with contextlib.suppress(AssertionError):
        eventually_sync(lambda: not _servers_under(path), timeout_s=timeout_s, interval_s=0.1)
    return _servers_under(path)


async def test_start_stop_restart_keeps_data(config_dir: Path) -> None:
    """Data written before a stop is there after a restart; stop leaves no server behind."""
    env = {"AP_CONFIG_PATH": str(config_dir)}
    servers = EmbeddedServers(Settings.from_env(env))
    settings = servers.start()
    try:
        assert settings.redis_url and settings.postgres_url and settings.encryption_key
        conn = await asyncpg.connect(settings.postgres_url)
        await conn.execute("CREATE TABLE kept (v text); INSERT INTO kept VALUES ('pg-data')")
        await conn.close()
        client = aioredis.Redis.from_url(settings.redis_url)
        await client.set("kept", b"redis-data")
        await client.aclose()
    finally:
        servers.stop()
    assert _wait_gone(config_dir) == []

    again = EmbeddedServers(Settings.from_env(env))
    settings2 = again.start()
    try:
        conn = await asyncpg.connect(settings2.postgres_url)
        assert await conn.fetchval("SELECT v FROM kept") == "pg-data"
        await conn.close()
        client = aioredis.Redis.from_url(settings2.redis_url)
        assert await client.get("kept") == b"redis-data"
        await client.aclose()
        assert settings2.encryption_key == settings.encryption_key
    finally:
        again.stop()
    assert _wait_gone(config_dir) == []


def test_dead_server_is_restarted(config_dir: Path) -> None:
    """A killed embedded Redis is noticed and restarted by the supervisor hook."""
    servers = EmbeddedServers(Settings.from_env({"AP_CONFIG_PATH": str(config_dir)}))
    servers.start()
    try:
        assert servers.redis is not None and servers.redis.proc is not None
        servers.redis.proc.kill()
        servers.redis.proc.wait()
        assert servers.restart_dead() == ["redis"]
        assert servers.redis.alive()
    finally:
        servers.stop()
    assert _wait_gone(config_dir) == []


def test_encryption_key_file_permissions(config_dir: Path) -> None:
    """The generated key lives in keys/ (0700) as a 0600 file and is stable."""
    key = ensure_encryption_key(config_dir)
    assert len(key) == 64 and int(key, 16) >= 0
    assert stat.S_IMODE((config_dir / "keys").stat().st_mode) == 0o700
    assert stat.S_IMODE((config_dir / "keys" / "encryption.key").stat().st_mode) == 0o600
    assert ensure_encryption_key(config_dir) == key


def _start_up(config_dir: Path, port: int) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AP_")}
    env.update({"AP_CONFIG_PATH": str(config_dir), "AP_PORT": str(port)})
    return subprocess.Popen(
        [sys.executable, "-m", "conveyor", "up"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _ready_within(port: int, proc: subprocess.Popen[bytes], timeout_s: float) -> float:
    started = time.monotonic()

    def ready() -> bool:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
            return bool(r.status == 200)

    eventually_sync(ready, timeout_s=timeout_s, what="/readyz 200", ignore=(OSError,))
    return time.monotonic() - started


def test_conveyor_up_ready_then_ctrl_c_leaves_nothing(config_dir: Path) -> None:
    """`conveyor up`: ready on first start and on restart; SIGINT leaves no server process."""
    port = free_port()
    for timeout_s in (10.0, 5.0):  # first start (initdb), then restart on the same data
        proc = _start_up(config_dir, port)
        try:
            _ready_within(port, proc, timeout_s)
            assert len(_servers_under(config_dir)) >= 2
        finally:
            proc.send_signal(signal.SIGINT)
            assert proc.wait(30) == 0
        assert _wait_gone(config_dir) == []


def test_sigkill_of_conveyor_takes_servers_down(config_dir: Path) -> None:
    """Even a SIGKILLed Conveyor leaves no orphaned redis-server or postgres behind."""
    port = free_port()
    proc = _start_up(config_dir, port)
    try:
        _ready_within(port, proc, 10.0)
    finally:
        proc.kill()
        proc.wait(10)
    assert _wait_gone(config_dir, 15.0) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="the PostgreSQL system user exists only as root")
def test_private_parent_is_one_clear_line(config_dir: Path) -> None:
    """As root, an AP_CONFIG_PATH under a 0700 directory: exit 2, one line with the fix."""
    private = config_dir / "private"
    private.mkdir(mode=0o700)
    proc = _start_up(private / "c", free_port())
    _, err = proc.communicate(timeout=60)
    lines = err.decode().strip().splitlines()
    assert proc.returncode == 2, err
    assert len(lines) == 1 and "Traceback" not in lines[0]
    assert f"cannot enter {private} (mode 0700)" in lines[0] and "chmod o+x" in lines[0]
    assert _wait_gone(config_dir) == []
