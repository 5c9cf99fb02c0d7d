"""How executions are spread over slots: a few warm children for bursts, long steps spill
over, queued callers are served in order, and a warm child starts each execution clean."""

from __future__ import annotations

import asyncio
import contextlib
import os

from conveyor.sandbox import Sandbox, SandboxStatus
from tests.polling import eventually
from tests.sandbox.support import assert_no_strays, make_sandbox, run, step_in_flight

#: An identity of the step process, kept while it stays warm (see test_client.PID).
IDENTITY = (
    "import os, sys\n"
    "def run(input):\n"
    "    return sys.__dict__.setdefault('_conveyor_test_identity', os.urandom(8).hex())\n"
)
SLEEP = "import time\ndef run(input):\n    time.sleep(input)\n    return input\n"


async def test_burst_queues_for_the_same_warm_child() -> None:
    """With ``active=1`` concurrent short steps of one flow wait for the one warm child
    instead of each waking a child of its own; all of them succeed."""
    async with make_sandbox(slots=4, active=1, spill_s=30.0) as sb:
        results = await asyncio.gather(*(run(sb, IDENTITY, flow_id="burst") for _ in range(8)))
        assert all(r.error is None for r in results)
        assert len({r.output for r in results}) == 1
        assert sb._busy == 0 and len(sb._idle) == 4
        await assert_no_strays(sb)


async def test_long_step_does_not_hold_up_the_queue() -> None:
    """An execution running past ``spill_s`` stops counting against ``active``: a step
    queued behind it gets a slot of its own and finishes first."""
    async with make_sandbox(slots=2, active=1, spill_s=0.05) as sb:
        slow = asyncio.create_task(run(sb, SLEEP, 3, flow_id="slow"))
        await eventually(lambda: step_in_flight(sb), timeout_s=10, what="slow step running")
        quick = await run(sb, IDENTITY, flow_id="quick")
        assert quick.error is None
        assert not slow.done()
        assert (await slow).output == 3
        await assert_no_strays(sb)


async def test_cancelled_waiter_keeps_the_slots_consistent() -> None:
    """A caller cancelled while queued (or just as it was handed a slot) leaks no slot."""
    async with make_sandbox(slots=2, active=1, spill_s=30.0) as sb:
        first = asyncio.create_task(run(sb, SLEEP, 0.5, flow_id="hold"))
        await eventually(lambda: step_in_flight(sb), timeout_s=10, what="first step running")
        queued = [asyncio.create_task(run(sb, IDENTITY, flow_id="hold")) for _ in range(3)]
        await asyncio.sleep(0.05)
        queued[0].cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await queued[0]
        assert (await first).output == 0.5
        # Handed a slot and cancelled before it could run: the slot comes back.
        queued[1].cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await queued[1]
        assert (await queued[2]).error is None
        assert (await run(sb, IDENTITY, flow_id="hold")).error is None
        assert sb._busy == 0 and len(sb._idle) == 2 and not sb._waiters
        await assert_no_strays(sb)


async def test_warm_child_starts_with_an_empty_tmp() -> None:
    """Files, hidden files, directories and links a step leaves in /tmp are gone when the
    same warm child runs the next execution."""
    litter = (
        "import os, sys\n"
        "def run(input):\n"
        "    os.makedirs('/tmp/d/e', exist_ok=True)\n"
        "    open('/tmp/d/e/f', 'w').write('x')\n"
        "    open('/tmp/.hidden', 'w').write('x')\n"
        "    os.symlink('/tmp/d', '/tmp/link')\n"
        "    return sys.__dict__.setdefault('_id', os.urandom(8).hex())\n"
    )
    look = (
        "import os, sys\n"
        "def run(input):\n"
        "    return [sys.__dict__.get('_id'), sorted(os.listdir('/tmp'))]\n"
    )
    async with make_sandbox(slots=1) as sb:
        first = await run(sb, litter, flow_id="litter", step="a")
        assert first.error is None
        second = await run(sb, look, flow_id="litter", step="b")
        assert second.error is None
        assert second.output == [first.output, []]
        await assert_no_strays(sb)


async def test_low_level_thread_left_running_retires_the_warm_child() -> None:
    """A thread started with ``_thread`` (not ``threading``) still alive after run() gets
    the child retired: the next execution of the same flow version is in a new child."""
    left = (
        "import _thread, os, sys, time\n"
        "def run(input):\n"
        "    if input:\n"
        "        _thread.start_new_thread(time.sleep, (300,))\n"
        "    return sys.__dict__.setdefault('_id', os.urandom(8).hex())\n"
    )
    async with make_sandbox(slots=1) as sb:
        first = await run(sb, left, False, flow_id="threads")
        second = await run(sb, left, True, flow_id="threads")
        assert first.error is None and second.output == first.output
        third = await run(sb, left, False, flow_id="threads")
        assert third.error is None and third.output != first.output
        await assert_no_strays(sb)


async def test_a_step_that_closes_or_patches_its_stdout_does_not_break_the_next_run() -> None:
    """stdout/stderr are fresh per execution: a step that closes them, or replaces their
    write, leaves the next execution in the same warm child (another run) its own logs."""
    code = (
        "import sys\n"
        "def run(input):\n"
        "    print('hello from', input['run'])\n"
        "    sys.stdout.flush()\n"
        "    if input.get('close'):\n"
        "        sys.stdout.close()\n"
        "    if input.get('patch'):\n"
        "        sys.stdout.write = lambda s: 0\n"
        "    return input['run']\n"
    )
    async with make_sandbox(slots=1) as sb:
        for given in ({"run": "A", "close": True}, {"run": "B", "patch": True}, {"run": "C"}):
            out = await run(sb, code, flow_id="logs", input=given)
            assert out.error is None, out.error
            assert out.output == given["run"] and out.logs == f"hello from {given['run']}\n"
        await assert_no_strays(sb)


async def test_step_processes_run_under_sched_batch(sandbox: Sandbox) -> None:
    """A step process (as the fork-server it comes from) runs under SCHED_BATCH: woken by
    the worker's request it does not preempt the worker; its nice value is left as it was."""
    code = "import os\ndef run(input):\n    return [os.sched_getscheduler(0), os.nice(0)]\n"
    result = await run(sandbox, code)
    assert result.status is SandboxStatus.SUCCEEDED, result.error
    assert result.output == [os.SCHED_BATCH, os.nice(0)]
