"""The per-run plumbing the worker's hot path relies on: ``bind_run`` puts ``flow_id`` and
``run_id`` on every log line of a run and restores what was bound before (also when the run
raises, and per task), and ``Executor.run(sink=)`` streams one run's records to its own
sink, before-step notices included."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import structlog
from structlog.contextvars import bind_contextvars, get_contextvars, unbind_contextvars

from conveyor.engine.context import Services, StepRecord
from conveyor.engine.executor import Executor
from conveyor.engine.flow import parse_flow
from conveyor.logging import bind_run
from conveyor.status import RunStatus
from tests.engine.support import MemorySink, flow_doc, make_ctx


def _ids() -> dict[str, Any]:
    ctx = get_contextvars()
    return {k: ctx[k] for k in ("flow_id", "run_id") if k in ctx}


def test_bind_run_binds_and_restores() -> None:
    assert _ids() == {}
    with bind_run("f1", "r1"):
        assert _ids() == {"flow_id": "f1", "run_id": "r1"}
        with bind_run("f2", "r2"):
            assert _ids() == {"flow_id": "f2", "run_id": "r2"}
        assert _ids() == {"flow_id": "f1", "run_id": "r1"}
    assert _ids() == {}


def test_bind_run_restores_an_outer_binding_after_an_error() -> None:
    bind_contextvars(run_id="outer")
    try:
        with pytest.raises(ValueError), bind_run("f", "r"):
            assert _ids() == {"flow_id": "f", "run_id": "r"}
            raise ValueError("boom")
        assert _ids() == {"run_id": "outer"}
    finally:
        unbind_contextvars("run_id")
    assert _ids() == {}


def test_log_lines_inside_bind_run_carry_the_run() -> None:
    with structlog.testing.capture_logs(
        processors=[structlog.contextvars.merge_contextvars]
    ) as logs:
        log = structlog.get_logger("test")
        with bind_run("flow-a", "run-a"):
            log.warning("inside")
        log.warning("outside")
    inside, outside = logs
    assert inside["flow_id"] == "flow-a" and inside["run_id"] == "run-a"
    assert "run_id" not in outside and "flow_id" not in outside


async def test_bind_run_is_per_task() -> None:
    seen: dict[str, dict[str, Any]] = {}
    gate = asyncio.Event()

    async def one(n: str) -> None:
        with bind_run(f"f{n}", f"r{n}"):
            await gate.wait()
            seen[n] = _ids()
        seen[n + "-after"] = _ids()

    tasks = [asyncio.create_task(one(n)) for n in "ab"]
    await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(*tasks)
    assert seen == {
        "a": {"flow_id": "fa", "run_id": "ra"},
        "b": {"flow_id": "fb", "run_id": "rb"},
        "a-after": {},
        "b-after": {},
    }
    assert _ids() == {}


class _RunSink(MemorySink):
    def __init__(self) -> None:
        super().__init__()
        self.run_ids: set[str] = set()

    async def step_finished(self, run_id: str, record: StepRecord) -> None:
        self.run_ids.add(run_id)
        await super().step_finished(run_id, record)

    async def before_step(self, run_id: str, step_type: str) -> None:
        self.run_ids.add(run_id)
        self.events.append(f"before:{step_type}")


async def test_a_run_given_its_own_sink_writes_only_there() -> None:
    shared, own = _RunSink(), _RunSink()
    flow = parse_flow(
        flow_doc(
            {"name": "a", "type": "transform", "input": {"x": "{{trigger.body.n}}"}},
            {"name": "b", "type": "respond", "input": {"body": "{{a}}"}},
        )
    )
    ctx = make_ctx({"n": 3})
    out = await Executor(Services(sink=shared)).run(flow, ctx, sink=own)
    assert out.status is RunStatus.SUCCEEDED
    assert shared.records == [] and shared.events == []
    assert own.events == ["before:transform", "step:a", "before:respond", "step:b"]
    assert own.run_ids == {ctx.run_id}
    assert own.one("b")["output"]["body"] == {"x": 3}


def test_tune_gc_raises_only_a_lower_gen0_threshold_and_freezes_once() -> None:
    import gc  # noqa: PLC0415

    from conveyor.engine.worker import GC_GEN0_THRESHOLD, tune_gc  # noqa: PLC0415

    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        tune_gc()
        assert gc.get_threshold() == (GC_GEN0_THRESHOLD, 10, 10)
        frozen = gc.get_freeze_count()
        assert frozen > 0
        tune_gc()  # again: nothing more is frozen
        assert gc.get_freeze_count() == frozen
        gc.set_threshold(GC_GEN0_THRESHOLD * 2, 5, 5)
        tune_gc()
        assert gc.get_threshold() == (GC_GEN0_THRESHOLD * 2, 5, 5)
        gc.set_threshold(0)  # collection switched off by threshold: left so
        tune_gc()
        assert gc.get_threshold()[0] == 0
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()


async def test_a_watched_flow_limit_ends_the_run_like_its_own_timer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Long flow limits are expired by the executor's watchdog: the run ends TIMEOUT with
    its in-flight step recorded TIMEOUT, within a tick of the limit; runs that finish in
    time leave nothing registered; a cancel from outside is still a cancel."""
    import time  # noqa: PLC0415

    from conveyor.engine import executor as ex  # noqa: PLC0415
    from conveyor.status import StepStatus  # noqa: PLC0415

    monkeypatch.setattr(ex, "WATCHED_LIMIT_S", 0.1)
    monkeypatch.setattr(ex, "WATCH_TICK_S", 0.05)
    sink = MemorySink()
    executor = Executor(Services(sink=sink, flow_timeout_s=0.3))
    slow = parse_flow(
        flow_doc(
            {"name": "a", "type": "transform", "input": {"x": 1}},
            {"name": "slow", "type": "delay", "input": {"seconds": 3}},
        )
    )
    started = time.monotonic()
    out = await executor.run(slow, make_ctx())
    took = time.monotonic() - started
    assert out.status is RunStatus.TIMEOUT
    assert out.error is not None and out.error["step"] == "slow"
    assert sink.one("slow")["status"] == StepStatus.TIMEOUT
    assert 0.3 <= took < 2.5
    assert executor.watchdog().limits == {}

    quick = parse_flow(flow_doc({"name": "q", "type": "transform", "input": {"x": 1}}))
    outs = await asyncio.gather(*(executor.run(quick, make_ctx(run_id=f"r{i}")) for i in range(5)))
    assert {o.status for o in outs} == {RunStatus.SUCCEEDED}
    assert executor.watchdog().limits == {}

    task = asyncio.ensure_future(executor.run(slow, make_ctx(run_id="c")))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert executor.watchdog().limits == {}
