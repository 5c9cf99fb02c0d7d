"""Issue 10, finding 3: limits are per step, not per process, and flows share no loopback.

A step that forks, or keeps data in memfds (which no address space counts), must stay
within ``AP_SANDBOX_MEMORY_LIMIT`` as a whole: each child has a cgroup of its own where the
host lets us write one (cgroup v1 here; v2 in containers that delegate it). And every child
has a network namespace of its own, so a warm child of flow A cannot talk to flow B's.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest

from conveyor.sandbox import Limits, Sandbox, SandboxStatus
from tests.sandbox.support import make_sandbox, run

LIMIT_KB = 256 * 1024


@pytest.fixture
async def capped() -> AsyncIterator[Sandbox]:
    """A sandbox with a 256 MiB memory limit; the host must give it cgroups."""
    async with make_sandbox(slots=1, limits=Limits(memory_kb=LIMIT_KB, nproc=64)) as sb:
        if sb.health()["limits"] == "rlimit":
            if os.environ.get("CONVEYOR_CI"):
                pytest.fail("no writable cgroup on the CI machine")
            pytest.skip("cgroups are not writable here: limits fall back to rlimits")
        yield sb


_FORKS = """
import os, time
def run(input):
    pids = []
    for _ in range(3):
        pid = os.fork()
        if pid == 0:
            data = b"x" * (160 << 20)   # 160 MiB, every page touched
            time.sleep(1.5)
            os._exit(0 if len(data) else 1)
        pids.append(pid)
    codes = [os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids]
    return {"held": codes.count(0), "codes": codes}
"""


async def test_forked_processes_share_the_memory_limit(capped: Sandbox) -> None:
    """Three forks of 160 MiB each under a 256 MiB limit: the kernel kills all but one."""
    result = await run(capped, _FORKS, timeout_s=30)
    if result.status is SandboxStatus.SUCCEEDED:
        assert result.output["held"] <= 1, result.output
        assert -9 in result.output["codes"], result.output  # OOM-killed, not refused
    else:
        assert result.status is SandboxStatus.MEMORY_LIMIT_EXCEEDED, result


_MEMFDS = """
import os
def run(input):
    fds, total = [], 0
    chunk = b"m" * (16 << 20)
    try:
        for _ in range(40):              # up to 640 MiB, none of it mapped
            fd = os.memfd_create("hoard")
            for _ in range(4):
                os.write(fd, chunk)
                total += len(chunk)
            fds.append(fd)
    except OSError as exc:
        return {"total_mb": total >> 20, "stopped": type(exc).__name__}
    return {"total_mb": total >> 20, "stopped": None}
"""


async def test_memfds_count_against_the_memory_limit(capped: Sandbox) -> None:
    """Data held in memfds is charged to the step: it cannot hoard past its limit."""
    result = await run(capped, _MEMFDS, timeout_s=30)
    if result.status is SandboxStatus.SUCCEEDED:
        assert result.output["total_mb"] <= LIMIT_KB >> 10, result.output
        assert result.output["stopped"] is not None
    else:
        assert result.status is SandboxStatus.MEMORY_LIMIT_EXCEEDED, result
    again = await run(capped, "def run(input):\n    return 'ok'\n")
    assert again.status is SandboxStatus.SUCCEEDED, again.error


async def test_readyz_names_the_limit_mechanism(capped: Sandbox) -> None:
    """The /readyz sandbox check says which mechanism enforces the limits."""
    assert capped.health()["limits"] in ("cgroup-v1", "cgroup-v2")
    assert capped.isolation["limits"] == capped.health()["limits"]


_LISTEN = """
import socket, sys
def run(input):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind(b"\\0conveyor-flow-a")
    abstract.listen(4)
    sys.__dict__["_keep"] = (srv, abstract)   # stays open in the warm child
    return srv.getsockname()[1]
"""
_CONNECT = """
import socket
def run(input):
    out = {}
    for name, family, addr in (("tcp", socket.AF_INET, ("127.0.0.1", input)),
                               ("abstract", socket.AF_UNIX, b"\\0conveyor-flow-a")):
        s = socket.socket(family)
        s.settimeout(2)
        try:
            s.connect(addr)
            s.sendall(b"flow b was here")
            out[name] = "connected"
        except OSError as exc:
            out[name] = type(exc).__name__
        finally:
            s.close()
    return out
"""


async def test_warm_children_of_different_flows_share_no_loopback() -> None:
    """Flow A's warm child listens on loopback; flow B's step, in the other slot, can't reach it."""
    async with make_sandbox(slots=2) as sb:
        port = await run(sb, _LISTEN, flow_id="flow-a")
        assert port.status is SandboxStatus.SUCCEEDED, port.error
        seen = await run(sb, _CONNECT, port.output, flow_id="flow-b")
    assert seen.status is SandboxStatus.SUCCEEDED, seen.error
    assert seen.output == {"tcp": "ConnectionRefusedError", "abstract": "ConnectionRefusedError"}
