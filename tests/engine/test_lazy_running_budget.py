"""Lazy RUNNING (engine/worker.py ``LAZY_RUNNING_S``) is a budget per run, not per code step,
and the sink's cancel of a run's task never outlives the run. Real PostgreSQL, Redis, sandbox."""

# ruff: noqa: F811  (the contained fixture is imported, and named by the tests using it)
from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from conveyor.engine import worker as worker_module
from conveyor.engine.worker import RunWorker
from conveyor.sandbox.client import Sandbox
from conveyor.sandbox.outcome import SandboxResult, SandboxStatus
from conveyor.status import RunStatus
from conveyor.store import runs as run_store
from conveyor.store.db import Database
from conveyor.store.runs import Transition
from tests.engine.test_in_memory_runs import (  # noqa: F401  (contained is a fixture)
    _close,
    _CountingWriter,
    _slow,
    _submit,
    _worker,
    contained,
)


def _many_code_steps(n: int, sleep_s: float) -> dict[str, Any]:
    """transform → ``n`` code steps each sleeping ``sleep_s`` (each under LAZY_RUNNING_S)."""
    steps: list[dict[str, Any]] = [
        {"name": "parse", "type": "transform", "input": {"n": "{{trigger.body.n}}"}}
    ]
    code = "import time\ndef run(input):\n    time.sleep({s})\n    return {i}\n"
    steps += [
        {"name": f"c{i}", "type": "code", "input": {}, "code": code.format(s=sleep_s, i=i)}
        for i in range(n)
    ]
    return {"name": "many", "trigger": {"type": "webhook"}, "steps": steps}


async def test_many_short_code_steps_show_their_run_running(
    db: Database,
    contained: RunWorker,
) -> None:
    """Forty code steps of 8 ms each: every one is done before LAZY_RUNNING_S, but together
    they run far longer — the run shows RUNNING while they do (each step re-armed its own
    20 ms before, and the run stayed QUEUED until its final state)."""
    rid = await _submit(db, contained, _many_code_steps(40, 0.008))
    seen: list[str] = []
    drained = asyncio.create_task(contained.consumer.drain())
    while not drained.done():
        seen.append((await run_store.get_run(db, rid))["status"])
        await asyncio.sleep(0.01)
    await drained
    assert "RUNNING" in seen, seen
    run = await run_store.get_run(db, rid)
    assert run["status"] == "SUCCEEDED" and run["attempt"] == 1
    assert isinstance(contained.writer, _CountingWriter)
    assert contained.writer.writes[0][0] == "RUNNING"


async def test_a_run_canceled_while_queued_runs_its_code_for_at_most_the_budget(
    db: Database,
    contained: RunWorker,
) -> None:
    """Canceled while queued, a run of forty short code steps executes at most the steps that
    fit in LAZY_RUNNING_S (about three of 8 ms), not all of them; nothing of it is stored."""
    rid = await _submit(db, contained, _many_code_steps(40, 0.008))
    assert await contained.writer.transition(Transition(rid, RunStatus.CANCELED))
    sandbox = contained.sandbox
    assert isinstance(sandbox, Sandbox)
    before = sandbox.stats.get("SUCCEEDED", 0)
    await asyncio.wait_for(contained.consumer.drain(), 60)
    ran = sandbox.stats.get("SUCCEEDED", 0) - before
    assert ran <= 6, ran
    run = await run_store.get_run(db, rid)
    assert run["status"] == "CANCELED" and run["attempt"] == 0
    assert await run_store.get_steps(db, rid) == []


class _AbsorbingSandbox:
    """A contained sandbox whose step, when cancelled, returns a result instead of raising:
    what asyncio.wait_for (Python 3.11) does when a cancel lands in the loop turn its inner
    future completes in — the real client waits so in its kill and child-exit paths."""

    contained = True

    async def run_code(self, *, on_started: Any = None, **_: Any) -> SandboxResult:
        if on_started is not None:
            on_started()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(5.0)
        return SandboxResult(SandboxStatus.TIMEOUT, None, "step exceeded its time limit", "", 1.0)


async def test_a_sink_cancel_absorbed_below_the_executor_does_not_stop_the_consumer(
    db: Database, redis: Any, postgres_url: str, redis_url: str
) -> None:
    """The run's RUNNING write finds it canceled and cancels the run's task — the consumer's
    long-lived worker task. When something below absorbs that cancel, the handler takes it
    back: the task is not left cancelling (it stopped after the job before, and the next run
    was never taken)."""
    w = _worker(db, redis, (postgres_url, redis_url), _AbsorbingSandbox())  # type: ignore[arg-type]
    after: list[int] = []
    real = w.handle

    async def handle(job: Any) -> None:
        await real(job)
        task = asyncio.current_task()
        assert task is not None
        after.append(task.cancelling())

    w.consumer.handler = handle
    try:
        first = await _submit(db, w, _slow(5))
        assert await w.writer.transition(Transition(first, RunStatus.CANCELED))
        second = await _submit(
            db,
            w,
            {
                "name": "plain",
                "trigger": {"type": "webhook"},
                "steps": [{"name": "t", "type": "transform", "input": {"x": 1}}],
            },
        )
        await asyncio.wait_for(w.consumer.drain(), 20)
        assert after == [0, 0]
        assert (await run_store.get_run(db, first))["status"] == "CANCELED"
        assert (await run_store.get_run(db, second))["status"] == "SUCCEEDED"
    finally:
        await _close(w)


async def test_no_running_write_while_the_worker_stops_a_slow_kill(
    db: Database,
    contained: RunWorker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The worker stops while a first code step runs, RUNNING not yet due, and the child's
    kill takes longer than what is left of LAZY_RUNNING_S: no RUNNING is written behind the
    stopping worker's back — the run stays QUEUED, attempt 0 (the timer fired during the
    kill before, and wrote RUNNING with the attempt counted)."""
    monkeypatch.setattr(worker_module, "LAZY_RUNNING_S", 0.3)
    sandbox = contained.sandbox
    assert isinstance(sandbox, Sandbox)
    real_await_exit = sandbox._await_exit

    async def slow_exit(child: Any) -> Any:
        await asyncio.sleep(0.6)  # a loaded host confirms the kill late
        return await real_await_exit(child)

    monkeypatch.setattr(sandbox, "_await_exit", slow_exit)
    rid = await _submit(db, contained, _slow(5))
    await contained.consumer.start()
    try:
        deadline = asyncio.get_running_loop().time() + 10
        while sandbox._busy == 0:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
    finally:
        await contained.consumer.close(timeout_s=0.05)
    await asyncio.sleep(1.0)
    run = await run_store.get_run(db, rid)
    assert run["status"] == "QUEUED" and run["attempt"] == 0, (run["status"], run["attempt"])
    assert isinstance(contained.writer, _CountingWriter)
    assert contained.writer.writes == [] and contained.writer.statuses == []
