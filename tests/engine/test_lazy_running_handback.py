"""A worker handing a delivery back (stopping) while the lazy RUNNING write is already in flight
waits for that write before it lets go: it cannot land — RUNNING, the attempt counted, the held
records — after another worker took the run over (engine/worker.py ``_Sink.landed``)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from conveyor.engine import worker as worker_module
from conveyor.engine.spec import StepType


class _GatedWriter:
    """A writer whose ``finish`` waits for ``gate``; ``writes`` holds what it wrote."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.started = asyncio.Event()
        self.writes: list[Any] = []

    async def finish(self, done: Any) -> bool:
        self.started.set()
        await self.gate.wait()
        self.writes.append(done)
        return True


class _Executor:
    """Runs one contained code step that has started in the sandbox and keeps running."""

    def __init__(self, sink: Any, run_id: str) -> None:
        self.sink, self.run_id = sink, run_id

    async def _run(self) -> Any:
        await self.sink.before_step(self.run_id, StepType.CODE)
        self.sink.code_started()
        await asyncio.sleep(30)  # user code running

    def run(self, *_: Any, **__: Any) -> Any:
        return self._run()


async def test_a_handed_back_delivery_waits_for_its_running_write_in_flight(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(worker_module, "LAZY_RUNNING_S", 0.01)
    writer = _GatedWriter()
    rid = uuid.uuid4()
    sink = worker_module._Sink(
        writer,  # type: ignore[arg-type]
        0,
        None,
        start_pending=True,
        rid=rid,
        deferred=worker_module.CONTAINED_DEFERRED_TYPES,
        run_id=str(rid),
    )
    host = type("Host", (), {"executor": _Executor(sink, str(rid))})()
    ctx = type("Ctx", (), {"run_id": str(rid)})()
    handler = asyncio.create_task(worker_module.RunWorker._execute(host, None, ctx, sink))  # type: ignore[arg-type]
    await asyncio.wait_for(writer.started.wait(), 2)  # the RUNNING write is in flight
    handler.cancel()  # the worker stops: the delivery is to be handed back
    await asyncio.sleep(0.1)
    assert not handler.done(), "handed back while its RUNNING write was still in flight"
    writer.gate.set()
    with pytest.raises(asyncio.CancelledError):
        await handler
    assert len(writer.writes) == 1  # landed before the handler let go
