"""The jobs of one read start in the same event-loop turn, so handlers that suspend at a
shared batched write (the engine's final write) reach it together — and a backlog keeps
being read, run and acknowledged in waves of ``concurrency`` jobs."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from conveyor.queue import Consumer, Job, Producer, QueueConfig


class _Turns:
    """Counts event-loop turns (one increment per turn, rescheduled with call_soon)."""

    def __init__(self) -> None:
        self.n = 0
        self._stopped = False
        asyncio.get_running_loop().call_soon(self._tick)

    def _tick(self) -> None:
        if not self._stopped:
            self.n += 1
            asyncio.get_running_loop().call_soon(self._tick)

    def stop(self) -> None:
        self._stopped = True


class _BatchedWrite:
    """Like the store's group commit: everything submitted in one turn is written by one
    flush, on the next turn."""

    def __init__(self) -> None:
        self.pending: list[asyncio.Future[None]] = []
        self.batches: list[int] = []

    async def submit(self) -> None:
        fut = asyncio.get_running_loop().create_future()
        self.pending.append(fut)
        if len(self.pending) == 1:
            asyncio.get_running_loop().call_soon(self._flush)
        await fut

    def _flush(self) -> None:
        batch, self.pending = self.pending, []
        self.batches.append(len(batch))
        for fut in batch:
            fut.set_result(None)


async def test_the_jobs_of_one_read_start_together_and_share_writes(
    redis: aioredis.Redis, cfg: QueueConfig
) -> None:
    producer = Producer(redis, cfg)
    n = cfg.concurrency * 4
    await asyncio.gather(*(producer.enqueue("runs", {"n": i}, job_id=f"w{i}") for i in range(n)))
    turns = _Turns()
    write = _BatchedWrite()
    started: list[tuple[str, int]] = []

    async def handler(job: Job) -> None:
        started.append((job.id, turns.n))
        await write.submit()

    try:
        assert await Consumer(redis, handler, cfg).drain() == n
    finally:
        turns.stop()
    assert sorted(j for j, _ in started) == sorted(f"w{i}" for i in range(n))
    # Every read fills all slots (the backlog is larger): each wave starts in one turn and
    # its jobs share one write.
    by_turn: dict[int, int] = {}
    for _, turn in started:
        by_turn[turn] = by_turn.get(turn, 0) + 1
    assert sorted(by_turn.values()) == [cfg.concurrency] * 4
    assert write.batches == [cfg.concurrency] * 4
