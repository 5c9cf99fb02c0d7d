"""The hot path's shortcuts build the same things as the long way: ``slot_maker``'s
positional constructors equal the dataclasses' own ``__init__`` (defaults, factories, a
skipped ``__post_init__`` only when asked), and a watched flow limit keeps
``asyncio.Timeout``'s rules for cancels it did not send and cancels swallowed by a step."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from conveyor.engine import executor as ex
from conveyor.engine.context import (
    RunContext,
    RunEnv,
    RunOutcome,
    Services,
    StepRecord,
    slot_maker,
    step_record,
)
from conveyor.engine.executor import Executor
from conveyor.engine.flow import parse_flow
from conveyor.engine.spec import Where
from conveyor.status import RunStatus
from conveyor.store.runs import Finish, StepRow, Transition
from tests.engine.support import MemorySink, flow_doc, make_ctx


def _same(a: Any, b: Any) -> None:
    assert type(a) is type(b)
    assert [getattr(a, f.name) for f in dataclasses.fields(a)] == [
        getattr(b, f.name) for f in dataclasses.fields(b)
    ]
    assert a == b


def test_step_record_equals_the_keyword_constructor() -> None:
    at = datetime.now(UTC)
    args = ("s", "code", "SUCCEEDED", {"i": 1}, [1], None, "log", at, 3, 2, "p", 4)
    names = [f.name for f in dataclasses.fields(StepRecord)][: len(args)]
    made = step_record(*args)
    _same(made, StepRecord(**dict(zip(names, args, strict=True))))
    assert made.seq is None and made["logs"] == "log"
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.name = "other"  # type: ignore[misc]


def test_defaults_and_factories_are_those_of_the_class() -> None:
    make = slot_maker(RunContext, post_init=False)
    a, b = make("r", "f", 1, {}), make("r", "f", 1, {})
    _same(a, RunContext("r", "f", 1, {}))
    assert a.secrets == {} and a.secrets is not b.secrets  # a fresh dict each, as the factory
    rid = uuid.uuid4()
    _same(
        slot_maker(Transition)(rid, RunStatus.RUNNING, bump_attempt=True),
        Transition(rid, RunStatus.RUNNING, bump_attempt=True),
    )
    _same(slot_maker(RunOutcome)(RunStatus.FAILED), RunOutcome(RunStatus.FAILED))
    _same(slot_maker(Where)("p", 1, 2), Where("p", 1, 2))
    env = slot_maker(RunEnv)(Services(sink=MemorySink()), a)
    assert env.on_respond is None and env.ctx is a
    row = slot_maker(StepRow, post_init=False)(rid, 0, step_record("s", "t", "SUCCEEDED"))
    _same(row, StepRow(rid, 0, step_record("s", "t", "SUCCEEDED")))
    _same(
        slot_maker(Finish)(Transition(rid, RunStatus.SUCCEEDED)),
        Finish(Transition(rid, RunStatus.SUCCEEDED)),
    )


def test_a_post_init_runs_unless_the_caller_says_it_need_not() -> None:
    assert slot_maker(StepRow) is StepRow
    assert slot_maker(RunContext) is RunContext
    # The class itself still converts JSON-shaped checkpoints.
    ctx = RunContext("r", "f", 1, {}, checkpoints=[{"name": "a", "type": "t", "status": "S"}])
    assert type(ctx.checkpoints[0]) is StepRecord

    @dataclasses.dataclass(frozen=True)
    class NoSlots:
        a: int

    assert slot_maker(NoSlots) is NoSlots

    @dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
    class KwOnly:
        a: int

    assert slot_maker(KwOnly) is KwOnly


async def test_a_watched_limit_leaves_other_cancels_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run ended by its watched limit leaves its task's cancel count as it found it; a
    cancel from outside that lands with the limit's is a cancel, not a TIMEOUT; a step that
    swallows the limit's cancel lets the run go on (as under asyncio.Timeout)."""
    monkeypatch.setattr(ex, "WATCHED_LIMIT_S", 0.1)
    monkeypatch.setattr(ex, "WATCH_TICK_S", 0.02)
    executor = Executor(Services(sink=MemorySink(), flow_timeout_s=0.1))
    slow = parse_flow(flow_doc({"name": "slow", "type": "delay", "input": {"seconds": 3}}))

    async def timed_out() -> int:
        out = await executor.run(slow, make_ctx())
        assert out.status is RunStatus.TIMEOUT
        task = asyncio.current_task()
        assert task is not None
        return task.cancelling()

    assert await asyncio.create_task(timed_out()) == 0

    async def both() -> None:
        task = asyncio.current_task()
        assert task is not None
        limit = executor.watchdog().limit(0.0)
        assert limit is not None
        async with limit:
            limit.expire()
            task.cancel()  # somebody else's cancel too
            await asyncio.sleep(1)

    with pytest.raises(asyncio.CancelledError):
        await asyncio.create_task(both())

    async def swallowed() -> str:
        task = asyncio.current_task()
        assert task is not None
        limit = executor.watchdog().limit(0.0)
        assert limit is not None
        async with limit:
            limit.expire()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(1)
        assert limit.expired() and task.cancelling() == 0
        return "went on"

    assert await asyncio.create_task(swallowed()) == "went on"
    assert executor.watchdog().limits == {}
