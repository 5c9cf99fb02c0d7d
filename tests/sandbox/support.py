"""Helpers for the sandbox tests: real fork-servers, and a process-table check for leftovers.

A session-wide :class:`Sandbox` serves the tests that do not tune limits (starting one costs
a fork-server start, ~0.2 s); tests that need other limits make their own with
:func:`make_sandbox`. :func:`assert_no_strays` is the "nothing left behind" proof: it walks
the host's process table (psutil) under the fork-server and checks that every process there
is the fork-server itself or a step process the sandbox knows about — no step's background
process, however it detached, survives its step.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

import psutil
import pytest

from conveyor.sandbox import Sandbox, SandboxConfig, SandboxResult

HAVE_BWRAP = shutil.which("bwrap") is not None
needs_bwrap = pytest.mark.skipif(not HAVE_BWRAP, reason="bubblewrap is not installed")


def config(**overrides: Any) -> SandboxConfig:
    """Test defaults: 2 slots, short deadlines; ``overrides`` as for :class:`SandboxConfig`."""
    values: dict[str, Any] = {"slots": 2, "max_timeout_s": 30.0, "kill_timeout_s": 10.0}
    values.update(overrides)
    return SandboxConfig(**values)


@asynccontextmanager
async def make_sandbox(**overrides: Any) -> AsyncIterator[Sandbox]:
    """A started sandbox with :func:`config` ``(**overrides)``, closed and checked after."""
    sb = Sandbox(config(**overrides))
    await sb.start()
    pid = sb.server_pid
    try:
        yield sb
    finally:
        await sb.close()
        assert pid is not None
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"


_counter = iter(range(1, 1 << 30))


async def run(
    sb: Sandbox,
    code: str,
    input: Any = None,
    *,
    flow_id: str | None = None,
    flow_version: int = 1,
    timeout_s: float = 10.0,
    step: str = "step",
) -> SandboxResult:
    """``sb.run_code`` with a unique flow id unless one is given."""
    return await sb.run_code(
        flow_id=flow_id or f"flow-{next(_counter)}",
        flow_version=flow_version,
        step=step,
        code=code,
        input=input,
        timeout_s=timeout_s,
    )


def _ns_pids(proc: psutil.Process) -> list[int]:
    """The pid in every PID namespace the process is in, outermost first (``NSpid``)."""
    try:
        with open(f"/proc/{proc.pid}/status") as fh:
            for line in fh:
                if line.startswith("NSpid:"):
                    return [int(p) for p in line.split()[1:]]
    except OSError:
        pass
    return [proc.pid]


def sandbox_processes(sb: Sandbox) -> list[psutil.Process]:
    """Every live process under the sandbox's launcher (bwrap, unshare or the server)."""
    assert sb.server_pid is not None
    try:
        root = psutil.Process(sb.server_pid)
        procs = root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    alive = []
    for proc in procs:
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.NoSuchProcess:
            continue
    return alive


async def assert_no_strays(sb: Sandbox) -> None:
    """Only the fork-server and known step processes live under the sandbox; none has kids."""
    await sb.settle()
    procs = sandbox_processes(sb)
    server_ns_pid = int(sb.probe.get("pid", -1))
    # The fork-server's namespace level: step pids are known as seen from there (a step in
    # a PID namespace of its own is 1 in its innermost one).
    level = next(
        (
            len(ns) - 1
            for p in procs
            if (ns := _ns_pids(p))[-1] == server_ns_pid and p.name() != "bwrap"
        ),
        0,
    )
    known = sb.child_pids()
    strays = []
    for proc in procs:
        ns = _ns_pids(proc)
        pid = ns[min(level, len(ns) - 1)]
        try:
            if pid == server_ns_pid or (pid == 1 and proc.name() == "bwrap"):
                continue
            if pid in known:
                continue
            strays.append((proc.pid, ns, proc.name(), proc.uids().real, proc.cmdline()[:3]))
        except psutil.NoSuchProcess:
            continue
    assert strays == [], f"processes left behind: {strays}"


def runs_sleep(pids: Iterable[int]) -> bool:
    """Whether one of ``pids`` is a ``sleep`` process (the marker a test step starts)."""
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            if psutil.Process(pid).cmdline()[:1] == ["sleep"]:
                return True
    return False


def descendants(pid: int | None) -> list[int]:
    """Pids of every process below ``pid`` (none once it is gone)."""
    try:
        return [c.pid for c in psutil.Process(pid or 0).children(recursive=True)]
    except psutil.Error:
        return []


def step_in_flight(sb: Sandbox) -> bool:
    """A step's request is with its child process, set up and running it (the worker
    awaits the answer)."""
    return any(s.child is not None and s.child.waiter is not None for s in sb._slots)
