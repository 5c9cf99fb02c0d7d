"""The jobs of one read start in the same event-loop turn, so handlers that suspend at a
shared batched write (the engine's final write) reach it together — and a backlog keeps
being read, run and acknowledged in waves of ``concurrency`` jobs."""

from __future__ import annotations

import asyncio
import dataclasses

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


class _CountWakes:
    """Counts the idle workers a consumer wakes."""

    def __init__(self, consumer: Consumer) -> None:
        self.woken = 0
        wake = consumer._wake

        def counted(n: int) -> int:
            woken = wake(n)
            self.woken += woken
            return woken

        consumer._wake = counted  # type: ignore[method-assign]


async def test_handlers_that_do_not_suspend_wake_one_worker_per_read(
    redis: aioredis.Redis, cfg: QueueConfig
) -> None:
    # The first worker runs a read's jobs in its loop when they never suspend: waking the
    # others for every entry cost each read concurrency - 1 task switches that found nothing.
    cfg = dataclasses.replace(cfg, concurrency=16)
    producer = Producer(redis, cfg)
    n = cfg.concurrency * 8
    await asyncio.gather(*(producer.enqueue("runs", {"n": i}, job_id=f"q{i}") for i in range(n)))

    async def handler(job: Job) -> None:
        return None

    consumer = Consumer(redis, handler, cfg)
    wakes = _CountWakes(consumer)
    assert await consumer.drain() == n
    # One wave wakes every worker (handlers might suspend), then one worker per read.
    assert wakes.woken <= cfg.concurrency * 2 + 8


async def test_handlers_that_suspend_again_start_together_again(
    redis: aioredis.Redis, cfg: QueueConfig
) -> None:
    # After reads of handlers that finished at once, handlers that suspend go back to whole
    # waves started in one turn and sharing one write.
    producer = Producer(redis, cfg)
    c = cfg.concurrency
    quick, slow = 3 * c, 4 * c
    await asyncio.gather(
        *(producer.enqueue("runs", {"n": i}, job_id=f"m{i}") for i in range(quick + slow))
    )
    write = _BatchedWrite()

    async def handler(job: Job) -> None:
        if job.payload["n"] >= quick:
            await write.submit()

    consumer = Consumer(redis, handler, cfg)
    assert await consumer.drain() == quick + slow
    assert sum(write.batches) == slow
    # Only the first read of suspending jobs starts one of them a turn ahead (a write of its
    # own); then every worker is woken at once again (one worker first and the rest a turn
    # later would write one job alone per read).
    assert write.batches.count(1) <= 1
    assert consumer._eager


async def test_woken_workers_beaten_to_the_entries_keep_wakes_eager(cfg: QueueConfig) -> None:
    # Under load the engine's busy workers, finishing in the turn a read came back, can take
    # the read's entries before the woken ones run: all of those find nothing, yet handlers
    # do suspend. That must not switch to one worker first (each such switch wrote one run
    # alone and split the wave). Only a worker that ran several jobs in a row while the
    # others found nothing means handlers finish without suspending.
    consumer = Consumer(aioredis.Redis(), _noop, cfg)
    loop = asyncio.get_running_loop()
    stream = consumer._streams[0]
    job = Job("x", "runs", {}, 1, "1-1", 0, 1)
    for most, eager in ((0, True), (1, True), (5, False)):
        consumer._eager = True
        consumer._woken, consumer._woke_idle, consumer._most = 4, 4 if most == 0 else 3, most
        idle = [loop.create_future() for _ in range(4)]
        consumer._idle.extend(idle)
        consumer._buffer.extend([(stream, job)] * 4)
        consumer._wake_workers()
        assert consumer._eager is eager
        assert sum(f.done() for f in idle) == (4 if eager else 1)
        consumer._buffer.clear()
        consumer._idle.clear()


async def _noop(job: Job) -> None:
    return None
