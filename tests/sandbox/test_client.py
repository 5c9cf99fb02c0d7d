"""Sandbox.run_code end to end: results, errors, warm reuse, recycling, concurrency, restarts."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

import psutil

from conveyor.sandbox import Limits, Sandbox, SandboxStatus
from tests.polling import eventually
from tests.sandbox.support import (
    assert_no_strays,
    descendants,
    make_sandbox,
    needs_bwrap,
    run,
    runs_sleep,
    step_in_flight,
)

#: Returns an identity of the step process: random per process, kept while it stays warm
#: (a pid would not do: in a PID namespace of its own every child is pid 1).
PID = (
    "import os, sys\n"
    "def run(input):\n"
    "    return sys.__dict__.setdefault('_conveyor_test_identity', os.urandom(8).hex())\n"
)


async def test_returns_output_and_logs(sandbox: Sandbox) -> None:
    """run()'s return value comes back as output, print() output as logs."""
    code = (
        "def run(input):\n    print('total', input['n'])\n    return {'double': input['n'] * 2}\n"
    )
    result = await run(sandbox, code, {"n": 21})
    assert result.status is SandboxStatus.SUCCEEDED
    assert result.output == {"double": 42}
    assert result.logs == "total 21\n"
    assert result.error is None
    assert result.duration_ms > 0


async def test_async_run_is_awaited(sandbox: Sandbox) -> None:
    """An ``async def run`` is awaited inside the child."""
    code = (
        "import asyncio\nasync def run(input):\n    await asyncio.sleep(0)\n    return [1, 'a']\n"
    )
    result = await run(sandbox, code)
    assert result.status is SandboxStatus.SUCCEEDED
    assert result.output == [1, "a"]


async def test_exception_reports_user_traceback_only(sandbox: Sandbox) -> None:
    """A raise gives FAILED with type, message and only the user's own frames."""
    code = "def helper(x):\n    return x['missing']\n\ndef run(input):\n    return helper(input)\n"
    result = await run(sandbox, code, {}, step="score")
    assert result.status is SandboxStatus.FAILED
    assert result.error is not None
    assert result.error.endswith("KeyError: 'missing'")
    assert '<step score>", line 5, in run' in result.error
    assert '<step score>", line 2, in helper' in result.error
    assert "conveyor" not in result.error and "child.py" not in result.error


async def test_missing_run_and_syntax_error_fail(sandbox: Sandbox) -> None:
    """Code without run() or with a syntax error fails the step, not the sandbox."""
    missing = await run(sandbox, "x = 1\n")
    assert missing.status is SandboxStatus.FAILED
    assert "run(input)" in (missing.error or "")
    broken = await run(sandbox, "def run(input)\n    return 1\n")
    assert broken.status is SandboxStatus.FAILED
    assert "SyntaxError" in (broken.error or "")


async def test_non_json_output_fails(sandbox: Sandbox) -> None:
    """A return value that is not JSON-able is a FAILED step naming the type."""
    result = await run(sandbox, "def run(input):\n    return {1, 2}\n")
    assert result.status is SandboxStatus.FAILED
    assert "set" in (result.error or "")


async def test_non_json_input_fails_the_step(sandbox: Sandbox) -> None:
    """An input that cannot be sent as JSON fails the step without touching the child."""
    result = await run(sandbox, "def run(input):\n    return 1\n", {"when": object()})
    assert result.status is SandboxStatus.FAILED
    assert "JSON" in (result.error or "")


async def test_output_over_limit_fails() -> None:
    """A result larger than the output cap is refused with FAILED."""
    async with make_sandbox(limits=Limits(output_bytes=10_000)) as sb:
        result = await run(sb, "def run(input):\n    return 'x' * 20000\n")
        assert result.status is SandboxStatus.FAILED
        assert "limit" in (result.error or "")
        ok = await run(sb, "def run(input):\n    return 'x' * 100\n")
        assert ok.status is SandboxStatus.SUCCEEDED


async def test_stdlib_imports_after_uid_drop() -> None:
    """decimal, statistics, zoneinfo, json, re import in a step, even with no prewarm."""
    code = (
        "import decimal, statistics, zoneinfo, json, re, colorsys, os\n"
        "from datetime import datetime\n"
        "def run(input):\n"
        "    tz = zoneinfo.ZoneInfo('Europe/Paris')\n"
        "    return {'sum': str(decimal.Decimal('0.1') + decimal.Decimal('0.2')),\n"
        "            'mean': statistics.mean([1, 2, 3]), 'tz': datetime(2024, 7, 1, tzinfo=tz)"
        ".strftime('%z'),\n"
        "            'json': json.dumps({'a': 1}), 're': re.sub('a', 'b', 'aa'),\n"
        "            'hsv': colorsys.rgb_to_hsv(1, 0, 0)[2], 'uid': os.getuid()}\n"
    )
    async with make_sandbox(prewarm=()) as sb:
        result = await run(sb, code)
    assert result.status is SandboxStatus.SUCCEEDED, result.error
    out = result.output
    assert out["sum"] == "0.3" and out["mean"] == 2 and out["tz"] == "+0200"
    assert out["json"] == '{"a": 1}' and out["re"] == "bb" and out["hsv"] == 1
    if os.geteuid() == 0:
        assert out["uid"] >= 60_000


async def test_warm_child_reused_for_same_flow_version_only(sandbox: Sandbox) -> None:
    """Same flow version reuses the warm child; another version or flow gets a new one."""
    first = await run(sandbox, PID, flow_id="warm", flow_version=1)
    again = await run(sandbox, PID, flow_id="warm", flow_version=1)
    assert first.output == again.output
    assert sandbox.stats["SUCCEEDED"] >= 2 and sandbox.stats["starts"] >= 1
    other_version = await run(sandbox, PID, flow_id="warm", flow_version=2)
    other_flow = await run(sandbox, PID, flow_id="warm-2", flow_version=1)
    assert len({first.output, other_version.output, other_flow.output}) == 3


async def test_per_run_child_for_process_mode() -> None:
    """With ``per_run`` (SANDBOX_PROCESS) a run's code steps share one child, runs do not."""
    async with make_sandbox(per_run=True, slots=1) as sb:

        async def pid(run_id: str, step: str) -> str:
            result = await sb.run_code(
                flow_id="proc", flow_version=1, step=step, code=PID, input=None, run_id=run_id
            )
            assert isinstance(result.output, str)
            return result.output

        first, second = await pid("run-1", "a"), await pid("run-1", "b")
        other = await pid("run-2", "a")
    assert first == second != other


async def test_child_recycled_after_error(sandbox: Sandbox) -> None:
    """After a failed execution the next one of the same flow version gets a fresh child."""
    before = await run(sandbox, PID, flow_id="recycle", flow_version=1)
    failed = await run(sandbox, "def run(input):\n    raise ValueError('no')\n", flow_id="recycle")
    assert failed.status is SandboxStatus.FAILED
    after = await run(sandbox, PID, flow_id="recycle", flow_version=1)
    assert after.status is SandboxStatus.SUCCEEDED
    assert after.output != before.output


async def test_child_recycled_after_max_uses() -> None:
    """A warm child is replaced after ``warm_max_uses`` executions."""
    async with make_sandbox(warm_max_uses=3, slots=1) as sb:
        pids = [(await run(sb, PID, flow_id="uses")).output for _ in range(6)]
    assert pids[0] == pids[1] == pids[2]
    assert pids[3] == pids[4] == pids[5]
    assert pids[0] != pids[3]


async def test_fresh_child_per_execution_when_not_warm() -> None:
    """With ``warm=False`` every execution runs in a never-used child."""
    async with make_sandbox(warm=False, slots=1) as sb:
        pids = [(await run(sb, PID, flow_id="cold")).output for _ in range(4)]
        await assert_no_strays(sb)
    assert len(set(pids)) == 4


async def test_concurrent_executions_use_separate_slots(sandbox: Sandbox) -> None:
    """Concurrent steps run in parallel in different slots, each child under its own uid."""
    code = "import os, time\ndef run(input):\n    time.sleep(0.3)\n    return os.getuid()\n"
    results = await asyncio.gather(*(run(sandbox, code) for _ in range(4)))
    assert all(r.status is SandboxStatus.SUCCEEDED for r in results)
    if sandbox.probe.get("uid_drop"):
        assert all(r.output >= 60_000 for r in results)
        assert len({r.output for r in results[:2]}) == 2


async def test_restarts_after_fork_server_dies() -> None:
    """A killed fork-server fails the running step cleanly and is restarted on next use."""
    async with make_sandbox(slots=1) as sb:
        assert sb.server_pid is not None
        slow = asyncio.create_task(run(sb, "import time\ndef run(input):\n    time.sleep(30)\n"))
        await eventually(lambda: step_in_flight(sb), timeout_s=10, what="step handed to its child")
        os.kill(sb.server_pid, signal.SIGKILL)
        result = await asyncio.wait_for(slow, 15)
        assert result.status in (SandboxStatus.INTERNAL_ERROR, SandboxStatus.FAILED)
        again = await run(sb, "def run(input):\n    return 'back'\n")
        assert again.status is SandboxStatus.SUCCEEDED and again.output == "back"


async def test_cancelled_step_is_killed() -> None:
    """Cancelling run_code kills the step's process tree before the cancellation lands."""
    async with make_sandbox(slots=1) as sb:
        code = (
            "import subprocess, time\n"
            "def run(input):\n"
            "    subprocess.Popen(['sleep', '300'])\n"
            "    time.sleep(300)\n"
        )
        task = asyncio.create_task(run(sb, code, timeout_s=30))
        # Cancelled once the step's tree is there: the background sleep must die too.
        await eventually(lambda: runs_sleep(descendants(sb.server_pid)), timeout_s=10)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await assert_no_strays(sb)


async def test_close_leaves_no_process() -> None:
    """close() ends the fork-server and every step process."""
    sb = Sandbox()
    await sb.start()
    await run(sb, PID)
    procs = [psutil.Process(sb.server_pid or 0), *psutil.Process(sb.server_pid or 0).children(True)]
    await sb.close()

    def alive() -> list[int]:
        return [p.pid for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    # A moment for the kernel to reap what close() killed; a survivor fails the test.
    with contextlib.suppress(AssertionError):
        await eventually(lambda: not alive(), timeout_s=2)
    assert alive() == []


@needs_bwrap
async def test_isolation_report_full_with_bubblewrap(sandbox: Sandbox) -> None:
    """With bubblewrap (as root) /readyz gets isolation full and names the mechanism."""
    report = sandbox.isolation
    if os.geteuid() == 0:
        assert report["isolation"] == "full"
    assert "bubblewrap" in report["mechanism"] and "no network" in report["mechanism"]
