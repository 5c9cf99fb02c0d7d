"""The schedule trigger: one leader across all worker processes fires every flow's cron ticks.

Every worker process runs a :class:`Scheduler`. One of them holds a Redis lease (``SET NX PX``
with its owner id, extended on every pass by a compare-and-extend script) and leads; the others
poll and take over when the leader closes (it deletes its lease) or dies (the lease expires).
The leader reads the enabled schedule flows from PostgreSQL every ``refresh_s`` seconds — so a
new, changed or disabled flow takes effect within that — and at each tick commits a run
(trigger method ``SCHEDULE``) and enqueues it on the ``runs`` queue, exactly as a manual run.

**Once per tick.** A lease cannot promise a single leader: a process paused past its lease,
clock skew between hosts, or a firing slower than the lease all leave two processes believing
they lead for a moment. So every tick is deduplicated where it lands: the run row carries the
idempotency key :func:`~conveyor.engine.schedule.tick_id` under the unique ``(flow_id,
idempotency_key)`` index, and its job the same string as dedup key. A second leader firing the
same tick gets the first run back from PostgreSQL and enqueues nothing.

**Missed ticks fire at most once — the latest.** When no leader ran (every worker down, a
long failover) or one pass took longer than the cron interval, the leader fires only the most
recent missed tick when it catches up, then carries on with the schedule. A schedule means
"keep this current": replaying an outage's worth of per-minute jobs would flood the queue
with stale work at the moment the system is recovering (a Kubernetes CronJob likewise starts
only the most recent missed schedule). A new leader learns each flow's last fired tick from
those idempotency keys, so a handover neither fires a tick again nor replays older ones; a
flow counts ticks from when it was last saved or enabled, so enabling it never replays the
time it was off.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
import zoneinfo
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from croniter import croniter
from redis.exceptions import RedisError

from conveyor.backoff import Outage
from conveyor.engine.flow import Trigger
from conveyor.engine.schedule import next_fire, tick_id
from conveyor.engine.submit import OnFull, Submitter
from conveyor.ids import uuid7
from conveyor.queue import Producer
from conveyor.queue import keys as k
from conveyor.queue.errors import REDIS_FAILURES
from conveyor.queue.scripts import DROP_LEASE, RENEW_LEASE
from conveyor.store import flows as flow_store
from conveyor.store.db import Database
from conveyor.store.runs import NewRun, RunWriter

log = structlog.get_logger(__name__)

Clock = Callable[[], datetime]

_TICK_FORMAT = "%Y%m%dT%H%M%SZ"


def _utc_now() -> datetime:
    return datetime.now(UTC)


def latest_tick(trigger: Trigger, now: datetime) -> datetime:
    """The last tick at or before ``now`` (UTC), in the trigger's time zone."""
    if trigger.cron is None:
        raise ValueError("not a schedule trigger")
    zone = zoneinfo.ZoneInfo(trigger.timezone or "UTC")
    # get_prev is strict: nudge past ``now`` so a tick exactly at ``now`` counts.
    it = croniter(trigger.cron, (now + timedelta(microseconds=1)).astimezone(zone))
    prev: datetime = it.get_prev(datetime)
    return prev.astimezone(UTC)


def scheduled_trigger(trigger: Trigger, tick: datetime) -> dict[str, Any]:
    """The ``trigger`` payload of a run fired by the schedule at ``tick``."""
    return {
        "method": "SCHEDULE",
        "headers": {},
        "query": {},
        "body": {
            "scheduled_at": tick.astimezone(UTC).isoformat(),
            "cron": trigger.cron,
            "timezone": trigger.timezone or "UTC",
        },
    }


def _tick_of_key(key: str) -> datetime | None:
    """The tick encoded in a ``schedule:<flow>:<tick>`` idempotency key."""
    try:
        return datetime.strptime(key.rsplit(":", 1)[1], _TICK_FORMAT).replace(tzinfo=UTC)
    except (IndexError, ValueError):
        return None


@dataclass(slots=True)
class _Entry:
    """One schedule flow as the leader tracks it: ``last`` is the last tick fired (or the
    moment ticks count from) and ``next`` the first tick after it."""

    trigger: Trigger
    version: int
    last: datetime
    next: datetime


class Scheduler:
    """Fires the ticks of every enabled schedule flow, from whichever process holds the lease.

    Parameters: ``db`` (flows are listed from the primary), ``writer`` (run rows, group
    commit), ``producer`` and ``redis`` (the ``runs`` queue and the lease);
    ``trigger_timeout_s`` bounds one firing (AP_TRIGGER_TIMEOUT_SECONDS, default 60);
    ``lease_ms`` how long a silent leader keeps the lease (default 15 000); ``poll_s``
    seconds between a follower's attempts to take it (default 1); ``refresh_s`` seconds
    between reads of the flow list (default 2); ``lease_key`` and ``owner`` (default: the
    shared key, a unique id per instance); ``clock`` returns the aware current time (tests
    inject one and drive :meth:`run_once` themselves).
    """

    def __init__(
        self,
        db: Database,
        writer: RunWriter,
        producer: Producer,
        redis: Any,
        *,
        trigger_timeout_s: float = 60.0,
        lease_ms: int = 15_000,
        poll_s: float = 1.0,
        refresh_s: float = 2.0,
        lease_key: bytes | None = None,
        owner: str | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.db = db
        self.writer = writer
        self.producer = producer
        self.submitter = Submitter(writer, producer)
        self.redis = redis
        self.trigger_timeout_s = trigger_timeout_s
        self.lease_ms = lease_ms
        self.poll_s = poll_s
        self._outage = Outage("redis", "schedule_lease")
        self._refresh_outage = Outage("postgres", "schedule_refresh")
        self.refresh_s = refresh_s
        self.lease_key = lease_key or k.scheduler_lease()
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.clock: Clock = clock or _utc_now
        self._leader = False
        self._entries: dict[uuid.UUID, _Entry] = {}
        self._refreshed_at: float | None = None
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        #: Runs this instance created (a tick another leader fired first is not counted).
        self.fired = 0

    @property
    def is_leader(self) -> bool:
        """Whether this instance held the lease at its last pass."""
        return self._leader

    # ------------------------------------------------------------------------ lease
    async def _claim(self) -> bool | None:
        """Extend or take the lease; ``None`` when Redis could not be asked."""
        try:
            if self._leader:
                if await RENEW_LEASE(self.redis, [self.lease_key], [self.owner, self.lease_ms]):
                    return True
                log.warning("scheduler lease lost", owner=self.owner)
                self._step_down()
            taken = await self.redis.set(self.lease_key, self.owner, nx=True, px=self.lease_ms)
        except REDIS_FAILURES as exc:
            self._outage.failed(exc)  # logged once per outage, retried every poll_s
            return None
        self._outage.ok()
        if taken:
            self._leader = True
            log.info("scheduler leading", owner=self.owner)
        return bool(taken)

    def _step_down(self) -> None:
        # A later leadership re-reads every flow's last tick from PostgreSQL: another leader
        # may have fired ticks meanwhile.
        self._leader = False
        self._entries.clear()
        self._refreshed_at = None

    async def _release(self) -> None:
        if not self._leader:
            return
        self._step_down()
        with contextlib.suppress(RedisError, OSError):
            await DROP_LEASE(self.redis, [self.lease_key], [self.owner])

    # ------------------------------------------------------------------------ flows
    async def _refresh(self) -> None:
        flows = await flow_store.list_schedule_flows(self.db)
        self._refreshed_at = time.monotonic()
        now = self.clock()
        triggers: dict[uuid.UUID, Trigger] = {}
        for f in flows:
            doc = f.trigger
            cron = doc.get("cron")
            if isinstance(cron, str):
                triggers[f.id] = Trigger(
                    type="schedule", cron=cron, timezone=doc.get("timezone") or "UTC"
                )
        fresh = [
            fid
            for fid, trig in triggers.items()
            if fid not in self._entries or self._entries[fid].trigger != trig
        ]
        last_keys = await flow_store.last_schedule_keys(self.db, fresh)
        entries: dict[uuid.UUID, _Entry] = {}
        for f in flows:
            trig = triggers.get(f.id)
            if trig is None:
                continue
            entry = self._entries.get(f.id)
            if entry is not None and entry.trigger == trig:
                entry.version = f.version
                entries[f.id] = entry
                continue
            anchor = f.updated_at
            last = _tick_of_key(last_keys[f.id]) if f.id in last_keys else None
            if last is not None and last > anchor:
                # Never from the future: a key claimed for a far tick must not silence the
                # flow until then (a tick a skewed leader fired early is still deduplicated).
                anchor = min(last, max(now, anchor))
            try:
                nxt = next_fire(trig, anchor)
            except (ValueError, KeyError, zoneinfo.ZoneInfoNotFoundError) as exc:
                log.error("schedule flow skipped", flow_id=str(f.id), error=str(exc))
                continue
            entries[f.id] = _Entry(trig, f.version, anchor, nxt)
        self._entries = entries

    # ------------------------------------------------------------------------ firing
    async def fire(
        self, flow_id: uuid.UUID, version: int, trigger: Trigger, tick: datetime
    ) -> uuid.UUID | None:
        """Fire one tick: commit its run, then enqueue it. Returns the new run's id, or
        ``None`` when the tick had already been fired (by this or another leader).

        Raises ``TimeoutError`` after ``trigger_timeout_s``; firing again is safe.
        """
        key = tick_id(str(flow_id), tick)
        payload = scheduled_trigger(trigger, tick)
        run_id = uuid7()
        async with asyncio.timeout(self.trigger_timeout_s):
            # DEFER on a full backlog: nobody is there to retry a tick, the reconciler does.
            sub = await self.submitter.submit(
                NewRun(run_id, flow_id, version, payload, idempotency_key=key),
                on_full=OnFull.DEFER,
                dedup_key=key,
            )
            if not sub.created:
                # Fired already: its leader enqueued it, or the reconciler will.
                return None
            if not sub.enqueued:
                reason = str(sub.outage) if sub.outage else "backlog full"
                log.warning("scheduled run not enqueued yet", run_id=str(run_id), error=reason)
        self.fired += 1
        log.info("schedule fired", flow_id=str(flow_id), run_id=str(run_id), tick=key)
        return run_id

    async def _fire_entry(self, flow_id: uuid.UUID, entry: _Entry, tick: datetime) -> bool:
        if tick > entry.next:
            log.info(
                "missed schedule ticks skipped",
                flow_id=str(flow_id),
                first_missed=entry.next.isoformat(),
                firing=tick.isoformat(),
            )
        try:
            await self.fire(flow_id, entry.version, entry.trigger, tick)
        except Exception as exc:
            # Kept due: the next pass fires it (or a later tick, if one has come meanwhile).
            log.warning("schedule firing failed", flow_id=str(flow_id), error=repr(exc))
            return False
        entry.last = tick
        entry.next = next_fire(entry.trigger, tick)
        return True

    async def run_once(self) -> float:
        """One pass: hold the lease, refresh the flows when due, fire every due tick.

        Returns how many seconds the caller may sleep before the next pass.
        """
        claimed = await self._claim()
        if not claimed:
            return self.poll_s
        ok = True
        if self._refreshed_at is None or time.monotonic() - self._refreshed_at >= self.refresh_s:
            try:
                async with asyncio.timeout(self.trigger_timeout_s):
                    await self._refresh()
            except Exception as exc:
                # Fire from the flows already known; read them again after refresh_s.
                self._refresh_outage.failed(exc)  # one line per outage
                self._refreshed_at = time.monotonic()
                ok = False
            else:
                self._refresh_outage.ok()
        now = self.clock()
        due = []
        for fid, entry in self._entries.items():
            if entry.next <= now:
                due.append((fid, entry, max(entry.next, latest_tick(entry.trigger, now))))
        # Concurrently, so ticks due together share one multi-row insert and one XADD batch.
        results = await asyncio.gather(*(self._fire_entry(f, e, t) for f, e, t in due))
        wait = min(self.refresh_s, self.lease_ms / 3000)
        if self._entries:
            soonest = min(e.next for e in self._entries.values())
            wait = min(wait, (soonest - self.clock()).total_seconds())
        if not ok or not all(results):
            wait = max(wait, 1.0)
        return max(wait, 0.001)

    # ------------------------------------------------------------------------ lifecycle
    async def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                wait = await self.run_once()
            except Exception:
                log.exception("scheduler pass failed")
                wait = self.poll_s
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), wait)

    async def start(self) -> None:
        """Start the background loop (every worker process runs one)."""
        self._stop.clear()
        self._task = asyncio.create_task(self._loop(), name="conveyor-scheduler")

    async def close(self, timeout_s: float = 5.0) -> None:
        """Stop within ``timeout_s`` (a firing in progress is cancelled after it), then hand
        the lease over by deleting it, so a follower leads from its next poll."""
        self._stop.set()
        if self._task is not None:
            task, self._task = self._task, None
            done, _ = await asyncio.wait({task}, timeout=timeout_s)
            if not done:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await asyncio.shield(self._release())

    async def __aenter__(self) -> Scheduler:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
