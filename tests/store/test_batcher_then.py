"""Batcher(then=...): work chained to a flush runs after the flush's slot is free, before the
callers wake, and only for the items the flush stored."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from conveyor.store.batch import Batcher


async def test_then_runs_outside_the_slot_and_before_the_callers_wake() -> None:
    """With one slot, a second batch is flushed while the first one's chained work still
    waits; each caller sees the chained result."""
    gate = asyncio.Event()
    flushed: list[list[int]] = []

    async def flush(items: Sequence[int]) -> list[int]:
        flushed.append(list(items))
        return [i * 10 for i in items]

    async def then(items: Sequence[int], results: Sequence[int]) -> list[int]:
        if items[0] == 1:
            await gate.wait()
        return [r + 1 for r in results]

    b: Batcher[int, int] = Batcher(flush, max_in_flight=1, then=then)
    first = asyncio.ensure_future(b.submit(1))
    await asyncio.sleep(0.01)
    assert not first.done()
    assert await asyncio.wait_for(b.submit(2), 1) == 21  # not blocked behind the first
    gate.set()
    assert await first == 11
    assert flushed == [[1], [2]]
    await b.close()


async def test_a_failing_then_fails_its_items() -> None:
    async def flush(items: Sequence[int]) -> list[int]:
        return list(items)

    async def then(items: Sequence[int], results: Sequence[int]) -> list[int]:
        raise LookupError("chained work failed")

    b: Batcher[int, int] = Batcher(flush, then=then)
    out = await asyncio.gather(b.submit(1), b.submit(2), return_exceptions=True)
    assert all(isinstance(x, LookupError) for x in out)
    await b.close()


async def test_after_a_bad_item_then_gets_only_the_stored_ones() -> None:
    """A batch failing on one item is redone item by item; the culprit gets its error and
    the chained work sees only the others."""
    seen: list[list[int]] = []

    async def flush(items: Sequence[int]) -> list[int]:
        if 13 in items:
            raise ValueError("bad item")
        return list(items)

    async def then(items: Sequence[int], results: Sequence[int]) -> list[int]:
        seen.append(list(items))
        return [-r for r in results]

    b: Batcher[int, int] = Batcher(flush, then=then)
    out = await asyncio.gather(*(b.submit(i) for i in (1, 13, 2)), return_exceptions=True)
    assert out[0] == -1 and out[2] == -2
    assert isinstance(out[1], ValueError)
    assert seen == [[1, 2]]
    await b.close()


async def test_cancelled_while_chained_fails_the_callers() -> None:
    started = asyncio.Event()

    async def flush(items: Sequence[int]) -> list[int]:
        return list(items)

    async def then(items: Sequence[int], results: Sequence[int]) -> list[int]:
        started.set()
        await asyncio.sleep(10)
        return list(results)

    b: Batcher[int, int] = Batcher(flush, then=then)
    waiter = asyncio.ensure_future(b.submit(1))
    await started.wait()
    for task in list(b._tasks):
        task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await b.close()
