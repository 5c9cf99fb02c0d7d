"""Per-child PID namespaces: the isolation used when not root (forced here, as root)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from conveyor.sandbox import Limits, Sandbox, SandboxStatus
from tests.sandbox.support import assert_no_strays, make_sandbox, needs_bwrap, run

pytestmark = needs_bwrap


@pytest.fixture
async def pidns() -> AsyncIterator[Sandbox]:
    """A bubblewrap sandbox whose children are each init of a PID namespace of their own."""
    async with make_sandbox(child_pid_namespace=True, limits=Limits(nproc=64)) as sb:
        if not sb.probe.get("child_pid_namespace"):
            pytest.skip("the kernel refuses nested PID namespaces here")
        yield sb


async def test_report_names_the_mechanism(pidns: Sandbox) -> None:
    """The /readyz mechanism lists the per-child PID namespace."""
    assert "per-child pid namespace" in pidns.isolation["mechanism"]


async def test_step_sees_nothing_outside_its_namespace(pidns: Sandbox) -> None:
    """The step is pid 1 of its namespace; the fork-server and its siblings are out of reach."""
    code = (
        "import os\n"
        "def run(input):\n"
        "    seen = []\n"
        "    for pid in range(2, 64):\n"
        "        try:\n"
        "            os.kill(pid, 0)\n"
        "            seen.append(pid)\n"
        "        except OSError:\n"
        "            pass\n"
        "    return {'pid': os.getpid(), 'signalable': seen}\n"
    )
    result = await run(pidns, code)
    assert result.status is SandboxStatus.SUCCEEDED, result.error
    assert result.output == {"pid": 1, "signalable": []}


async def test_capabilities_are_dropped(pidns: Sandbox) -> None:
    """The step holds no capability and has no_new_privs set."""
    code = (
        "def run(input):\n"
        "    lines = open('/proc/self/status').read().splitlines()\n"
        "    return {l.split(':')[0]: l.split()[1] for l in lines\n"
        "            if l.startswith(('CapEff', 'CapPrm', 'NoNewPrivs'))}\n"
    )
    result = await run(pidns, code)
    assert result.output == {"CapEff": "0" * 16, "CapPrm": "0" * 16, "NoNewPrivs": "1"}


@pytest.mark.parametrize(
    "code",
    [
        "import subprocess\n    subprocess.Popen(['sleep', '300'], start_new_session=True)",
        "import os, time\n    if os.fork() == 0:\n        os.setsid()\n        time.sleep(300)",
        "import os\n    if os.fork() == 0:\n        while True:\n            try:\n"
        "                os.fork()\n            except OSError:\n                pass",
    ],
    ids=["setsid", "fork", "fork-bomb"],
)
async def test_tree_dies_with_the_step(pidns: Sandbox, code: str) -> None:
    """Whatever the step leaves running is killed in one pass by the namespace's init."""
    body = f"def run(input):\n    {code}\n    import time\n    time.sleep(0.3)\n    return 'ok'\n"
    first = await run(pidns, body, flow_id="tree", timeout_s=20)
    assert first.status is SandboxStatus.SUCCEEDED, first.error
    await assert_no_strays(pidns)
    again = await run(pidns, "def run(input):\n    return 2\n", flow_id="tree")
    assert again.output == 2


async def test_timeout_kills_the_namespace(pidns: Sandbox) -> None:
    """A timed-out step's namespace dies with it, background processes included."""
    code = (
        "import subprocess, time\n"
        "def run(input):\n"
        "    subprocess.Popen(['sleep', '300'], start_new_session=True)\n"
        "    time.sleep(60)\n"
    )
    result = await run(pidns, code, timeout_s=0.5)
    assert result.status is SandboxStatus.TIMEOUT
    await assert_no_strays(pidns)
