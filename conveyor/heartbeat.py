"""The worker registry: every worker process says who it is and how loaded it is, every 5 s.

A :class:`Heartbeat` writes ``{id, host, pid, role, concurrency, busy, cpu_percent,
memory_percent, rss_bytes, last_seen}`` into a Redis hash that expires after ``ttl_s`` and
scores the id in a sorted-set index by ``last_seen``. :func:`list_workers` is the one read
function behind ``GET /api/v1/workers``, the board and the scaling advice; a worker whose
heartbeat is older than :data:`LOST_AFTER_S` is reported ``lost`` (stopped, hung or cut off)
until its hash expires. A worker that stops cleanly removes itself at once.

CPU and memory come from psutil: ``cpu_percent`` is this process's CPU use since the previous
beat (100 = one core), ``memory_percent`` its RSS against the cgroup memory limit when there is
one, else against physical memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import psutil
import structlog
from aiohttp import web

from conveyor import metrics
from conveyor.backoff import Outage
from conveyor.keys import REDIS, SETTINGS, WORKER
from conveyor.queue import keys as k

log = structlog.get_logger(__name__)

#: Seconds between beats.
INTERVAL_S = 5.0
#: A heartbeat older than this marks the worker lost on the board and in the advice.
LOST_AFTER_S = 15.0
#: A worker's hash expires this long after its last beat (lost workers stay visible till then).
TTL_S = 120.0

_FLOATS = ("cpu_percent", "memory_percent", "last_seen")
_INTS = ("pid", "concurrency", "busy", "rss_bytes")

HEARTBEAT: web.AppKey[Heartbeat] = web.AppKey("heartbeat")


def memory_limit_bytes() -> int:
    """The cgroup (v2, then v1) memory limit of this process, else the machine's memory."""
    total = int(psutil.virtual_memory().total)
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        with contextlib.suppress(OSError, ValueError):
            raw = Path(path).read_text().strip()
            if raw != "max" and 0 < int(raw) < total:
                return int(raw)
    return total


class Heartbeat:
    """Background task registering one worker process.

    :param redis: ``redis.asyncio`` client (bytes replies); not closed here.
    :param worker_id: unique id of the process (the queue consumer's name, so the board can
        match workers to consumers).
    :param role: the ``AP_CONTAINER_TYPE`` of the process.
    :param concurrency: ``AP_WORKER_CONCURRENCY``.
    :param busy: returns the slots in use right now.
    :param interval_s: seconds between beats, default 5.
    :param ttl_s: expiry of the worker's hash, default 120.
    :param prefix: the Redis key prefix (``AP_REDIS_KEY_PREFIX``).
    """

    def __init__(
        self,
        redis: Any,
        *,
        worker_id: str,
        role: str,
        concurrency: int,
        busy: Callable[[], int],
        interval_s: float = INTERVAL_S,
        ttl_s: float = TTL_S,
        prefix: str = k.PREFIX,
    ) -> None:
        self.prefix = prefix
        self.redis = redis
        self.worker_id = worker_id
        self.role = role
        self.concurrency = concurrency
        self.busy = busy
        self.interval_s = interval_s
        self.ttl_s = ttl_s
        self._process = psutil.Process()
        self._process.cpu_percent(None)  # primes the counter: the first reading is since now
        self._limit = memory_limit_bytes()
        self._host = socket.gethostname()
        self._task: asyncio.Task[None] | None = None

    def snapshot(self) -> dict[str, Any]:
        """What the next beat writes."""
        rss = int(self._process.memory_info().rss)
        return {
            "id": self.worker_id,
            "host": self._host,
            "pid": os.getpid(),
            "role": self.role,
            "concurrency": self.concurrency,
            "busy": int(self.busy()),
            "cpu_percent": round(float(self._process.cpu_percent(None)), 1),
            "memory_percent": round(100.0 * rss / self._limit, 1),
            "rss_bytes": rss,
            "last_seen": round(time.time(), 3),
        }

    async def beat(self) -> dict[str, Any]:
        """Write one heartbeat (one pipelined round trip) and return it."""
        snap = self.snapshot()
        metrics.WORKER_CPU.set(snap["cpu_percent"])
        metrics.WORKER_MEMORY.set(snap["memory_percent"])
        key = k.worker(self.worker_id, self.prefix)
        index = k.workers_index(self.prefix)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(key, mapping={f: str(v) for f, v in snap.items()})
            pipe.expire(key, int(self.ttl_s))
            pipe.zadd(index, {self.worker_id: snap["last_seen"]})
            # Entries whose hash has long expired: keep the index from growing forever.
            pipe.zremrangebyscore(index, "-inf", snap["last_seen"] - self.ttl_s)
            await pipe.execute()
        return snap

    async def start(self) -> None:
        if self._task is None:
            await self.beat()
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """Stop beating and deregister (a clean stop is not a lost worker)."""
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        with contextlib.suppress(Exception):
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.delete(k.worker(self.worker_id, self.prefix))
                pipe.zrem(k.workers_index(self.prefix), self.worker_id)
                await asyncio.shield(pipe.execute())

    async def __aenter__(self) -> Heartbeat:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _run(self) -> None:
        outage = Outage("redis", "registry", cap_s=self.interval_s)
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.beat()
            except Exception as exc:
                # Missing a beat shows the worker as lost for a while; dying would be worse.
                outage.failed(exc)
            else:
                outage.ok()


def _decode(raw: dict[bytes, bytes]) -> dict[str, Any]:
    out: dict[str, Any] = {key.decode(): val.decode(errors="replace") for key, val in raw.items()}
    for field in _INTS:
        with contextlib.suppress(KeyError, ValueError):
            out[field] = int(out[field])
    for field in _FLOATS:
        with contextlib.suppress(KeyError, ValueError):
            out[field] = float(out[field])
    return out


async def list_workers(
    redis: Any,
    *,
    include_lost: bool = True,
    lost_after_s: float = LOST_AFTER_S,
    prefix: str = k.PREFIX,
) -> list[dict[str, Any]]:
    """Registered workers, most recently seen first, each with ``heartbeat_age_s`` and
    ``lost`` (heartbeat older than ``lost_after_s``). ``include_lost=False`` keeps live ones."""
    now = time.time()
    ids: list[bytes] = await redis.zrevrange(k.workers_index(prefix), 0, -1)
    if not ids:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for wid in ids:
            pipe.hgetall(k.worker(wid.decode(), prefix))
        hashes: list[dict[bytes, bytes]] = await pipe.execute()
    out: list[dict[str, Any]] = []
    gone: list[bytes] = []
    for wid, raw in zip(ids, hashes, strict=True):
        if not raw:
            gone.append(wid)
            continue
        entry = _decode(raw)
        age = max(0.0, now - float(entry.get("last_seen") or 0.0))
        entry["heartbeat_age_s"] = round(age, 1)
        entry["lost"] = age > lost_after_s
        if include_lost or not entry["lost"]:
            out.append(entry)
    if gone:
        await redis.zrem(k.workers_index(prefix), *gone)
    return out


async def heartbeat_ctx(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx of the worker role, after ``worker_ctx``: registers this process."""
    settings = app[SETTINGS]
    consumer = getattr(app.get(WORKER), "consumer", None)
    worker_id = str(getattr(consumer, "name", "") or f"{socket.gethostname()}:{os.getpid()}")

    def busy() -> int:
        return int(getattr(consumer, "busy", 0) or 0)

    beat = Heartbeat(
        app[REDIS],
        worker_id=worker_id,
        role=settings.container_type.value,
        concurrency=settings.worker_concurrency,
        busy=busy,
        prefix=settings.redis_key_prefix,
    )
    await beat.start()
    app[HEARTBEAT] = beat
    try:
        yield
    finally:
        await beat.close()
