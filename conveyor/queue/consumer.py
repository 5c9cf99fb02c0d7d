"""The worker side of the queue: read entries, run the handler, acknowledge in batches.

One :class:`Consumer` per worker process, under a consumer name unique to the process. It asks
for exactly as many entries as it has free slots, ``sync`` before ``runs`` in one scripted
round trip, and blocks in ``XREADGROUP`` only when every queue is empty. Handlers run on one
long-lived worker coroutine per slot; their acknowledgements are coalesced into one script call
per shard (:mod:`conveyor.queue.acks`), sent only after the handler returned (so after the
run's final state is committed). A handler that raises is an
internal error: the entry is retried with exponential backoff through the delayed set and
dead-lettered after ``max_deliveries``; a handler failing because a backend is down spends no
delivery. Heartbeats keep in-flight entries from looking idle; a consumer silent past the
visibility timeout (its worker died or hung) is taken over by any live worker within a second,
and a consumer that closes hands back what it could not finish. Every retry loop backs off with
jitter and logs once per outage (:mod:`conveyor.backoff`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from typing import Any

import orjson
import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from conveyor.aio import raise_if_cancelling
from conveyor.backoff import Outage
from conveyor.queue import keys as k
from conveyor.queue import maintenance
from conveyor.queue.acks import AckBatcher
from conveyor.queue.config import QueueConfig
from conveyor.queue.errors import REDIS_FAILURES, is_unavailable
from conveyor.queue.job import Job, UndecodablePayload, _EntryLost, decode_entry, now_ms
from conveyor.queue.scripts import (
    CLAIM,
    DEAD,
    DROP_LEASE,
    FETCH,
    RELEASE,
    RENEW_LEASE,
    RETRY,
    TOUCH,
    execute_command,
)

log = structlog.get_logger(__name__)

Handler = Callable[[Job], Awaitable[None]]
DeadHandler = Callable[[Job, str], Awaitable[None]]

#: Longest error text stored with a retried or dead-lettered job.
MAX_ERROR_CHARS = 2000
#: Consumers silent this long with nothing pending are removed from the group.
FORGET_CONSUMER_MS = 3_600_000
#: Longest time shutdown spends, after the drain, flushing acknowledgements and handing entries
#: back (milliseconds when Redis answers; what does not get out stays pending, and the
#: takeover returns it): a worker stops within ``AP_WORKER_DRAIN_SECONDS`` + this + 1 s.
HANDOFF_S = 4.0
#: Most entries one takeover call claims from one silent consumer.
MAX_TAKEOVER_BATCH = 1000
#: Prefix of the stored error of a job retried because a backend was down: when its first
#: such failure was (epoch ms), so the no-delivery retries are capped in wall time.
_TRANSIENT = re.compile(r"^\[backend down since (\d+)\] ")


#: The read command, named in bytes: redis-py looks its reply parser up by the command's name
#: as text, so the reply comes back as Redis sent it (entries with flat field lists, which
#: :func:`decode_entry` reads directly) instead of being rebuilt as a dict per entry first.
_XREADGROUP = b"XREADGROUP"


#: A completed job's summary (see :meth:`Consumer._queue_ack`).
_SUMMARY = b'{"id":%b,"e":"%b","a":%d,"w":%d,"r":%d,"f":%d,"t":%d}'


def _reraise_if_cancelling(exc: BaseException | None = None) -> None:
    """Re-raise a cancellation that something below swallowed (redis-py may turn it into a
    connection error, Python 3.11's ``wait_for`` may drop it): loops must still stop."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError from exc


def _redis_down(exc: BaseException) -> str | None:
    return "redis" if isinstance(exc, RedisError | OSError) and is_unavailable(exc) else None


def _retry_pause_s(redis: Any) -> float:
    """The longest pause the Redis client's own retry makes between two attempts of one
    command (redis-py's default: 1 s): a live consumer's heartbeat may sit in it when Redis
    comes back. 1 s when the client does not say."""
    try:
        backoff = redis.get_retry()._backoff
    except Exception:
        return 1.0
    for attr in ("_cap", "_backoff"):  # exponential kinds, constant
        value = getattr(backoff, attr, None)
        if isinstance(value, int | float):
            return float(value)
    return 1.0


def default_consumer_name() -> str:
    """``host:pid``: stable across restarts of a container (same host name, same pid), so a
    restarted worker takes back its own pending entries at once; readable on the board."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _short(got: Sequence[tuple[_Stream, bytes, Any, int]], count: int) -> bool:
    """Whether a read asking each stream for ``count`` entries got fewer from every one."""
    if len(got) < count:
        return True
    per: dict[int, int] = {}
    for entry in got:
        n = per[id(entry[0])] = per.get(id(entry[0]), 0) + 1
        if n >= count:
            return False
    return True


class _Stream:
    """One stream (queue shard) this consumer reads, with its unacknowledged bookkeeping."""

    __slots__ = ("inflight", "keys", "queue", "shard")

    def __init__(self, keys: k.ShardKeys) -> None:
        self.keys = keys
        self.queue = keys.queue
        self.shard = keys.shard
        #: entry id → job, for everything this consumer holds (running or buffered).
        self.inflight: dict[str, Job] = {}


class Consumer:
    """Runs ``handler`` for jobs of ``queues`` with up to ``concurrency`` at a time.

    :param redis: ``redis.asyncio.Redis`` client (``decode_responses=False``); not closed here.
    :param handler: ``async def handler(job) -> None``; raising means an internal error
        (redelivery with backoff). A flow run that ends ``FAILED`` must return normally.
    :param config: queue configuration; ``config.concurrency`` unless ``concurrency`` is given.
    :param on_dead: ``async def on_dead(job, error)`` called before a job is dead-lettered (the
        engine marks the run ``INTERNAL_ERROR``); if it raises, the error is logged and the
        entry is dead-lettered all the same (nothing stays pending forever).
    :param transient: ``transient(exc)`` names the backend (``"redis"``, ``"postgres"``) when
        a handler's exception means a backend is down rather than the job is bad; such jobs
        are retried without spending a delivery. Default: Redis connection errors only.
    :param queues: queues to serve, in priority order; default ``sync`` then ``runs``.
    :param name: consumer name; default ``host:pid`` (leased in Redis while the process lives;
        if another live process holds it, a random suffix is added). A stable name lets a
        restarted process take back its own pending entries at once.

    Takeover: every consumer beats (touches its entries) each ``heartbeat_s``; a consumer
    with pending entries silent for ``visibility_timeout_s`` is dead, and live consumers claim
    its entries (as many as they have free slots) within a second. On :meth:`close`, entries
    still held at the deadline are handed back to the stream at once.
    """

    def __init__(
        self,
        redis: Redis,
        handler: Handler,
        config: QueueConfig | None = None,
        *,
        on_dead: DeadHandler | None = None,
        transient: Callable[[BaseException], str | None] | None = None,
        queues: Sequence[str] = k.PRIORITY,
        name: str | None = None,
        concurrency: int | None = None,
    ) -> None:
        self.redis = redis
        self.handler = handler
        self.config = config or QueueConfig()
        self.on_dead = on_dead
        self.transient = transient or _redis_down
        self.name = name or default_consumer_name()
        #: Default names are leased so two live processes never share one.
        self._lease_name = name is None
        self._lease_token = secrets.token_hex(8)
        self._leased: bytes | None = None
        self.concurrency = concurrency or self.config.concurrency
        self._name_b = self.name.encode()
        self._streams = [_Stream(sk) for q in queues for sk in self.config.shard_keys(q)]
        self._by_key = {s.keys.stream: s for s in self._streams}
        self._queues = tuple(dict.fromkeys(queues))
        # Redis Cluster cannot run a script over several slots; fall back to per-stream reads.
        self._cluster = not isinstance(redis, Redis)
        self._buffer: deque[tuple[_Stream, Job]] = deque()
        self._running = 0
        #: One long-lived worker coroutine per slot; idle ones wait on their own future.
        self._workers: list[asyncio.Task[None]] = []
        self._idle: deque[asyncio.Future[None]] = deque()
        #: Whether a read wakes a worker per entry at once (see :meth:`_wake_workers`); off
        #: while handlers finish without suspending, where the first worker runs the batch.
        self._eager = True
        self._wake_pending = False
        #: Wake-ups so far; the last one's workers, how many of them found the buffer empty,
        #: and the most jobs one of them ran in a row before idling again.
        self._wave = 0
        self._woken = 0
        self._woke_idle = 0
        self._most = 0
        #: Side tasks (dead-lettering) that must finish before shutdown.
        self._tasks: set[asyncio.Task[None]] = set()
        self._paused: frozenset[str] = frozenset()
        #: Since when (monotonic) this process has reached Redis without a failure; None while
        #: it fails. Takeover waits for ``config.takeover_guard_s`` of it.
        self._healthy_since: float | None = None
        #: Whether this process ever saw Redis fail (a fresh one trusts idle times at once).
        self._saw_outage = False
        self._guard_s = self.config.takeover_guard_s + _retry_pause_s(redis)
        #: Set (and replaced) after every heartbeat round; ownership checks wait on it.
        self._beat = asyncio.Event()
        self._slot = asyncio.Event()
        # A quarter of the slots finishing together is a busy worker's batch already: it goes
        # at once (lingering then cost the drain ~7 % more CPU per run, for no fewer calls).
        self._acks = AckBatcher(
            redis,
            self.config.completed_retention_max_count,
            flush_at=max(1, self.concurrency // 4),
        )
        self._stop = asyncio.Event()
        self._block_task: asyncio.Task[Any] | None = None
        self._main: asyncio.Task[int] | None = None
        self._background: list[asyncio.Task[None]] = []
        self._next_due: dict[int, float] = {}
        self._close_timeout_s = 30.0
        self._outages = {
            op: Outage("redis", op) for op in ("fetch", "touch", "housekeeping", "retry", "dead")
        }
        #: Outages of backends seen failing by handlers (``postgres``, ``redis``), by name.
        self._run_outages: dict[str, Outage] = {}
        self.processed = 0
        self.failed = 0
        self.dead_lettered = 0

    # ------------------------------------------------------------------ lifecycle
    @property
    def busy(self) -> int:
        """Jobs held: running handlers plus entries fetched and not yet started."""
        return self._running + len(self._buffer)

    async def start(self) -> None:
        """Start consuming in the background until :meth:`close` (the name is final once
        this returns)."""
        if self._main is None:
            self._stop.clear()
            await self._take_name()
            # Not run(): a close() right after start() must not have its stop cleared.
            self._main = asyncio.get_running_loop().create_task(self._run())

    async def _take_name(self) -> None:
        """Lease the default name, or fall back to a unique one (never share a name)."""
        if not self._lease_name or self._leased is not None:
            return
        key = k.consumer_name(self.name, self.config.key_prefix)
        try:
            ok = await self.redis.set(
                key, self._lease_token, nx=True, px=self.config.visibility_timeout_ms
            )
        except REDIS_FAILURES as exc:
            _reraise_if_cancelling(exc)
            ok = False
        if ok:
            self._leased = key
        else:
            # Held by another live process (or its predecessor killed moments ago, whose
            # entries the takeover then returns): a fresh name is always safe.
            self.name = f"{self.name}:{secrets.token_hex(3)}"
            self._lease_name = False
        self._name_b = self.name.encode()

    async def close(self, timeout_s: float = 30.0) -> None:
        """Stop fetching, let running handlers finish (cancel them after ``timeout_s``), flush
        acknowledgements, then hand entries still held back to the stream for another worker
        (a redelivery: the engine resumes from the checkpoints)."""
        self._close_timeout_s = timeout_s
        self._stop.set()
        self._slot.set()
        if self._block_task is not None:
            self._block_task.cancel()
        if self._main is not None:
            main, self._main = self._main, None
            try:
                # Handlers get timeout_s, acknowledgements and hand-back HANDOFF_S + 1 s more;
                # past that (a bug) we stop waiting.
                await asyncio.wait_for(asyncio.shield(main), timeout_s + HANDOFF_S + 5)
            except TimeoutError:
                log.error("queue.close_timeout", consumer=self.name)
                main.cancel()
            await asyncio.gather(main, return_exceptions=True)

    async def __aenter__(self) -> Consumer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def drain(self, *, wait_delayed_s: float = 0.0, wait_pending: bool = False) -> int:
        """Burst mode: process until nothing is left, then return how many jobs were handled.

        "Nothing left" means no waiting entry, nothing running here, no delayed job due within
        ``wait_delayed_s`` and, with ``wait_pending``, no entry pending anywhere in the group
        (entries of a dead worker are reclaimed once idle past the visibility timeout).
        """
        return await self.run(burst=True, wait_delayed_s=wait_delayed_s, wait_pending=wait_pending)

    async def run(
        self, *, burst: bool = False, wait_delayed_s: float = 0.0, wait_pending: bool = False
    ) -> int:
        """Consume until :meth:`close` (or, with ``burst``, until drained; see :meth:`drain`)."""
        self._stop.clear()
        return await self._run(
            burst=burst, wait_delayed_s=wait_delayed_s, wait_pending=wait_pending
        )

    async def _run(
        self, *, burst: bool = False, wait_delayed_s: float = 0.0, wait_pending: bool = False
    ) -> int:
        await self._take_name()
        before = self.processed + self.failed + self.dead_lettered
        loop = asyncio.get_running_loop()
        self._background = [loop.create_task(self._acks.run()), loop.create_task(self._heartbeat())]
        self._workers = [loop.create_task(self._worker()) for _ in range(self.concurrency)]
        if not burst:
            self._background.append(loop.create_task(self._maintenance_loop()))
        try:
            await self._setup()
            await self._loop(burst, wait_delayed_s, wait_pending)
        finally:
            await self._shutdown()
        return self.processed + self.failed + self.dead_lettered - before

    async def _setup(self) -> None:
        outage = self._outages["fetch"]
        while not self._stop.is_set():
            try:
                for s in self._streams:
                    with contextlib.suppress(ResponseError):  # BUSYGROUP: it exists already
                        await self.redis.xgroup_create(
                            s.keys.stream, k.GROUP, id="0", mkstream=True
                        )
                await self._refresh_paused()
                # Entries this name held when its process died come back first.
                for s in self._streams:
                    await self._claim(s, min_idle_ms=0, count=10_000, owner=self.name)
                outage.ok()
                self._redis_ok()
                return
            except REDIS_FAILURES as exc:
                _reraise_if_cancelling(exc)
                if not is_unavailable(exc):
                    raise
                self._redis_failed()
                await self._sleep(outage.failed(exc))

    async def _shutdown(self) -> None:
        deadline = time.monotonic() + self._close_timeout_s
        while (self.busy or self._tasks) and time.monotonic() < deadline:
            await self._wait_slot(min(0.05, max(0.0, deadline - time.monotonic())))
        # Past the deadline whatever still runs is cancelled and its entries (and the ones
        # buffered) are handed back; nothing here awaits between snapshot and cancel, so no
        # handler can finish in between.
        held = [(s, list(s.inflight)) for s in self._streams if s.inflight]
        stragglers = [*self._workers, *self._tasks]
        for t in stragglers:
            t.cancel()
        await asyncio.gather(*stragglers, return_exceptions=True)
        self._workers = []
        self._idle.clear()
        self._buffer.clear()
        self._running = 0
        try:
            # Bounded as a whole: with Redis away each call could sit in the client's retries.
            async with asyncio.timeout(HANDOFF_S):
                await self._acks.flush_until_done(deadline_s=HANDOFF_S)
                if held:
                    await self._release(held)
        except TimeoutError:
            log.warning("queue.handoff_timeout", consumer=self.name, held=len(held))
        for t in self._background:
            t.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        self._background = []
        if self._leased is not None:
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                async with asyncio.timeout(1.0):
                    await DROP_LEASE(self.redis, [self._leased], [self._lease_token])
            self._leased = None

    async def _release(self, held: list[tuple[_Stream, list[str]]]) -> None:
        """Hand entries still held back to their stream's tail (see ``RELEASE``); if Redis is
        down they stay pending and the takeover returns them after the visibility timeout."""
        for s, ids in held:
            try:
                n = await RELEASE(
                    self.redis,
                    [s.keys.stream, s.keys.index, s.keys.count],
                    [k.GROUP, self._name_b, *ids],
                )
            except REDIS_FAILURES as exc:
                _reraise_if_cancelling(exc)
                log.warning("queue.release_failed", entries=len(ids), error=str(exc))
                continue
            log.warning("queue.released", stream=s.keys.stream.decode(), count=int(n))

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    # ------------------------------------------------------------------ main loop
    async def _loop(  # noqa: PLR0912 - one branch per read outcome
        self, burst: bool, wait_delayed_s: float, wait_pending: bool
    ) -> None:
        outage = self._outages["fetch"]
        last_housekeeping = 0.0
        # Burst mode housekeeps in this loop: every 20 ms while the queue looks empty (so a
        # drain sees due delayed jobs and stalled entries at once), at the maintenance loop's
        # tick while entries keep coming (each round costs two round trips on the fetch path).
        busy_tick = min(self.config.delayed_poll_s, self.config.pause_poll_s)
        tick = 0.02
        # Whether the last read left every stream empty. Then the next read blocks at once
        # (XREADGROUP BLOCK answers at once when entries are there): under a moderate load
        # each arrival costs one read, not a non-blocking one that finds nothing plus the
        # blocking one. It asks each stream for an equal share of the free slots (COUNT is
        # per stream), so it never takes more than there are; a stream that fills its share
        # sends the next read back to the exact, priority-ordered one.
        drained = False
        while not self._stop.is_set():
            _reraise_if_cancelling()
            self._wake_workers()
            free = self.concurrency - self.busy
            if free <= 0:
                self._slot.clear()
                await self._slot.wait()
                continue
            streams = [s for s in self._streams if s.queue not in self._paused]
            try:
                if burst and time.monotonic() - last_housekeeping > tick:
                    last_housekeeping = time.monotonic()
                    await self._housekeep_once(reclaim=True)
                    streams = [s for s in self._streams if s.queue not in self._paused]
                if not streams:
                    if burst:
                        return
                    await self._sleep(self.config.pause_poll_s)
                    continue
                share = free // len(streams)
                if drained and share and not burst and not self._cluster:
                    got = await self._fetch_blocking(streams, share)
                    drained = _short(got, share)
                else:
                    got = await self._fetch(streams, free)
                    drained = len(got) < free
                    tick = busy_tick if got else 0.02
                    if not got:
                        if burst:
                            if await self._drained(wait_delayed_s, wait_pending):
                                return
                            await self._wait_slot(0.01)
                            continue
                        # COUNT is per stream: each asks for its share (at least one), so
                        # entries landing on every stream meanwhile are not read twice over.
                        got = await self._fetch_blocking(streams, max(1, share))
                        drained = _short(got, max(1, share))
                outage.ok()
                self._redis_ok()
            except REDIS_FAILURES as exc:
                _reraise_if_cancelling(exc)
                if not is_unavailable(exc) and not outage.down:
                    log.exception("queue.fetch_failed")
                if is_unavailable(exc):
                    self._redis_failed()
                await self._sleep(outage.failed(exc))
                continue
            if got:
                self._accept(got)

    async def _wait_slot(self, timeout_s: float) -> None:
        self._slot.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._slot.wait(), timeout_s)

    async def _fetch(
        self, streams: list[_Stream], free: int
    ) -> list[tuple[_Stream, bytes, Any, int]]:
        out: list[tuple[_Stream, bytes, Any, int]] = []
        groups = [streams] if not self._cluster else [[s] for s in streams]
        for group in groups:
            if free <= 0:
                break
            if len(group) == 1 and not self._cluster:
                # One stream needs no script: a plain read costs Redis a third of FETCH's
                # (which converts every entry to Lua and back). Not on a cluster, where the
                # client asks a node for XREADGROUP's keys first (COMMAND GETKEYS): the
                # script, routed by its key, is one round trip.
                free -= await self._read(group[0], free, out)
                continue
            reply = await FETCH(
                self.redis, [s.keys.stream for s in group], [k.GROUP, self._name_b, free]
            )
            for i in range(0, len(reply), 2):
                s = group[int(reply[i]) - 1]
                for eid, fields in reply[i + 1]:
                    out.append((s, eid, fields, 1))
                free -= len(reply[i + 1])
        return out

    async def _read(
        self, s: _Stream, count: int, out: list[tuple[_Stream, bytes, Any, int]]
    ) -> int:
        """Non-blocking ``XREADGROUP`` of one stream into ``out``; how many entries came."""
        args = (_XREADGROUP, b"GROUP", k.GROUP, self._name_b, b"COUNT", count, b"STREAMS")
        try:
            reply = await execute_command(self.redis)(*args, s.keys.stream, ">")
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # Redis came back empty (or the stream was never written): recreate, read again.
            with contextlib.suppress(ResponseError):
                await self.redis.xgroup_create(s.keys.stream, k.GROUP, id="0", mkstream=True)
            reply = await execute_command(self.redis)(*args, s.keys.stream, ">")
        if not reply:
            return 0
        n = 0
        for _, entries in reply.items() if isinstance(reply, dict) else reply:
            for entry in entries:
                out.append((s, entry[0], entry[1], 1))
            n += len(entries)
        return n

    async def _fetch_blocking(
        self, streams: list[_Stream], count: int
    ) -> list[tuple[_Stream, bytes, Any, int]]:
        """``XREADGROUP … BLOCK`` of ``streams``: up to ``count`` entries from each."""
        if self._cluster:
            # One blocking read cannot span slots; poll instead (Cluster is the rare deployment).
            await self._sleep(min(0.05, self.config.block_ms / 1000))
            return []
        args: list[Any] = [_XREADGROUP, b"GROUP", k.GROUP, self._name_b, b"COUNT", count]
        args += ["BLOCK", self.config.block_ms, "STREAMS"]
        args += [s.keys.stream for s in streams] + [">"] * len(streams)
        self._block_task = asyncio.ensure_future(execute_command(self.redis)(*args))
        try:
            reply = await self._block_task
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._stop.is_set() and task is not None and not task.cancelling():
                return []
            raise
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            for s in streams:
                with contextlib.suppress(ResponseError):
                    await self.redis.xgroup_create(s.keys.stream, k.GROUP, id="0", mkstream=True)
            return []
        finally:
            self._block_task = None
        out: list[tuple[_Stream, bytes, Any, int]] = []
        if not reply:
            return out
        items = reply.items() if isinstance(reply, dict) else reply
        for key, entries in items:
            s = self._by_key[key]
            for entry in entries:
                eid, fields = entry[0], entry[1]
                if fields is None:  # deleted while pending (only on history reads)
                    continue
                out.append((s, eid, fields, 1))
        return out

    def _accept(self, got: Iterable[tuple[_Stream, bytes, Any, int]]) -> None:
        fence = self._ensure_owned
        now = time.monotonic()
        for s, eid, fields, deliveries in got:
            try:
                job = decode_entry(s.queue, s.shard, eid, fields, deliveries)
            except UndecodablePayload as exc:
                s.inflight[exc.job.entry_id] = exc.job
                self._spawn(self._dead_letter(s, exc.job, exc.reason))
                continue
            job.fence = fence
            job.confirmed = now
            s.inflight[job.entry_id] = job
            if deliveries > 1 and job.attempt > self.config.max_deliveries:
                error = (
                    f"gave up after {self.config.max_deliveries} deliveries "
                    f"(worker died or stalled); last error: {job.last_error or 'none'}"
                )
                self._spawn(self._dead_letter(s, job, error))
                continue
            self._buffer.append((s, job))
        self._wake_workers()

    def _wake_workers(self) -> None:
        """Wake an idle worker for every buffered entry, all in this loop turn.

        The jobs of one read then run in the same turn: the engine's handlers all suspend
        at their run's final write, and writes submitted in one turn share one statement,
        so the runs also finish together, free their slots together and are read again
        together — a backlog keeps circulating as one wave of ``concurrency`` runs, each
        read, write and acknowledgement serving all of them. (Waking one worker first and
        the rest a turn later split every read into a run written alone and the others a
        statement later; over time the backlog broke up into many waves of a few runs, and
        round trips per run grew accordingly.)

        Handlers that finish without suspending (a no-op) let the first woken worker run
        the whole read in its loop, and the others wake to an empty buffer. When that is
        what the last wake-up saw — of the several workers it woke, one ran several jobs in
        a row and all the others found nothing — the next reads wake one worker now and the
        rest a turn later, only if entries are still buffered then, which means a handler
        suspended: wakes go back to all at once. (Woken workers that all find nothing
        because busy workers finishing in the same turn took the entries first are not
        that: none of them ran anything.)"""
        buffer = self._buffer
        if not buffer:
            return
        if self._eager:
            if self._woken > 1 and self._most > 1 and self._woke_idle >= self._woken - 1:
                self._eager = False
            else:
                self._wave_of(self._wake(len(buffer)))
                return
        self._wake(1)
        if buffer and self._idle and not self._wake_pending:
            self._wake_pending = True
            asyncio.get_running_loop().call_soon(self._wake_rest)

    def _wake_rest(self) -> None:
        self._wake_pending = False
        if self._buffer:
            # The first worker suspended with entries left: handlers suspend, wake them all.
            self._eager = True
            self._wave_of(self._wake(len(self._buffer)))

    def _wave_of(self, woken: int) -> None:
        if woken:
            self._wave += 1
            self._woken, self._woke_idle, self._most = woken, 0, 0

    def _wake(self, n: int) -> int:
        """Wake up to ``n`` idle workers; how many were woken."""
        idle = self._idle
        woken = 0
        while woken < n and idle:
            waiter = idle.popleft()
            if not waiter.done():
                waiter.set_result(None)
                woken += 1
        return woken

    async def _worker(self) -> None:
        # A worker drains the buffer in a tight loop: a handler that finishes without really
        # suspending costs no task creation and no event-loop round of its own.
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        buffer = self._buffer
        woke_in = ran = 0  # the wake-up that woke this worker; jobs it ran since
        while True:
            if task.cancelling():
                raise asyncio.CancelledError
            while buffer:
                # A cancellation that redis-py swallowed inside a handler must still stop
                # this worker before it takes the next job (shutdown has a deadline).
                if task.cancelling():
                    raise asyncio.CancelledError
                s, job = buffer.popleft()
                self._running += 1
                ran += 1
                await self._execute(s, job)
            if woke_in == self._wave and ran > self._most:
                self._most = ran
            waiter: asyncio.Future[None] = loop.create_future()
            self._idle.append(waiter)
            await waiter
            woke_in, ran = self._wave, 0
            if not buffer:
                self._woke_idle += 1

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ running a job
    async def _execute(self, s: _Stream, job: Job) -> None:
        started = time.time()
        try:
            if job.lost:
                raise _EntryLost(job.entry_id)  # taken over while buffered
            await self.handler(job)
        except asyncio.CancelledError:
            # Shutdown deadline: left pending, another worker picks it up after the timeout.
            raise
        except Exception as exc:
            # Cancelled mid-handler but surfaced as another error: still a shutdown, so the
            # entry stays pending (no retry is spent on it).
            raise_if_cancelling()
            if job.lost:
                # Fenced: the entry is another consumer's now; neither retry nor acknowledge
                # it (XACK ignores the owner: it would end the new owner's delivery).
                log.warning("queue.fenced", queue=job.queue, job_id=job.id, error=repr(exc))
                return
            self.failed += 1
            await self._handle_failure(s, job, exc)
        else:
            if job.lost:
                log.warning("queue.fenced", queue=job.queue, job_id=job.id, error=None)
                return
            self.processed += 1
            self._queue_ack(s, job, started)
            if self._run_outages:
                for outage in self._run_outages.values():
                    outage.ok()
        finally:
            s.inflight.pop(job.entry_id, None)
            self._running -= 1
            self._slot.set()

    def _queue_ack(self, s: _Stream, job: Job, started: float) -> None:
        start_ms = int(started * 1000)
        fin = now_ms()
        wait = max(0, start_ms - job.entry_ms)
        # The completed summary, formatted directly: the same bytes as orjson.dumps of the
        # dict {"id", "e", "a", "w", "r", "f", "t"} (the job id JSON-escaped by orjson; the
        # entry id is digits and a dash), for about two thirds of the cost per job.
        summary = _SUMMARY % (
            orjson.dumps(job.id),
            job.entry_id.encode(),
            job.attempt,
            wait,
            fin - start_ms,
            fin,
            job.enqueued_ms,
        )
        self._acks.add(s.keys, (job.entry_id, job.id, wait, summary))

    async def _handle_failure(self, s: _Stream, job: Job, exc: Exception) -> None:
        error = f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]
        backend = self.transient(exc)
        attempt = job.attempt
        if backend is not None:
            # A backend outage is nobody's fault: retried (one log line per outage) without
            # spending a delivery, so a long outage never dead-letters healthy runs. The
            # attempt stays >= 1 so the redelivery is not a first one (it resumes from the
            # checkpoints). Capped in wall time from the first such failure (kept in the
            # stored error): a job misjudged as "backend down" still reaches the dead letters.
            found = _TRANSIENT.match(job.last_error or "")
            since = int(found[1]) if found else now_ms()
            error = f"[backend down since {since}] {error}"[:MAX_ERROR_CHARS]
            if now_ms() - since > self.config.transient_retry_max_s * 1000:
                backend = None
        if backend is not None:
            outage = self._run_outages.get(backend)
            if outage is None:
                outage = self._run_outages[backend] = Outage(backend, "run")
            delay_s = min(max(0.5, outage.failed(exc)), self.config.backoff_cap_s)
            attempt = max(1, job.attempt - 1)
        else:
            log.warning(
                "queue.job_failed", queue=job.queue, job_id=job.id, attempt=attempt, error=error
            )
            if job.attempt >= self.config.max_deliveries:
                await self._dead_letter(s, job, error)
                return
            delay_s = self.config.backoff_s(job.attempt)
        due = now_ms() + int(delay_s * 1000)
        sk = s.keys
        self._next_due.clear()  # promote on the next housekeeping round, not after a poll
        try:
            await RETRY(
                self.redis,
                [sk.stream, sk.index, sk.count, sk.delayed, sk.delayed_payload, sk.delayed_meta],
                [k.GROUP, job.entry_id, job.id, due, job.raw, attempt, job.enqueued_ms, error],
            )
        except REDIS_FAILURES as rexc:
            _reraise_if_cancelling(rexc)
            # Still pending: the visibility timeout brings it back, so nothing is lost.
            self._outages["retry"].failed(rexc)
        else:
            self._outages["retry"].ok()

    async def _dead_letter(self, s: _Stream, job: Job, error: str) -> None:
        try:
            if self.on_dead is not None:
                try:
                    await self.on_dead(job, error)
                except Exception as exc:
                    _reraise_if_cancelling(exc)
                    # Dead-lettered all the same: an entry nobody can handle must not stay
                    # pending forever. The engine's reconciler ends a live run whose job sits
                    # in the dead letters, so nothing is left RUNNING either.
                    log.exception("queue.on_dead_failed", job_id=job.id)
            sk = s.keys
            try:
                did = await DEAD(
                    self.redis,
                    [sk.stream, sk.index, sk.count, sk.dead],
                    [k.GROUP, job.entry_id, job.id, job.raw, job.attempt, job.enqueued_ms, error],
                )
            except REDIS_FAILURES as exc:
                _reraise_if_cancelling(exc)
                # Still pending: redelivered past max_deliveries, it comes back here.
                self._outages["dead"].failed(exc)
                return
            self._outages["dead"].ok()
            if did is not None:
                self.dead_lettered += 1
                log.error(
                    "queue.dead_lettered",
                    queue=job.queue,
                    job_id=job.id,
                    attempts=job.attempt,
                    error=error,
                )
        finally:
            s.inflight.pop(job.entry_id, None)

    # ------------------------------------------------------------------ heartbeat, reclaim
    async def _heartbeat(self) -> None:
        while True:
            _reraise_if_cancelling()
            await asyncio.sleep(self.config.heartbeat_s)
            await self._beat_once()

    async def _beat_once(self) -> None:
        """Renew the name lease and touch every held entry; mark the ones taken over as lost
        (their handlers are fenced) and confirm the others' ownership."""
        if self._leased is not None:
            await self._renew_name()
        for s in self._streams:
            ids = list(s.inflight)
            for i in range(0, len(ids), 500):
                chunk = ids[i : i + 500]
                # Taken before the call: Redis resets the entries' idle time after it.
                started = time.monotonic()
                try:
                    lost = await TOUCH(self.redis, [s.keys.stream], [k.GROUP, self._name_b, *chunk])
                except REDIS_FAILURES as exc:
                    _reraise_if_cancelling(exc)
                    self._outages["touch"].failed(exc)
                    self._redis_failed()
                    break
                self._outages["touch"].ok()
                self._redis_ok()
                gone = {x.decode() for x in lost}
                for eid in chunk:
                    job = s.inflight.get(eid)
                    if job is None:
                        continue  # acknowledged while the touch was in flight: not lost
                    if eid in gone:
                        job.lost = True
                    else:
                        job.confirmed = max(job.confirmed, started)
                # Entries acknowledged while the touch was in flight are not lost.
                lost = [x for x in lost if x.decode() in s.inflight]
                if lost:
                    log.warning(
                        "queue.entries_lost",
                        stream=s.keys.stream.decode(),
                        entries=[x.decode() for x in lost],
                    )
        beat, self._beat = self._beat, asyncio.Event()
        beat.set()

    async def _renew_name(self) -> None:
        """Extend the name lease; if it lapsed (Redis was away past the visibility timeout),
        take it again at once so no other process can start under this name and claim its
        entries as its own."""
        assert self._leased is not None
        ttl = self.config.visibility_timeout_ms
        try:
            kept = await RENEW_LEASE(self.redis, [self._leased], [self._lease_token, ttl])
            if not kept:
                kept = await self.redis.set(self._leased, self._lease_token, nx=True, px=ttl)
                if kept:
                    log.warning("queue.name_lease_retaken", consumer=self.name)
        except REDIS_FAILURES as exc:
            _reraise_if_cancelling(exc)
            return  # counted by the touch, which fails the same way
        if not kept:
            # Another process holds the name now; the touch reports what it took.
            log.error("queue.name_lease_lost", consumer=self.name)

    def _redis_ok(self) -> None:
        if self._healthy_since is None:
            self._healthy_since = time.monotonic()

    def _redis_failed(self) -> None:
        self._healthy_since = None
        self._saw_outage = True

    def _may_take_over(self) -> bool:
        """Whether other consumers' idle times mean anything yet (see
        :attr:`QueueConfig.takeover_guard_s`): not while this process has not reached Redis
        continuously for the guard, as after an outage every live consumer looks silent."""
        since = self._healthy_since
        if since is None:
            return False
        # A process that never saw Redis fail has nothing to wait for: the idle times it reads
        # are real (so a worker started just before another is killed takes over in time).
        return not self._saw_outage or time.monotonic() - since >= self._guard_s

    async def _ensure_owned(self, job: Job) -> None:
        """The fence behind :meth:`Job.ensure_owned`."""
        margin = self.config.ownership_margin_s
        while True:
            if job.lost:
                raise _EntryLost(job.entry_id)
            if time.monotonic() - job.confirmed < margin:
                return
            # Not confirmed lately (Redis unreachable): wait for a heartbeat that says.
            beat = self._beat
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(beat.wait(), self.config.heartbeat_s)

    async def _claim(self, s: _Stream, *, min_idle_ms: int, count: int, owner: str = "") -> int:
        claimed, lost = await CLAIM(
            self.redis,
            [s.keys.stream, s.keys.count],
            [k.GROUP, self._name_b, min_idle_ms, count, owner],
        )
        if lost:
            log.warning(
                "queue.pending_entries_vanished",
                stream=s.keys.stream.decode(),
                entries=[x.decode() for x in lost],
            )
        if claimed:
            log.info(
                "queue.reclaimed",
                stream=s.keys.stream.decode(),
                count=len(claimed),
                own=bool(owner),
            )
            self._accept((s, eid, fields, int(n)) for eid, fields, n in claimed)
        return len(claimed)

    async def _take_over(self) -> int:
        """Claim the entries of consumers silent for the visibility timeout (killed, hung or
        cut off): found from the group's consumer list, so no scan of the pending list."""
        taken = 0
        idle_ms = self.config.visibility_timeout_ms
        if not self._may_take_over():
            return 0
        for s in self._streams:
            if s.queue in self._paused:
                continue
            try:
                consumers = await self.redis.xinfo_consumers(s.keys.stream, k.GROUP)
            except ResponseError:  # no such stream or group yet
                continue
            for c in consumers:
                name = c["name"]
                name_b = name if isinstance(name, bytes) else str(name).encode()
                if name_b == self._name_b or int(c["pending"]) == 0 or int(c["idle"]) < idle_ms:
                    continue
                # All of them at once, even when every slot is busy: a dead worker's runs must
                # not trickle over a few per round (takeover time would grow with what it
                # held) nor wait behind a backlog. Buffered entries are heartbeated, so nothing
                # taken here can be stolen back. One claim call is bounded all the same.
                held = min(int(c["pending"]), MAX_TAKEOVER_BATCH)
                count = max(self.concurrency - self.busy, held)
                got = await self._claim(s, min_idle_ms=idle_ms, count=count, owner=name_b.decode())
                if got:
                    log.warning("queue.took_over", consumer=name_b.decode(), entries=got)
                taken += got
        return taken

    async def _reclaim(self) -> None:
        if not self._may_take_over():
            return
        for s in self._streams:
            # Even with every slot busy take a few: a dead worker's entries must not wait
            # behind a backlog that new fetches keep refilling (buffered entries are
            # heartbeated, so nothing taken here can be stolen back).
            free = max(self.concurrency - self.busy, min(4, self.concurrency))
            if s.queue in self._paused:
                continue
            await self._claim(s, min_idle_ms=self.config.visibility_timeout_ms, count=free)

    # ------------------------------------------------------------------ housekeeping
    async def _refresh_paused(self) -> None:
        prefix = self.config.key_prefix
        flags = [await self.redis.exists(k.paused(q, prefix)) for q in self._queues]
        self._paused = frozenset(q for q, f in zip(self._queues, flags, strict=True) if f)

    async def _housekeep_once(self, *, reclaim: bool) -> None:
        await self._refresh_paused()
        for i, s in enumerate(self._streams):
            if self._next_due.get(i, 0) <= time.time() * 1000:
                _, nxt = await maintenance.promote(self.redis, s.keys, self.config)
                self._next_due[i] = nxt if nxt is not None else float("inf")
        if reclaim:
            await self._reclaim()

    async def _maintenance_loop(self) -> None:
        cfg = self.config
        tick = min(cfg.delayed_poll_s, cfg.pause_poll_s)
        last = {"reclaim": 0.0, "trim": 0.0, "expire": 0.0, "promote": 0.0, "takeover": 0.0}
        outage = self._outages["housekeeping"]
        wait = tick
        while True:
            _reraise_if_cancelling()
            await asyncio.sleep(wait)
            wait = tick
            now = time.monotonic()
            try:
                if now - last["promote"] >= cfg.delayed_poll_s:
                    last["promote"] = now
                    # Poll on a timer too: another process may add earlier delayed jobs.
                    self._next_due.clear()
                do_reclaim = now - last["reclaim"] >= cfg.reclaim_every_s
                if do_reclaim:
                    last["reclaim"] = now
                await self._housekeep_once(reclaim=do_reclaim)
                if now - last["takeover"] >= cfg.takeover_every_s:
                    last["takeover"] = now
                    await self._take_over()
                if now - last["trim"] >= cfg.trim_interval_s:
                    last["trim"] = now
                    for s in self._streams:
                        await maintenance.trim(self.redis, s.keys)
                if now - last["expire"] >= cfg.retention_interval_s:
                    last["expire"] = now
                    for s in self._streams:
                        await maintenance.expire_dead(self.redis, s.keys, cfg)
                        await maintenance.forget_idle_consumers(
                            self.redis, s.keys, FORGET_CONSUMER_MS
                        )
                outage.ok()
                self._redis_ok()
            except Exception as exc:
                # Housekeeping must outlive any one bad round (a bug here would otherwise stop
                # promotion and reclaim for the life of the process).
                _reraise_if_cancelling(exc)
                if is_unavailable(exc):
                    self._redis_failed()
                elif not outage.down:
                    log.exception("queue.maintenance_failed")
                wait = max(tick, outage.failed(exc))

    async def _drained(self, wait_delayed_s: float, wait_pending: bool) -> bool:
        if self.busy or self._tasks:
            return False
        if self._acks.busy:
            await self._acks.flush_until_done(deadline_s=5.0)
            return False
        horizon = now_ms() + int(wait_delayed_s * 1000)
        for s in self._streams:
            first = await self.redis.zrange(s.keys.delayed, 0, 0, withscores=True)
            due = float(first[0][1]) if first else None
            if due is not None and wait_delayed_s > 0 and due <= horizon:
                self._next_due.clear()
                await self._sleep(min(0.02, max(0.0, (due - now_ms()) / 1000)))
                return False
            if due is not None and due <= now_ms():
                self._next_due.clear()
                return False
            if wait_pending and int((await self.redis.xpending(s.keys.stream, k.GROUP))["pending"]):
                await self._sleep(0.02)
                return False
        return True
