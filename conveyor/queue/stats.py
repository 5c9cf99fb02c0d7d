"""Queue depth, wait times and throughput, read from Redis itself, plus the board's history.

Everything comes from data the queue keeps anyway: the unacknowledged counter and the group's
PEL give waiting and active, stream-id timestamps give the oldest wait, and the 10-second
buckets the ack script increments give throughput and average wait over the last minute. The
API, the board, Prometheus gauges and the scaling advice all read :func:`queue_stats`.
:class:`Sampler` stores one snapshot per queue every 10 s (one process per slot, whichever
takes the lock) in a capped list for the board's 15-minute charts.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from typing import Any

import orjson
import structlog
from redis.asyncio import Redis

from conveyor.aio import raise_if_cancelling
from conveyor.backoff import Outage
from conveyor.queue import keys as k
from conveyor.queue.acks import BUCKET_S
from conveyor.queue.config import QueueConfig
from conveyor.queue.errors import unavailable_as_typed
from conveyor.queue.job import entry_ms, now_ms
from conveyor.queue.scripts import STATS

log = structlog.get_logger(__name__)

#: Buckets summed for "last minute": the current one and the five before it (50–60 s).
WINDOW_BUCKETS = 60 // BUCKET_S


@dataclasses.dataclass(slots=True)
class QueueStats:
    """A snapshot of one queue, summed over its shards.

    :param waiting: entries not yet delivered to any consumer.
    :param active: entries delivered and not yet acknowledged (the group's PEL).
    :param delayed: jobs waiting in the delayed set (retries with backoff, delays).
    :param dead: dead-lettered jobs kept.
    :param completed: completed summaries kept (capped by retention).
    :param consumers: consumers registered in the group (live or recently gone).
    :param lag: ``XINFO GROUPS`` lag on Redis 7 when it can be computed, else ``waiting``.
    :param oldest_wait_s: age of the oldest waiting entry, from its stream id.
    :param avg_wait_s: mean enqueue-to-start wait of jobs completed in the last minute.
    :param throughput_1m: jobs completed in the last minute.
    :param paused: whether the queue is paused.
    """

    queue: str
    waiting: int = 0
    active: int = 0
    delayed: int = 0
    dead: int = 0
    completed: int = 0
    consumers: int = 0
    lag: int = 0
    oldest_wait_s: float = 0.0
    avg_wait_s: float = 0.0
    throughput_1m: int = 0
    paused: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


async def queue_stats(redis: Redis, config: QueueConfig, queue: str) -> QueueStats:
    """Stats of ``queue`` across its shards (one script call per shard)."""
    out = QueueStats(queue=queue)
    bucket = int(time.time()) // BUCKET_S
    oldest_ms: int | None = None
    waits = 0
    async with unavailable_as_typed():
        for sk in config.shard_keys(queue):
            buckets = [sk.throughput(bucket - i) for i in range(WINDOW_BUCKETS)]
            reply = await STATS(
                redis,
                [sk.stream, sk.count, sk.delayed, sk.dead, sk.completed, *buckets],
                [k.GROUP],
            )
            unacked, pending, delayed, dead, completed, consumers, lag, first, n, w = reply
            waiting = max(0, int(unacked) - int(pending))
            out.waiting += waiting
            out.active += int(pending)
            out.delayed += int(delayed)
            out.dead += int(dead)
            out.completed += int(completed)
            out.consumers = max(out.consumers, int(consumers))
            out.lag += int(lag) if int(lag) >= 0 else waiting
            out.throughput_1m += int(n)
            waits += int(w)
            if first:
                ms = entry_ms(first)
                oldest_ms = ms if oldest_ms is None else min(oldest_ms, ms)
        out.paused = bool(await redis.exists(k.paused(queue, config.key_prefix)))
    if oldest_ms is not None and out.waiting:
        out.oldest_wait_s = max(0.0, (now_ms() - oldest_ms) / 1000)
    if out.throughput_1m:
        out.avg_wait_s = waits / out.throughput_1m / 1000
    return out


async def all_stats(
    redis: Redis, config: QueueConfig, queues: tuple[str, ...] = k.PRIORITY
) -> list[QueueStats]:
    """Stats of every queue, in priority order."""
    return [await queue_stats(redis, config, q) for q in queues]


async def history(redis: Redis, queue: str, prefix: str = k.PREFIX) -> list[dict[str, Any]]:
    """The board's samples of ``queue``, oldest first (at most 15 minutes' worth)."""
    async with unavailable_as_typed():
        raw = await redis.lrange(k.history(queue, prefix), 0, -1)
    return [orjson.loads(x) for x in reversed(raw)]


async def sample(redis: Redis, config: QueueConfig, queues: tuple[str, ...] = k.PRIORITY) -> int:
    """Record one history sample per queue unless another process already took this slot.

    Returns how many samples this call wrote.
    """
    slot = int(time.time() // config.sample_interval_s)
    ttl_ms = max(1, int(config.sample_interval_s * 1000))
    written = 0
    for queue in queues:
        # One lock per slot and queue: N workers sampling still yields one point per slot.
        if not await redis.set(
            k.history_lock(queue, slot, config.key_prefix), 1, nx=True, px=2 * ttl_ms
        ):
            continue
        st = await queue_stats(redis, config, queue)
        point = {
            "t": int(time.time()),
            "waiting": st.waiting,
            "active": st.active,
            "delayed": st.delayed,
            "dead": st.dead,
            "throughput_1m": st.throughput_1m,
            "oldest_wait_s": round(st.oldest_wait_s, 3),
            "avg_wait_s": round(st.avg_wait_s, 3),
        }
        key = k.history(queue, config.key_prefix)
        await redis.lpush(key, orjson.dumps(point))
        await redis.ltrim(key, 0, config.history_length - 1)
        written += 1
    return written


class Sampler:
    """Background task calling :func:`sample` every ``config.sample_interval_s``.

    Run one in every process that holds a Redis client; the per-slot lock keeps the history
    at one point per interval however many run.
    """

    def __init__(
        self, redis: Redis, config: QueueConfig | None = None, queues: tuple[str, ...] = k.PRIORITY
    ) -> None:
        self.redis = redis
        self.config = config or QueueConfig()
        self.queues = queues
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def __aenter__(self) -> Sampler:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _run(self) -> None:
        interval = self.config.sample_interval_s
        outage = Outage("redis", "sample")
        while True:
            try:
                await sample(self.redis, self.config, self.queues)
            except Exception as exc:
                # The board losing a point is fine; the sampler dying is not.
                outage.failed(exc)
            else:
                outage.ok()
            raise_if_cancelling()
            # Wake at the next slot boundary so samples line up across processes.
            await asyncio.sleep(interval - (time.time() % interval) + 0.01)
