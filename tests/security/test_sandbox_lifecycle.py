"""Issue 10, finding 1: retiring a step process never depends on its cooperation.

A step can make its own interpreter refuse to exit (replace ``os._exit``, ignore signals,
loop in ``finally``) and then fail. The fork-server SIGKILLs a retired child and its whole
tree, reaps it, and only then gives its uid back — so no number of such runs exhausts the
pool, and exhaustion, were it to happen, shows in ``/readyz``'s sandbox check.
"""

from __future__ import annotations

import asyncio

import pytest

from conveyor.sandbox import Sandbox, SandboxResult, SandboxStatus
from tests.polling import eventually
from tests.sandbox.support import (
    assert_no_strays,
    config,
    make_sandbox,
    run,
    step_in_flight,
)

#: Ways a step makes its process refuse to exit once it has failed.
STUBBORN = {
    "os-exit": (
        "import os, time\n"
        "def run(input):\n"
        "    os._exit = lambda code: time.sleep(3600)\n"
        "    raise RuntimeError('fail, then never exit')\n"
    ),
    "signals-and-finally": (
        "import atexit, os, signal, sys, time\n"
        "def _forever(*_):\n"
        "    while True:\n"
        "        try:\n"
        "            time.sleep(3600)\n"
        "        finally:\n"
        "            continue\n"
        "def run(input):\n"
        "    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):\n"
        "        signal.signal(sig, signal.SIG_IGN)\n"
        "    atexit.register(_forever)\n"
        "    sys.exit = os._exit = _forever\n"
        "    if os.fork() == 0:\n"
        "        os.setsid()\n"
        "        _forever()\n"
        "    raise RuntimeError('fail, then never exit')\n"
    ),
}


@pytest.mark.parametrize("attack", sorted(STUBBORN))
async def test_stubborn_children_do_not_exhaust_the_uid_pool(attack: str) -> None:
    """Runs that tamper with their exit path, then fail, leave no process and no uid held."""
    async with make_sandbox(slots=1, spares=1, uid_count=8) as sb:
        # Twice the whole pool: without a forced kill the pool runs dry halfway.
        runs = 2 * sb.uid_count
        for i in range(runs):
            result = await run(sb, STUBBORN[attack], flow_id=f"stubborn-{i}", timeout_s=10)
            assert result.status is SandboxStatus.FAILED, (i, result)
            assert "never exit" in (result.error or ""), (i, result)
        ok = await run(sb, "def run(input):\n    return 'still serving'\n")
        assert ok.status is SandboxStatus.SUCCEEDED, ok.error
        await assert_no_strays(sb)
        health = sb.health()
        assert health["ok"] is True, health
        assert sb.stats["retired"] >= runs


async def test_exhausted_pool_is_not_ready() -> None:
    """With every uid in use the next step fails INTERNAL_ERROR, health says why, and recovers."""
    sb = Sandbox(config(slots=2, spares=0))
    # One uid for children (the last of the window is the probe's): two slots, one uid.
    sb.uid_count = 2
    await sb.start()
    try:
        if not sb.probe.get("uid_drop"):
            pytest.skip("per-child uids need root")
        assert sb.health()["ok"] is True
        sleep = "import time\ndef run(input):\n    time.sleep(2)\n    return 2\n"
        sleeper = asyncio.create_task(run(sb, sleep, flow_id="sleepy"))
        # The sleeper holds the only uid once its child runs it.
        await eventually(lambda: step_in_flight(sb), timeout_s=10, what="the sleeper running")
        starved = await run(sb, "def run(input):\n    return 1\n")
        assert starved.status is SandboxStatus.INTERNAL_ERROR, starved
        assert "capacity" in (starved.error or "")
        health = sb.health()
        assert health["ok"] is False and "capacity" in health["error"], health
        assert sb.stats["capacity_exhausted"] == 1
        assert (await sleeper).status is SandboxStatus.SUCCEEDED
        # The sleeper's warm child (same flow version) serves again: the pool is not stuck.
        again = await run(sb, sleep, flow_id="sleepy")
        assert again.output == 2
        # Another flow: the warm child is retired, its uid comes back, a new child starts.

        async def other_flow_served() -> SandboxResult | None:
            other = await run(sb, "def run(input):\n    return 3\n", flow_id="other")
            return other if other.status is SandboxStatus.SUCCEEDED else None

        other = await eventually(
            other_flow_served, timeout_s=10, interval_s=0.05, what="another flow served"
        )
        assert other.output == 3
        assert sb.health()["ok"] is True
    finally:
        await sb.close()
