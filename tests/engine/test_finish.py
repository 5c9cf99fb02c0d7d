"""A run's held checkpoints and its final state, written together (RunWriter.finish) and by
the worker's sink: batched across runs, one failing member, a crash mid-batch, and the
barrier that makes held checkpoints durable before a step with effects starts. Real
PostgreSQL and Redis; the crash is a real subprocess killed with SIGKILL."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from conveyor.engine.worker import DEFERRED_TYPES, _Sink
from conveyor.ids import uuid7
from conveyor.records import StepRecord
from conveyor.status import RunStatus
from conveyor.store import flows as flow_store
from conveyor.store import runs as run_store
from conveyor.store.db import Database
from conveyor.store.runs import Finish, NewRun, RunWriter, StepRow, Transition
from tests.polling import eventually

ROOT = str(Path(__file__).resolve().parents[2])
DOC = {"name": "f", "trigger": {"type": "webhook"}, "steps": []}


async def _running_runs(db: Database, writer: RunWriter, n: int) -> list[uuid.UUID]:
    flow = await flow_store.create_flow(db, f"f-{uuid.uuid4().hex[:8]}", DOC)
    ids = [uuid7() for _ in range(n)]
    await asyncio.gather(
        *(writer.insert(NewRun(i, flow.id, flow.version, {"body": {"i": n}})) for i in ids)
    )
    started = await asyncio.gather(
        *(writer.transition(Transition(i, RunStatus.RUNNING, bump_attempt=True)) for i in ids)
    )
    assert all(started)
    return ids


def _step(run_id: uuid.UUID, seq: int, name: str, output: Any = None) -> StepRow:
    record = StepRecord(
        name=name,
        type="transform",
        status="SUCCEEDED",
        output=output if output is not None else {"seq": seq},
        started_at=datetime.now(UTC),
    )
    return StepRow(run_id, seq, record)


async def _state(db: Database, run_id: uuid.UUID) -> tuple[str, list[str]]:
    run = await run_store.get_run(db, run_id)
    steps = await run_store.get_steps(db, run_id)
    return run["status"], [s.name for s in steps]


class _Counting(RunWriter):
    """A RunWriter counting its finish statements (the real flush runs)."""

    def __init__(self, db: Database) -> None:
        super().__init__(db)
        self.finish_batches: list[int] = []

    async def _flush_finishes(self, batch: Sequence[Finish]) -> list[bool]:
        self.finish_batches.append(len(batch))
        return await super()._flush_finishes(batch)


async def test_finishes_are_batched_across_runs_and_store_steps_with_the_state(
    db: Database,
) -> None:
    """Forty concurrent finishes: far fewer statements than runs, every run SUCCEEDED with
    exactly its own held steps in order."""
    writer = _Counting(db)
    try:
        ids = await _running_runs(db, writer, 40)
        done = await asyncio.gather(
            *(
                writer.finish(
                    Finish(
                        Transition(i, RunStatus.SUCCEEDED, output={"ok": str(i)}),
                        [_step(i, 0, "parse"), _step(i, 1, "reply")],
                    )
                )
                for i in ids
            )
        )
    finally:
        await writer.close()
    assert done == [True] * 40
    assert sum(writer.finish_batches) == 40 and len(writer.finish_batches) < 40
    for i in ids:
        assert await _state(db, i) == ("SUCCEEDED", ["parse", "reply"])
        assert (await run_store.get_run(db, i))["output"] == {"ok": str(i)}


async def test_a_failing_member_fails_alone(db: Database) -> None:
    """One finish whose step cannot be encoded (a lone surrogate): it alone raises and stays
    RUNNING with nothing stored; its neighbours in the same batch are committed."""
    writer = _Counting(db)
    try:
        ids = await _running_runs(db, writer, 6)
        bad = ids[3]

        def finish(i: uuid.UUID) -> Finish:
            output = {"text": "\ud800"} if i == bad else None
            return Finish(Transition(i, RunStatus.SUCCEEDED), [_step(i, 0, "parse", output=output)])

        results = await asyncio.gather(
            *(writer.finish(finish(i)) for i in ids), return_exceptions=True
        )
    finally:
        await writer.close()
    assert writer.finish_batches[0] > 1  # they did share a batch
    for i, result in zip(ids, results, strict=True):
        if i == bad:
            assert isinstance(result, Exception)
            assert await _state(db, i) == ("RUNNING", [])
        else:
            assert result is True
            assert await _state(db, i) == ("SUCCEEDED", ["parse"])


async def test_a_run_ended_elsewhere_keeps_its_end_and_gets_no_steps(db: Database) -> None:
    """A run canceled before its finish: False for it (neither its steps nor its state are
    written), True for the others of the batch."""
    writer = RunWriter(db)
    try:
        ids = await _running_runs(db, writer, 4)
        canceled = ids[1]
        assert await writer.transition(Transition(canceled, RunStatus.CANCELED))
        results = await asyncio.gather(
            *(
                writer.finish(Finish(Transition(i, RunStatus.SUCCEEDED), [_step(i, 0, "a")]))
                for i in ids
            )
        )
    finally:
        await writer.close()
    assert results == [i != canceled for i in ids]
    assert await _state(db, canceled) == ("CANCELED", [])
    for i in ids:
        if i != canceled:
            assert await _state(db, i) == ("SUCCEEDED", ["a"])


async def test_sink_holds_pure_steps_until_a_step_with_effects_starts(db: Database) -> None:
    """Transform/branch/respond records are held; before a code step starts they are written;
    a code step's own record is written at once."""
    writer = RunWriter(db)
    try:
        (rid,) = await _running_runs(db, writer, 1)
        sink = _Sink(writer, 0)
        run_id = str(rid)
        assert "transform" in DEFERRED_TYPES and "code" not in DEFERRED_TYPES
        await sink.step_finished(run_id, _step(rid, 0, "parse").record)
        await sink.before_step(run_id, "respond")  # pure next: still held
        assert await _state(db, rid) == ("RUNNING", [])
        await sink.before_step(run_id, "code")
        assert await _state(db, rid) == ("RUNNING", ["parse"])
        code = StepRecord(name="score", type="code", status="SUCCEEDED", output=1)
        await sink.step_finished(run_id, code)
        assert await _state(db, rid) == ("RUNNING", ["parse", "score"])
        reply = StepRecord(name="reply", type="respond", status="SUCCEEDED", output=2)
        await sink.step_finished(run_id, reply)
        held = sink.take()
        assert [r.seq for r in held] == [2]
        assert await writer.finish(Finish(Transition(rid, RunStatus.SUCCEEDED), held))
    finally:
        await writer.close()
    assert await _state(db, rid) == ("SUCCEEDED", ["parse", "score", "reply"])


_CRASHER = """
import asyncio, sys, uuid
from conveyor.status import RunStatus
from conveyor.store.db import Database, PoolOptions
from conveyor.store.runs import Finish, RunWriter, Transition
from tests.engine.test_finish import _step

async def main():
    db = await Database.connect(sys.argv[1], PoolOptions(max_size=4))
    writer = RunWriter(db)
    ids = [uuid.UUID(x) for x in sys.argv[2].split(",")]
    print("ready", flush=True)
    i = 0
    while True:  # finish runs in batches of 25 until killed
        chunk = ids[i : i + 25]
        if not chunk:
            await asyncio.sleep(3600)
        i += 25
        await asyncio.gather(*(
            writer.finish(Finish(Transition(r, RunStatus.SUCCEEDED),
                                 [_step(r, 0, "parse"), _step(r, 1, "reply")]))
            for r in chunk
        ))

asyncio.run(main())
"""


@pytest.mark.timeout(60)
async def test_a_crash_mid_batch_loses_nothing(db: Database, postgres_url: str) -> None:
    """A process finishing runs in batches is SIGKILLed while statements are in flight:
    every run is either SUCCEEDED with both steps or still RUNNING with none (its job would
    be redelivered) — never terminal without its steps, never steps without the state."""
    writer = RunWriter(db)
    try:
        ids = await _running_runs(db, writer, 400)
    finally:
        await writer.close()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _CRASHER,
        postgres_url,
        ",".join(map(str, ids)),
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": ROOT},
        cwd=ROOT,
    )
    assert proc.stdout is not None
    assert (await asyncio.wait_for(proc.stdout.readline(), 30)).strip() == b"ready"

    async def some_finished() -> bool:
        async with db.writer() as conn:
            n = await conn.fetchval(
                "SELECT count(*) FROM runs WHERE id = ANY($1::uuid[]) AND status = 'SUCCEEDED'",
                ids,
            )
        return 0 < n < len(ids)

    await eventually(some_finished, timeout_s=30, interval_s=0.002, what="a first batch committed")
    os.kill(proc.pid, signal.SIGKILL)
    await proc.wait()
    states = [await _state(db, i) for i in ids]
    done, waiting = ("SUCCEEDED", ["parse", "reply"]), ("RUNNING", [])
    odd = [st for st in states if st not in (done, waiting)]
    assert not odd, odd
    assert ("RUNNING", []) in states and ("SUCCEEDED", ["parse", "reply"]) in states
