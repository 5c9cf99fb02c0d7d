"""RunWriter.insert(then=...): work chained to the insert batch's commit, once per batch."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from typing import Any

from conveyor.ids import uuid7
from conveyor.store import flows
from conveyor.store.batch import Batcher
from conveyor.store.db import Database
from conveyor.store.runs import NewRun, RunWriter

DOC = {"name": "f", "trigger": {"type": "webhook"}, "steps": []}


async def _flow(db: Database) -> uuid.UUID:
    return (await flows.create_flow(db, f"f-{uuid.uuid4().hex[:8]}", DOC)).id


async def _count(db: Database, ids: Sequence[uuid.UUID]) -> int:
    async with db.writer() as conn:
        n: int = await conn.fetchval("SELECT count(*) FROM runs WHERE id = ANY($1)", list(ids))
    return n


async def test_then_runs_once_per_batch_after_the_commit_for_created_runs(db: Database) -> None:
    """Concurrent inserts share one call of ``then`` that sees their rows committed; a
    repeat of an idempotency key is not passed to it and gets no result."""
    fid = await _flow(db)
    writer = RunWriter(db)
    calls: list[list[tuple[NewRun, Any]]] = []
    seen_rows: list[int] = []

    async def then(created: Sequence[tuple[NewRun, Any]]) -> list[Any]:
        calls.append(list(created))
        seen_rows.append(await _count(db, [r.id for r, _ in created]))
        return [f"done-{arg}" for _, arg in created]

    try:
        first = await writer.insert(NewRun(uuid7(), fid, 1, {}, idempotency_key="k"), then=then)
        assert first.created and first.then is not None
        calls.clear()
        seen_rows.clear()
        runs = [NewRun(uuid7(), fid, 1, {"i": i}) for i in range(10)]
        repeat = NewRun(uuid7(), fid, 1, {}, idempotency_key="k")
        out = await asyncio.gather(
            *(writer.insert(r, then=then, arg=i) for i, r in enumerate(runs)),
            writer.insert(repeat, then=then, arg="repeat"),
        )
    finally:
        await writer.close()
    assert len(calls) == 1 and len(calls[0]) == 10
    assert seen_rows == [10]  # committed before ``then`` ran
    assert [o.then for o in out[:10]] == [f"done-{i}" for i in range(10)]
    assert not out[10].created and out[10].then is None and out[10].run_id == first.run_id


async def test_a_failing_then_is_each_runs_result_and_the_rows_stay(db: Database) -> None:
    """``then`` raising (or answering the wrong number of results) does not fail the insert:
    the rows are committed and the error is the chained result of each run."""
    fid = await _flow(db)
    writer = RunWriter(db)

    async def boom(created: Sequence[tuple[NewRun, Any]]) -> list[Any]:
        raise ConnectionError("queue away")

    async def short(created: Sequence[tuple[NewRun, Any]]) -> list[Any]:
        return []

    try:
        runs = [NewRun(uuid7(), fid, 1, {}) for _ in range(3)]
        out = await asyncio.gather(*(writer.insert(r, then=boom) for r in runs))
        odd = await writer.insert(NewRun(uuid7(), fid, 1, {}), then=short)
        plain = await writer.insert(NewRun(uuid7(), fid, 1, {}))
    finally:
        await writer.close()
    assert all(o.created and isinstance(o.then, ConnectionError) for o in out)
    assert await _count(db, [r.id for r in runs]) == 3
    assert odd.created and isinstance(odd.then, RuntimeError)
    assert plain.created and plain.then is None


async def test_different_thens_in_one_batch_each_get_their_own_runs(db: Database) -> None:
    """Two chains in one batch: each is called once, with only the runs that passed it."""
    fid = await _flow(db)
    writer = RunWriter(db)
    got: dict[str, list[Any]] = {"a": [], "b": []}

    def chain(name: str) -> Any:
        async def then(created: Sequence[tuple[NewRun, Any]]) -> list[Any]:
            got[name].append(sorted(arg for _, arg in created))
            return [name] * len(created)

        return then

    a, b = chain("a"), chain("b")
    try:
        out = await asyncio.gather(
            *(writer.insert(NewRun(uuid7(), fid, 1, {}), then=a, arg=i) for i in range(3)),
            *(writer.insert(NewRun(uuid7(), fid, 1, {}), then=b, arg=i) for i in range(2)),
        )
    finally:
        await writer.close()
    assert got == {"a": [[0, 1, 2]], "b": [[0, 1]]}
    assert [o.then for o in out] == ["a", "a", "a", "b", "b"]


async def test_a_cancel_during_the_item_by_item_retry_answers_every_caller() -> None:
    """A failed batch is retried item by item; cancelled midway (the loop shutting down),
    every caller gets an answer — also the ones whose items were already stored."""

    async def flush(items: list[int]) -> list[int]:
        if len(items) > 1:
            raise ValueError("bad batch")
        await asyncio.sleep(0.05)
        return [items[0] * 10]

    batcher: Batcher[int, int] = Batcher(flush)
    calls = [asyncio.create_task(batcher.submit(i)) for i in range(3)]
    await asyncio.sleep(0.08)  # item 0 stored alone, item 1 in flight
    for task in list(batcher._tasks):
        task.cancel()
    done, pending = await asyncio.wait(calls, timeout=5)
    assert not pending, "a caller was left waiting"
    assert all(call.cancelled() or call.exception() is not None for call in done)
