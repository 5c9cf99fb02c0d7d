"""Servers for the HA tests, each a child of the test on a free loopback port in a temp dir.

Redis primaries and replicas, Sentinels (``redis-server --sentinel``), a six-node Redis Cluster
made by ``redis-cli --cluster create``, PostgreSQL clusters (``initdb``, and streaming replicas
made by ``pg_basebackup -R``) and PgBouncer, all from the machine's Debian packages. PostgreSQL
and PgBouncer refuse to run as root, so as root they run as the ``postgres`` user. Every server
is its own process group (a kill takes its children too) and dies with the test process
(``PR_SET_PDEATHSIG``). A missing binary skips the test, or fails it under ``CONVEYOR_CI=1``.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import pwd
import re
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import pytest
import redis

from tests.polling import eventually_sync
from tests.queue.servers import free_port

PG_USER = "postgres"
_PR_SET_PDEATHSIG = 1


def missing(what: str) -> NoReturn:
    """Skip for a missing tool; fail under ``CONVEYOR_CI=1`` (CI installs every tool)."""
    message = f"{what} (.ci/run installs it)"
    if os.environ.get("CONVEYOR_CI") == "1":
        pytest.fail(message)
    pytest.skip(message)


def binary(name: str, package: str, *dirs: str) -> str:
    """The path of ``name`` (looked up in ``dirs`` first, then ``PATH``), or skip/fail."""
    for directory in dirs:
        path = os.path.join(directory, name)
        if os.access(path, os.X_OK):
            return path
    found = shutil.which(name)
    if found is None:
        missing(f"{name} not found: install the Debian package {package}")
    return found


def pg_binary(name: str) -> str:
    """A PostgreSQL server binary from the newest ``/usr/lib/postgresql/<major>/bin``."""
    dirs = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda d: int(re.sub(r"\D", "", Path(d).parent.name) or 0),
        reverse=True,
    )
    return binary(name, "postgresql", *dirs)


def run_as() -> str | None:
    """The user to run PostgreSQL and PgBouncer as: ``postgres`` when we are root."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(PG_USER)
    except KeyError:
        missing(f"running as root needs a {PG_USER!r} user for PostgreSQL and PgBouncer")
    return PG_USER


def give_to_server_user(path: Path) -> None:
    """Hand ``path`` to the user PostgreSQL runs as (as root, if that user exists; the Redis
    tests do not need it)."""
    if os.geteuid() != 0:
        return
    with contextlib.suppress(KeyError):
        entry = pwd.getpwnam(PG_USER)
        os.chown(path, entry.pw_uid, entry.pw_gid)


def _child_setup(death_signal: int) -> Callable[[], None]:
    def setup() -> None:
        # Runs after the uid switch (which would clear the parent-death signal).
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, death_signal, 0, 0, 0)

    return setup


class Process:
    """One server process in its own session; :meth:`kill` signals its whole group."""

    def __init__(
        self,
        argv: list[str],
        log: Path,
        *,
        user: str | None = None,
        death_signal: int = signal.SIGKILL,
    ) -> None:
        self.argv = argv
        self.log = log
        self.user = user
        self.death_signal = death_signal
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.log.parent,
                user=self.user,
                group=self.user,
                extra_groups=[] if self.user else None,
                start_new_session=True,
                preexec_fn=_child_setup(self.death_signal),  # noqa: PLW1509
            )

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the process group (``SIGKILL``: a crash) and reap the leader."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        self.proc.wait()
        if sig != signal.SIGKILL:
            # Children that outlive a gentle stop are not wanted either.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc = None

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


# --- Redis --------------------------------------------------------------------------------


def redis_server_binary() -> str:
    return binary("redis-server", "redis-server", "/usr/bin")


def _answers(process: Process | None, client: Callable[[], redis.Redis]) -> bool:
    """PING answered; a server that exited fails at once, with its log."""
    if process is None or not process.running:
        raise AssertionError(f"server exited:\n{process.tail() if process else ''}")
    with client() as c:
        return bool(c.ping())


class RedisNode:
    """A ``redis-server`` (no persistence) on a free port, with extra ``args``."""

    def __init__(self, root: Path, name: str, *args: str) -> None:
        self.name = name
        self.directory = root / name
        self.port = free_port()
        self.args = list(args)
        self.process: Process | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        argv = [
            redis_server_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            *self.args,
        ]  # fmt: skip
        self.process = Process(argv, self.directory / "redis.log")
        self.process.start()
        eventually_sync(
            lambda: _answers(self.process, self.client),
            timeout_s=10,
            what=f"redis {self.name}",
            ignore=(Exception,),
        )

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()


class SentinelNode:
    """``redis-server sentinel.conf --sentinel`` watching ``master`` as ``name``."""

    def __init__(self, root: Path, index: int, master: RedisNode, name: str) -> None:
        self.directory = root / f"sentinel{index}"
        self.port = free_port()
        self.master = master
        self.name = name
        self.process: Process | None = None

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def start(self, down_after_ms: int = 1000, failover_timeout_ms: int = 10_000) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        conf = self.directory / "sentinel.conf"
        conf.write_text(
            f"port {self.port}\n"
            "bind 127.0.0.1\n"
            f"dir {self.directory}\n"
            f"sentinel monitor {self.name} 127.0.0.1 {self.master.port} 2\n"
            f"sentinel down-after-milliseconds {self.name} {down_after_ms}\n"
            f"sentinel failover-timeout {self.name} {failover_timeout_ms}\n"
            f"sentinel parallel-syncs {self.name} 1\n"
        )
        argv = [redis_server_binary(), str(conf), "--sentinel"]
        self.process = Process(argv, self.directory / "sentinel.log")
        self.process.start()
        eventually_sync(
            lambda: _answers(self.process, self.client),
            timeout_s=10,
            what="a sentinel",
            ignore=(Exception,),
        )

    def master_port(self) -> int:
        with self.client() as c:
            _host, port = c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.name)
        return int(port)

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()


def replication_up(replica: RedisNode) -> bool:
    with replica.client() as c:
        info = c.info("replication")
    return info.get("master_link_status") == "up"


def start_sentinel_group(
    root: Path, name: str = "mymaster", sentinels: int = 3
) -> tuple[RedisNode, RedisNode, list[SentinelNode]]:
    """A master, its replica and ``sentinels`` Sentinels (quorum 2) that know each other."""
    master = RedisNode(root, "master")
    master.start()
    replica = RedisNode(root, "replica", "--replicaof", "127.0.0.1", str(master.port))
    replica.start()
    eventually_sync(
        lambda: replication_up(replica),
        timeout_s=15,
        what="the replica to sync",
        ignore=(Exception,),
    )
    group = [SentinelNode(root, i, master, name) for i in range(sentinels)]
    for s in group:
        s.start()

    def settled() -> bool:
        for s in group:
            with s.client() as c:
                state = c.sentinel_master(name)
            if state["num-other-sentinels"] != sentinels - 1 or state["num-slaves"] != 1:
                return False
        return True

    # Sentinels find each other through the master's hello channel (every 2 s); a failover
    # needs a majority of them to vote.
    eventually_sync(
        settled,
        timeout_s=30,
        what="the sentinels to discover each other and the replica",
        ignore=(Exception,),
    )
    return master, replica, group


def cluster_args() -> list[str]:
    """Cluster mode with a free bus port (the default, port + 10000, may be taken or > 65535);
    a small node timeout makes failover quick, validity factor 0 lets any replica take over."""
    return [
        "--cluster-enabled", "yes",
        "--cluster-config-file", "nodes.conf",
        "--cluster-port", str(free_port()),
        "--cluster-node-timeout", "1000",
        "--cluster-replica-validity-factor", "0",
    ]  # fmt: skip


def cluster_nodes(node: RedisNode) -> list[dict[str, str]]:
    """``CLUSTER NODES`` of ``node`` as dicts: id, port, flags, master (``-`` for masters)."""
    with node.client() as c:
        text = c.execute_command("CLUSTER", "NODES")
    if isinstance(text, bytes):
        text = text.decode()
    out = []
    for line in text.splitlines():
        fields = line.split()
        out.append(
            {
                "id": fields[0],
                "port": fields[1].split("@")[0].rsplit(":", 1)[1],
                "flags": fields[2],
                "master": fields[3],
            }
        )
    return out


def start_cluster(root: Path, masters: int = 3) -> list[RedisNode]:
    """``masters`` masters and one replica each, joined by ``redis-cli --cluster create``."""
    cli = binary("redis-cli", "redis-tools", "/usr/bin")
    nodes = [RedisNode(root, f"node{i}", *cluster_args()) for i in range(masters * 2)]
    for n in nodes:
        n.start()
    create = subprocess.run(
        [
            cli, "--cluster", "create", *(n.address for n in nodes),
            "--cluster-replicas", "1", "--cluster-yes",
        ],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    if create.returncode != 0:
        raise AssertionError(f"redis-cli --cluster create failed:\n{create.stdout}{create.stderr}")

    def ready() -> bool:
        for n in nodes:
            with n.client() as c:
                info = c.execute_command("CLUSTER", "INFO")
            if isinstance(info, bytes):
                info = info.decode()
            if "cluster_state:ok" not in info or f"cluster_known_nodes:{len(nodes)}" not in info:
                return False
            with n.client() as c:
                role = c.info("replication")
            if role["role"] != "master" and role.get("master_link_status") != "up":
                return False
        return True

    eventually_sync(
        ready,
        timeout_s=30,
        what="the cluster to be ok on every node with replicas in sync",
        ignore=(Exception,),
    )
    return nodes


# --- PostgreSQL and PgBouncer ---------------------------------------------------------------


class Postgres:
    """A PostgreSQL cluster in ``root/name`` on a free loopback port (trust auth)."""

    def __init__(self, root: Path, name: str) -> None:
        self.root = root
        self.name = name
        self.directory = root / name
        self.port = free_port()
        self.process: Process | None = None

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{PG_USER}@127.0.0.1:{self.port}/{database}"

    def _run(self, argv: list[str]) -> None:
        user = run_as()
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            cwd=self.root,
            user=user,
            group=user,
            extra_groups=[] if user else None,
        )
        if done.returncode != 0:
            raise AssertionError(f"{Path(argv[0]).name} failed:\n{done.stdout}{done.stderr}")

    def initdb(self) -> None:
        self._run(
            [
                pg_binary("initdb"), "-D", str(self.directory), "-U", PG_USER,
                "-A", "trust", "-E", "UTF8", "--no-locale", "--no-sync",
            ]
        )  # fmt: skip

    def basebackup(self, primary: Postgres) -> None:
        """Make this cluster a streaming replica of ``primary`` (``-R`` writes the config)."""
        self._run(
            [
                pg_binary("pg_basebackup"), "-h", "127.0.0.1", "-p", str(primary.port),
                "-U", PG_USER, "-D", str(self.directory), "-R", "-X", "stream",
                "-c", "fast", "--no-sync",
            ]
        )  # fmt: skip

    def start(self) -> None:
        argv = [
            pg_binary("postgres"), "-D", str(self.directory), "-p", str(self.port),
            "-k", str(self.root), "-c", "listen_addresses=127.0.0.1",
            "-c", "fsync=off", "-c", "full_page_writes=off", "-c", "max_connections=100",
            "-c", "shared_buffers=32MB",
        ]  # fmt: skip
        # SIGQUIT is PostgreSQL's immediate shutdown: the postmaster takes its backends down.
        self.process = Process(
            argv, self.root / f"{self.name}.log", user=run_as(), death_signal=signal.SIGQUIT
        )
        self.process.start()
        isready = pg_binary("pg_isready")

        def ready() -> bool:
            assert self.process is not None and self.process.running, self.process.tail()
            probe = ["-h", "127.0.0.1", "-p", str(self.port), "-U", PG_USER, "-q"]
            return subprocess.run([isready, *probe], check=False, timeout=5).returncode == 0

        eventually_sync(
            ready,
            timeout_s=30,
            what=f"PostgreSQL {self.name} to accept connections",
            ignore=(Exception,),
        )

    def kill(self, *, crash: bool = False) -> None:
        """Immediate shutdown (the postmaster cleans up), or with ``crash`` SIGKILL of the
        postmaster and every backend at once."""
        if self.process is None:
            return
        self.process.kill(signal.SIGKILL if crash else signal.SIGQUIT)
        if crash:
            # Nobody is left to remove the postmaster's SysV segment (id on line 7).
            with contextlib.suppress(OSError, IndexError, ValueError):
                shmid = (self.directory / "postmaster.pid").read_text().splitlines()[6].split()[1]
                subprocess.run(["ipcrm", "-m", shmid], check=False, capture_output=True)


class PgBouncer:
    """PgBouncer in transaction mode in front of ``backend``: at most ``pool_size`` server
    connections however many clients; ``database`` is served under the same name."""

    def __init__(
        self, root: Path, backend: Postgres, database: str = "postgres", pool_size: int = 4
    ) -> None:
        self.root = root
        self.directory = root / "pgbouncer"
        self.backend = backend
        self.database = database
        self.pool_size = pool_size
        self.port = free_port()
        self.process: Process | None = None

    @property
    def url(self) -> str:
        return f"postgresql://{PG_USER}@127.0.0.1:{self.port}/{self.database}"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        give_to_server_user(self.directory)
        (self.directory / "userlist.txt").write_text(f'"{PG_USER}" ""\n')
        ini = self.directory / "pgbouncer.ini"
        ini.write_text(
            "[databases]\n"
            f"{self.database} = host=127.0.0.1 port={self.backend.port} dbname={self.database}"
            f" user={PG_USER}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {self.directory / 'userlist.txt'}\n"
            f"admin_users = {PG_USER}\n"
            "pool_mode = transaction\n"
            f"default_pool_size = {self.pool_size}\n"
            f"max_db_connections = {self.pool_size}\n"
            "max_client_conn = 500\n"
            f"pidfile = {self.directory / 'pgbouncer.pid'}\n"
        )
        argv = [binary("pgbouncer", "pgbouncer", "/usr/sbin"), str(ini)]
        self.process = Process(argv, self.directory / "pgbouncer.log", user=run_as())
        self.process.start()
        isready = pg_binary("pg_isready")

        def ready() -> bool:
            assert self.process is not None and self.process.running, self.process.tail()
            probe = ["-h", "127.0.0.1", "-p", str(self.port), "-U", PG_USER, "-q"]
            return subprocess.run([isready, *probe], check=False, timeout=5).returncode == 0

        eventually_sync(
            ready, timeout_s=15, what="PgBouncer to accept connections", ignore=(Exception,)
        )

    def show(self, what: str) -> list[dict[str, str]]:
        """``SHOW <what>`` on the admin console (simple protocol only, hence psql)."""
        psql = pg_binary("psql")
        done = subprocess.run(
            [
                psql, "-h", "127.0.0.1", "-p", str(self.port), "-U", PG_USER,
                "-d", "pgbouncer", "--csv", "-c", f"SHOW {what}",
            ],
            capture_output=True, text=True, timeout=10, check=True,
        )  # fmt: skip
        lines = done.stdout.strip().splitlines()
        header = lines[0].split(",")
        return [dict(zip(header, row.split(","), strict=False)) for row in lines[1:]]

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
