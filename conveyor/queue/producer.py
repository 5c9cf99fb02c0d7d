"""Durable enqueue with coalescing: many concurrent ``enqueue()`` calls, one Redis round trip.

An ingest process receives webhooks concurrently; each handler awaits :meth:`Producer.enqueue`.
Calls made in the same event-loop iteration, or while the previous batch is on the wire, are
gathered per shard into one ``ENQUEUE`` script call, so under load a job costs a fraction of a
round trip. The script checks the backlog cap, dedup keys and job-id uniqueness atomically with
the ``XADD``, so when ``enqueue`` returns the job is in Redis (and in its AOF).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import structlog
from redis.asyncio import Redis

from conveyor.queue import keys as k
from conveyor.queue.config import QueueConfig
from conveyor.queue.errors import REDIS_FAILURES, QueueFull, QueueUnavailable, is_unavailable
from conveyor.queue.job import encode_payload, now_ms
from conveyor.queue.scripts import ENQUEUE

log = structlog.get_logger(__name__)

_ADDED, _DUPLICATE, _FULL = 0, 1, 2


#: One job to send: ``(job_id, encoded payload, delay_ms, dedup_key)``.
_Job = tuple[str, bytes, int, str | None]


class _Pending:
    """Jobs waiting for the next script call of their shard, with one future for all of
    their results (one job for :meth:`Producer.enqueue`, a caller's batch for
    :meth:`Producer.enqueue_batch`)."""

    __slots__ = ("future", "jobs", "one")

    def __init__(self, jobs: list[_Job], future: asyncio.Future[Any], one: bool) -> None:
        self.jobs = jobs
        #: The future of the one job's result itself (an :meth:`Producer.enqueue`), not of a
        #: list of results: no list sliced out and unpacked per job.
        self.one = one
        self.future = future


class Producer:
    """Puts jobs on the ``runs`` and ``sync`` queues.

    :param redis: a ``redis.asyncio.Redis`` client (``decode_responses=False``); not closed here.
    :param config: queue configuration (shards, backlog cap, dedup window).
    """

    def __init__(self, redis: Redis, config: QueueConfig | None = None) -> None:
        self.redis = redis
        self.config = config or QueueConfig()
        self._shards: dict[str, list[k.ShardKeys]] = {}
        self._pending: dict[tuple[str, int], list[_Pending]] = {}
        self._flushing: set[tuple[str, int]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        #: Script calls sent so far (how well enqueues coalesce: jobs / round_trips).
        self.round_trips = 0

    def _keys(self, queue: str) -> list[k.ShardKeys]:
        shards = self._shards.get(queue)
        if shards is None:
            if queue not in k.QueueName.__members__.values():
                raise ValueError(f"unknown queue {queue!r}: expected one of {list(k.QueueName)}")
            shards = self._shards[queue] = self.config.shard_keys(queue)
        return shards

    async def enqueue(
        self,
        queue: str,
        payload: Any,
        *,
        job_id: str,
        delay_s: float = 0,
        dedup_key: str | None = None,
    ) -> str:
        """Durably add one job; returns its id (the first job's id for a repeated dedup key).

        ``payload`` is JSON-encoded with orjson (``bytes`` are taken as encoded JSON already).
        A job id that is still waiting, running or delayed is not added twice. Raises
        :class:`QueueFull` over the backlog cap and :class:`QueueUnavailable` when Redis is down.
        """
        if not job_id or "\n" in job_id:
            # Acknowledgements travel newline-joined: an id must be one non-empty line.
            raise ValueError(f"job_id must be a non-empty single line, got {job_id!r}")
        shard = k.shard_for(dedup_key or job_id, self.config.shards)
        self._keys(queue)
        job = (job_id, encode_payload(payload), int(delay_s * 1000), dedup_key)
        result: str | BaseException = await self._add((queue, shard), [job], True)
        if isinstance(result, BaseException):
            raise result
        return result

    def _add(
        self, slot: tuple[str, int], jobs: list[_Job], one: bool = False
    ) -> asyncio.Future[Any]:
        """Queue ``jobs`` for the next script call of ``slot``; the future of their results
        (with ``one``, of the one job's result)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        item = _Pending(jobs, future, one)
        batch = self._pending.get(slot)
        if batch is None:
            self._pending[slot] = [item]
            if slot not in self._flushing:
                # Defer to the next loop iteration so every enqueue made in this one joins.
                loop.call_soon(self._start_flush, slot)
        else:
            batch.append(item)
        return future

    async def enqueue_many(
        self, queue: str, jobs: Sequence[tuple[str, Any]], *, delay_s: float = 0
    ) -> list[str | BaseException]:
        """Enqueue ``(job_id, payload)`` pairs in bulk; per job the id or the exception."""
        results = await asyncio.gather(
            *(self.enqueue(queue, p, job_id=j, delay_s=delay_s) for j, p in jobs),
            return_exceptions=True,
        )
        return list(results)

    def _start_flush(self, slot: tuple[str, int]) -> None:
        if slot in self._flushing or not self._pending.get(slot):
            return
        self._flushing.add(slot)
        task = asyncio.get_running_loop().create_task(self._flush(slot))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _flush(self, slot: tuple[str, int]) -> None:
        queue, shard = slot
        sk = self._keys(queue)[shard]
        try:
            # Drain whatever accumulated while the previous batch was on the wire.
            while batch := self._pending.pop(slot, None):
                await self._send(queue, sk, batch)
        finally:
            self._flushing.discard(slot)
            if self._pending.get(slot):
                self._start_flush(slot)

    async def enqueue_batch(
        self, queue: str, jobs: Sequence[tuple[str, Any, str | None]]
    ) -> list[str | BaseException]:
        """Add ``(job_id, payload, dedup_key)`` jobs, a caller's batch: they join the next
        script call of their shard like :meth:`enqueue`'s (coalesced with whatever else is
        waiting), with one future per shard instead of one per job. Per job, in order: its id
        (the first job's id for a repeated dedup key) or the error :meth:`enqueue` would have
        raised (:class:`QueueFull`, :class:`QueueUnavailable`, …) — returned, not raised.
        For a caller that already holds a batch (a group commit chaining its enqueue to the
        insert).
        """
        self._keys(queue)
        count = self.config.shards
        by_shard: dict[int, tuple[list[int], list[_Job]]] = {}
        for i, (job_id, payload, dedup_key) in enumerate(jobs):
            if not job_id or "\n" in job_id:
                raise ValueError(f"job_id must be a non-empty single line, got {job_id!r}")
            shard = k.shard_for(dedup_key or job_id, count)
            idx, group = by_shard.setdefault(shard, ([], []))
            idx.append(i)
            group.append((job_id, encode_payload(payload), 0, dedup_key))
        if len(by_shard) == 1:
            ((shard, (_, group)),) = by_shard.items()
            one_shard: list[str | BaseException] = await self._add((queue, shard), group)
            return one_shard
        futures = [self._add((queue, shard), group) for shard, (_, group) in by_shard.items()]
        out: list[str | BaseException] = [""] * len(jobs)
        for (idx, _), results in zip(
            by_shard.values(), await asyncio.gather(*futures, return_exceptions=True), strict=True
        ):
            for n, i in enumerate(idx):
                # A shard whose send broke fails its own jobs only.
                out[i] = results if isinstance(results, BaseException) else results[n]
        return out

    async def _send(self, queue: str, sk: k.ShardKeys, batch: list[_Pending]) -> None:
        jobs = batch[0].jobs if len(batch) == 1 else [job for item in batch for job in item.jobs]
        step = self.config.enqueue_batch_max
        try:
            if len(jobs) <= step:
                results = await self._call(queue, sk, jobs)
            else:
                results = []
                for start in range(0, len(jobs), step):
                    results += await self._call(queue, sk, jobs[start : start + step])
        except BaseException as exc:
            # Cancelled mid-flight: the callers must not hang; the jobs may or may not be in.
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(QueueUnavailable(f"enqueue interrupted: {exc!r}"))
            raise
        if len(batch) == 1:
            item = batch[0]
            if not item.future.done():
                item.future.set_result(results[0] if item.one else results)
            return
        pos = 0
        for item in batch:
            if item.one:
                if not item.future.done():
                    item.future.set_result(results[pos])
                pos += 1
                continue
            n = len(item.jobs)
            if not item.future.done():
                item.future.set_result(results[pos : pos + n])
            pos += n

    async def _call(
        self, queue: str, sk: k.ShardKeys, batch: list[_Job]
    ) -> list[str | BaseException]:
        """One ``ENQUEUE`` script call for ``(job_id, payload, delay_ms, dedup_key)`` jobs of
        one shard; per job its id or its error (Redis failing fails them all alike)."""
        cfg = self.config
        keys: list[bytes] = [
            sk.stream,
            sk.index,
            sk.count,
            sk.delayed,
            sk.delayed_payload,
            sk.delayed_meta,
        ]
        dedup_indexes: list[str] = []
        for item in batch:
            if item[3] is None:
                dedup_indexes.append("0")
            else:
                keys.append(sk.dedup(item[3]))
                dedup_indexes.append(str(len(keys)))
        args: list[bytes | str | int] = [
            k.GROUP,
            now_ms(),
            cfg.shard_max_length,
            cfg.stream_maxlen,
            cfg.dedup_window_s,
            len(batch),
            "\n".join([item[0] for item in batch]),
            ",".join(dedup_indexes),
            ",".join([str(item[2]) for item in batch]),
            ",".join([str(len(item[1])) for item in batch]),
            b"".join([item[1] for item in batch]),
        ]
        self.round_trips += 1
        try:
            reply = await ENQUEUE(self.redis, keys, args)
        except REDIS_FAILURES as exc:
            error: BaseException = QueueUnavailable(str(exc)) if is_unavailable(exc) else exc
            return [error] * len(batch)
        out: list[str | BaseException] = []
        for i in range(len(batch)):
            if reply[2 * i] == _FULL:
                out.append(QueueFull(queue, cfg.max_length))
            else:
                out.append(reply[2 * i + 1].decode())
        return out

    async def close(self) -> None:
        """Wait for batches already on the wire (new calls after this are still served)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aenter__(self) -> Producer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
