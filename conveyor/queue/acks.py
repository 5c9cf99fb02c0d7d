"""Coalesced acknowledgements: every handler that finished within a short linger (or while
the previous batch was on the wire) is acknowledged by one ``ACK`` script per shard.

Nobody waits for an acknowledgement — the run's state is committed before it, the caller has
its answer, the slot is free again — so a batch waits :data:`LINGER_S` for more unless it
already holds ``flush_at`` entries (as under a full load): under a moderate load, where runs
finish a few at a time, one call then acknowledges several of them instead of each few its
own. The cost is an entry pending a few milliseconds longer (a worker dying in them gets the
finished run redelivered, which finds it terminal and stops, as for any death between commit
and acknowledgement).
"""

from __future__ import annotations

import asyncio
import time

import structlog
from redis.asyncio import Redis

from conveyor.backoff import Outage
from conveyor.queue import keys as k
from conveyor.queue.scripts import ACK

log = structlog.get_logger(__name__)

#: Throughput buckets are this many seconds wide and live long enough for a one-minute window.
BUCKET_S = 10
BUCKET_TTL_S = 180
#: Most acknowledgements in one script call (bounds how long one call holds Redis).
MAX_BATCH = 2000
#: How long a batch of acknowledgements waits for more before it is sent.
LINGER_S = 0.005

#: ``(entry_id, job_id, wait_ms, summary)`` of one finished job.
AckItem = tuple[str, str, int, bytes]


class AckBatcher:
    """Collects acknowledgements and sends them in batches from a background loop.

    :param redis: the client to send with.
    :param keep: completed summaries kept per shard (0 keeps none).
    :param linger_s: how long a batch waits for more acknowledgements (0: the next loop turn).
    :param flush_at: a batch this large is sent without waiting (a sizeable part of a
        consumer's concurrency: runs finishing together under load).
    """

    def __init__(
        self, redis: Redis, keep: int, *, linger_s: float = LINGER_S, flush_at: int = 1
    ) -> None:
        self.redis = redis
        self.keep = keep
        self.linger_s = linger_s
        self.flush_at = max(1, flush_at)
        self._items: dict[k.ShardKeys, list[AckItem]] = {}
        self._wake = asyncio.Event()
        self._flushing = False
        self._last_error: BaseException | None = None
        self.pending = 0

    @property
    def busy(self) -> bool:
        """True while acknowledgements are queued or on the wire."""
        return bool(self.pending) or self._flushing

    def add(self, sk: k.ShardKeys, item: AckItem) -> None:
        batch = self._items.get(sk)
        if batch is None:
            self._items[sk] = [item]
        else:
            batch.append(item)
        self.pending += 1
        self._wake.set()

    async def run(self) -> None:
        """Flush whenever something was added, until cancelled; after a failed flush, wait
        a jittered backoff before resending (never spin while Redis is down)."""
        outage = Outage("redis", "ack")
        while True:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise asyncio.CancelledError
            await self._wake.wait()
            # Yield at least once so the fetch woken by the same completions reaches Redis
            # first (the next batch is then read while Redis runs this ACK, instead of queueing
            # behind it); linger for more unless the batch is full already.
            await asyncio.sleep(0 if self.pending >= self.flush_at else self.linger_s)
            self._wake.clear()
            if await self.flush():
                outage.ok()
                continue
            if self._flushing:
                # flush_until_done is sending right now; it retries on its own.
                await asyncio.sleep(0.05)
            else:
                await asyncio.sleep(outage.failed(self._last_error or "ack failed"))
            self._wake.set()

    async def flush(self) -> bool:
        """Send everything queued; False (and kept for later) if Redis failed."""
        if self._flushing or not self.pending:
            return not self.pending
        self._flushing = True
        try:
            batches, self._items = self._items, {}
            self.pending = 0
            results = await asyncio.gather(
                *(self._send(sk, items) for sk, items in batches.items()),
                return_exceptions=True,
            )
            ok = True
            for (sk, items), result in zip(batches.items(), results, strict=True):
                if isinstance(result, BaseException):
                    if isinstance(result, asyncio.CancelledError):
                        raise result
                    ok = False
                    self._items[sk] = items + self._items.get(sk, [])
                    self.pending += len(items)
                    self._last_error = result
            return ok
        finally:
            # Not re-armed here on failure: run() waits a backoff first (re-arming at once
            # made a worker spin on a dead connection at 100 % of a core).
            self._flushing = False

    async def flush_until_done(self, deadline_s: float) -> None:
        """Flush, retrying with backoff, until nothing is queued or the deadline passes."""
        end = time.monotonic() + deadline_s
        delay = 0.05
        while self.busy and time.monotonic() < end:
            if self._flushing:
                await asyncio.sleep(0.001)
            elif not await self.flush():
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def _send(self, sk: k.ShardKeys, items: list[AckItem]) -> None:
        bucket = int(time.time()) // BUCKET_S
        for i in range(0, len(items), MAX_BATCH):
            chunk = items[i : i + MAX_BATCH]
            # Three joined blobs instead of three arguments per job: packing thousands of small
            # arguments costs the client more than the whole script costs Redis.
            await ACK(
                self.redis,
                [sk.stream, sk.index, sk.count, sk.completed, sk.throughput(bucket)],
                [
                    k.GROUP,
                    self.keep,
                    BUCKET_TTL_S,
                    ",".join([c[0] for c in chunk]),
                    "\n".join([c[1] for c in chunk]),
                    b"\n".join([c[3] for c in chunk]),
                    sum([c[2] for c in chunk]),
                ],
            )
