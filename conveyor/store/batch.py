"""Group commit: many concurrent callers, one database round trip.

A :class:`Batcher` collects the items submitted while a flush is being prepared or is in
flight and writes them with one call of ``flush(items)`` — one multi-row statement instead of
one per webhook. A caller awaits its own item's result, so "my row is committed" still holds
for each caller before it answers 2xx. Under no load the first item is flushed on the next
loop iteration, so the added latency is one tick; under load batches grow by themselves.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    """Coalesce :meth:`submit` calls into ``flush(items) -> results`` calls.

    Parameters: ``flush`` returns one result per item, in order; ``max_batch`` items per
    flush (default 500); ``max_in_flight`` flushes at once (default 2: one filling while one
    commits); ``fatal`` exception types that fail the whole batch at once (the server is
    unreachable) — any other error makes the batch retry item by item, so it reaches only
    the item that caused it. ``then(items, results) -> results``: work chained to a flush
    (an enqueue after a commit), run once the flush's slot is free again — the next batch's
    flush need not wait for it — and before the callers wake; it must not raise (if it
    does, the items it was given fail with its error).
    """

    def __init__(
        self,
        flush: Callable[[Sequence[T]], Awaitable[Sequence[R]]],
        *,
        max_batch: int = 500,
        max_in_flight: int = 2,
        fatal: tuple[type[BaseException], ...] = (),
        then: Callable[[Sequence[T], Sequence[R]], Awaitable[Sequence[R]]] | None = None,
    ) -> None:
        self._flush = flush
        self._then = then
        self._fatal = fatal
        self._max_batch = max_batch
        self._slots = asyncio.Semaphore(max_in_flight)
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, item: T) -> R:
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, fut))
        if not self._scheduled:
            self._scheduled = True
            task = asyncio.create_task(self._drain())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await fut

    async def _drain(self) -> None:
        async with self._slots:
            # Everything submitted until we got a slot joins this batch.
            self._scheduled = False
            batch, self._pending = (
                self._pending[: self._max_batch],
                self._pending[self._max_batch :],
            )
            if self._pending and not self._scheduled:
                self._scheduled = True
                task = asyncio.create_task(self._drain())
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            if not batch:
                return
            try:
                results = await self._flush([item for item, _ in batch])
            except asyncio.CancelledError as exc:
                self._fail(batch, exc)
                raise
            except self._fatal as exc:
                self._fail(batch, exc)  # the server is away: every item fails alike
                return
            except Exception as exc:
                if len(batch) == 1:
                    self._fail(batch, exc)
                    return
                # One bad item (a constraint, bad data) must not fail its neighbours:
                # redo the batch item by item so only the culprit sees the error.
                batch, results = await self._one_by_one(batch)
        if self._then is not None and batch:
            try:
                results = await self._then([item for item, _ in batch], results)
            except asyncio.CancelledError as exc:
                self._fail(batch, exc)
                raise
            except Exception as exc:
                self._fail(batch, exc)
                return
        for (_, fut), result in zip(batch, results, strict=True):
            if not fut.done():
                fut.set_result(result)

    async def _one_by_one(
        self, batch: list[tuple[T, asyncio.Future[R]]]
    ) -> tuple[list[tuple[T, asyncio.Future[R]]], list[R]]:
        """Flush each item alone; the failed ones get their error, the rest are returned
        with their results (not yet set)."""
        kept: list[tuple[T, asyncio.Future[R]]] = []
        results: list[R] = []
        for i, (item, fut) in enumerate(batch):
            try:
                (result,) = await self._flush([item])
            except Exception as exc:
                if not fut.done():
                    fut.set_exception(exc)
            except BaseException as exc:
                # Cancelled midway (the loop shutting down): no caller may wait forever, the
                # ones whose rows were already stored included.
                self._fail([*kept, *batch[i:]], exc)
                raise
            else:
                kept.append((item, fut))
                results.append(result)
        return kept, results

    @staticmethod
    def _fail(batch: list[tuple[T, asyncio.Future[R]]], exc: BaseException) -> None:
        for _, fut in batch:
            if not fut.done():
                fut.set_exception(exc)

    async def close(self) -> None:
        """Wait for the flushes in flight."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
