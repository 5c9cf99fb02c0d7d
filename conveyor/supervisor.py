"""``AP_PM2_ENABLED=true``: one process per CPU core, like PM2's cluster mode.

The supervisor starts the embedded servers once (if any), then forks ``AP_PM2_INSTANCES``
(default: the number of cores) children. Each child runs its own uvloop event loop and the
full role of ``AP_CONTAINER_TYPE``; the API children share the port with ``SO_REUSEPORT`` so
the kernel spreads connections across them. A child that dies is restarted (with a backoff if
it keeps dying at start-up); SIGTERM or SIGINT is forwarded so every child drains, and only
when all have exited are the embedded servers stopped. Children get ``PR_SET_PDEATHSIG`` so a
``SIGKILL``ed supervisor leaves no orphans. Prometheus metrics from all children are merged
through a shared multiprocess directory, so one ``/metrics`` shows the whole container.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import structlog

from conveyor import logging as conveyor_logging
from conveyor.embedded import EmbeddedError, EmbeddedServers
from conveyor.settings import Settings

log = structlog.get_logger(__name__)

#: A child that dies sooner than this after its start counts as a crash loop.
MIN_UPTIME_S = 5.0
MAX_BACKOFF_S = 30.0
#: How long children get to drain after SIGTERM before they are killed.
DRAIN_TIMEOUT_S = 40.0


def instance_count(settings: Settings) -> int:
    return settings.pm2_instances or os.cpu_count() or 1


def _child_main(settings: Settings) -> None:
    """Runs in a forked child: never returns."""
    # The supervisor's handlers only set its flag: a child still starting up must die on
    # SIGTERM (a drain, or the parent-death signal) rather than ignore it.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG: die with the supervisor
    if os.getppid() == 1:  # the supervisor died before prctl took effect
        os._exit(1)
    code = 1
    try:
        import uvloop  # noqa: PLC0415 - imported after fork, in the child only

        from conveyor.runtime import serve  # noqa: PLC0415

        conveyor_logging.configure(settings)
        uvloop.run(serve(settings))
        code = 0
    except BaseException as exc:  # a child must never unwind into the supervisor's code
        print(f"conveyor child {os.getpid()}: {exc!r}", file=sys.stderr)
    finally:
        os._exit(code)


def _forget_metrics(pid: int) -> None:
    """Drop a dead child's live gauges from the merged ``/metrics`` (its counters stay)."""
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        return
    from prometheus_client import multiprocess  # noqa: PLC0415 - after the dir is set

    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


class Supervisor:
    """Forks and watches the children. Parameters: ``settings`` (already pointing at the
    embedded servers, if any); ``embedded`` servers to restart if they die."""

    def __init__(self, settings: Settings, embedded: EmbeddedServers | None = None) -> None:
        self.settings = settings
        self.embedded = embedded
        self.children: dict[int, float] = {}  # pid -> start time
        self.stopping = False
        self._failures = 0

    def _spawn(self) -> None:
        pid = os.fork()
        if pid == 0:
            _child_main(self.settings)
        self.children[pid] = time.monotonic()
        log.info("child started", child_pid=pid)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stopping = True

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        for _ in range(instance_count(self.settings)):
            self._spawn()
        while not self.stopping:
            self._reap()
            if self.embedded is not None:
                for name in self.embedded.restart_dead():
                    log.warning("embedded server died and was restarted", server=name)
            time.sleep(0.2)
        return self._drain()

    def _exited(self) -> list[tuple[int, int]]:
        """Children that exited, reaped by pid (never ``waitpid(-1)``: the embedded servers
        are our children too, and their Popen objects must reap them)."""
        done = []
        for pid in list(self.children):
            try:
                got, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                got, status = pid, 0
            if got:
                done.append((pid, status))
        return done

    def _reap(self) -> None:
        for pid, status in self._exited():
            started = self.children.pop(pid)
            _forget_metrics(pid)
            uptime = time.monotonic() - started
            log.warning("child exited", child_pid=pid, status=status, uptime_s=round(uptime, 1))
            if self.stopping:
                continue
            self._failures = self._failures + 1 if uptime < MIN_UPTIME_S else 0
            if self._failures:
                self._sleep(min(MAX_BACKOFF_S, 0.5 * 2 ** min(self._failures, 6)))
            if not self.stopping:
                self._spawn()

    def _sleep(self, seconds: float) -> None:
        """A crash back-off that a SIGTERM cuts short."""
        deadline = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(0.1)

    def _drain(self) -> int:
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while self.children and time.monotonic() < deadline:
            for pid, _ in self._exited():
                self.children.pop(pid)
            time.sleep(0.05)
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return 0


def run(settings: Settings) -> int:
    """Entry point of ``conveyor up`` when ``AP_PM2_ENABLED`` is true.

    Must run before prometheus-client is imported: it reads ``PROMETHEUS_MULTIPROC_DIR``
    once, at import, and the forked children inherit what it chose.
    """
    conveyor_logging.configure(settings, role="SUPERVISOR")
    embedded = EmbeddedServers(settings)
    try:
        settings = embedded.start()
    except EmbeddedError as exc:
        print(f"conveyor: {exc}", file=sys.stderr)
        return 2
    metrics_dir = settings.config_path / f"metrics-{os.getpid()}"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True, mode=0o700)
    # prometheus-client reads this variable itself, in every child, at import time.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    log.info("supervisor started", instances=instance_count(settings))
    try:
        return Supervisor(settings, embedded).run()
    finally:
        embedded.stop()
        shutil.rmtree(Path(metrics_dir), ignore_errors=True)
