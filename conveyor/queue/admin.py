"""Queue administration: find, list, retry, delete and clean jobs; pause and resume queues.

These are the read and write functions behind ``/api/v1/queues…``, the board and the CLI, and
the reconciler's question "does the queue still hold this run?" (:meth:`QueueAdmin.locate`).
Listings page with opaque cursors (``<shard>:<position>``) so a page never rescans the ones
before it; every state change is one atomic script on one shard.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from conveyor.queue import keys as k
from conveyor.queue import stats as st
from conveyor.queue.config import QueueConfig
from conveyor.queue.errors import JobNotFound, unavailable_as_typed
from conveyor.queue.job import (
    F_ATTEMPTS,
    F_ERROR,
    F_FIRST,
    F_ID,
    F_PAYLOAD,
    JobInfo,
    JobState,
    Location,
    entry_ms,
    fields_dict,
    now_ms,
    safe_json,
)
from conveyor.queue.scripts import (
    CLEAN_COMPLETED,
    CLEAN_DEAD,
    CLEAN_DELAYED,
    CLEAN_WAITING,
    DELETE,
    LOCATE,
    RETRY_DEAD,
)

#: Payloads larger than this are shown as a size, not inlined into listings.
MAX_LISTED_PAYLOAD = 64 * 1024
_LOCATIONS = {b"d": Location.DELAYED, b"s": Location.STREAM, b"x": Location.DEAD}


def _payload(raw: bytes | None) -> Any:
    if raw is None:
        return None
    if len(raw) > MAX_LISTED_PAYLOAD:
        return f"<{len(raw)} bytes>"
    return safe_json(raw)


def _text(raw: bytes | None) -> str | None:
    return raw.decode(errors="replace") if raw is not None else None


class QueueAdmin:
    """Admin and stats operations over every shard of a queue.

    :param redis: ``redis.asyncio.Redis`` client (``decode_responses=False``); not closed here.
    :param config: queue configuration (shard count, retention, backlog cap).
    """

    def __init__(self, redis: Redis, config: QueueConfig | None = None) -> None:
        self.redis = redis
        self.config = config or QueueConfig()

    def _shards(self, queue: str) -> list[k.ShardKeys]:
        if queue not in k.QueueName.__members__.values():
            raise ValueError(f"unknown queue {queue!r}: expected one of {list(k.QueueName)}")
        return self.config.shard_keys(queue)

    # ------------------------------------------------------------------ lookups
    async def locate(self, queue: str, job_ids: Sequence[str]) -> dict[str, Location | None]:
        """Where each job id is: stream (waiting or active), delayed, dead, or ``None``.

        The reconciler re-enqueues ``QUEUED``/``RUNNING`` runs whose id maps to ``None``.
        """
        out: dict[str, Location | None] = dict.fromkeys(job_ids)
        missing = list(job_ids)
        async with unavailable_as_typed():
            # A job lives on the shard of its dedup key or of its id; look in every shard.
            for sk in self._shards(queue):
                if not missing:
                    break
                for i in range(0, len(missing), 1000):
                    chunk = missing[i : i + 1000]
                    reply = await LOCATE(
                        self.redis, [sk.stream, sk.index, sk.count, sk.delayed], [k.GROUP, *chunk]
                    )
                    for job_id, loc in zip(chunk, reply, strict=True):
                        if loc:
                            out[job_id] = _LOCATIONS[loc[:1]]
                missing = [j for j in missing if out[j] is None]
        return out

    async def contains(self, queue: str, job_id: str) -> bool:
        """True while the queue owns ``job_id`` (waiting, active or delayed; not dead)."""
        loc = (await self.locate(queue, [job_id]))[job_id]
        return loc in (Location.STREAM, Location.DELAYED)

    # ------------------------------------------------------------------ listing
    async def list_jobs(
        self, queue: str, state: JobState | str, *, limit: int = 50, cursor: str | None = None
    ) -> tuple[list[JobInfo], str | None]:
        """One page of jobs in ``state`` and the cursor of the next page (``None`` at the end).

        Order: waiting, active and delayed oldest (or soonest) first; failed and completed
        newest first.
        """
        state = JobState(state)
        limit = max(1, min(limit, 1000))
        shards = self._shards(queue)
        start_shard, pos = 0, None
        if cursor:
            shard_text, _, pos = cursor.partition(":")
            start_shard = int(shard_text)
        out: list[JobInfo] = []
        async with unavailable_as_typed():
            for shard in range(start_shard, len(shards)):
                want = limit - len(out)
                page, last = await self._list_shard(shards[shard], state, want, pos or None)
                out += page
                if len(page) >= want and last is not None:
                    return out, f"{shard}:{last}"
                pos = None
        return out, None

    async def _list_shard(
        self, sk: k.ShardKeys, state: JobState, want: int, pos: str | None
    ) -> tuple[list[JobInfo], str | None]:
        if state is JobState.WAITING:
            return await self._list_waiting(sk, want, pos)
        if state is JobState.ACTIVE:
            return await self._list_active(sk, want, pos)
        if state is JobState.DELAYED:
            return await self._list_delayed(sk, want, int(pos or 0))
        if state is JobState.FAILED:
            return await self._list_failed(sk, want, pos)
        return await self._list_completed(sk, want, int(pos or 0))

    def _from_entry(
        self, sk: k.ShardKeys, state: JobState, entry_id: bytes, fields: Any
    ) -> JobInfo:
        f = fields_dict(fields)
        eid = entry_id.decode()
        first = f.get(F_FIRST)
        attempts = f.get(F_ATTEMPTS)
        return JobInfo(
            id=_text(f.get(F_ID)) or eid,
            queue=sk.queue,
            state=state,
            enqueued_at_ms=int(first) if first else entry_ms(eid),
            attempts=int(attempts) if attempts else 0,
            error=_text(f.get(F_ERROR)),
            payload=_payload(f.get(F_PAYLOAD)),
            entry_id=eid,
            shard=sk.shard,
        )

    async def _last_delivered(self, sk: k.ShardKeys) -> str:
        try:
            groups: Any = await self.redis.xinfo_groups(sk.stream)
        except ResponseError:  # no stream yet
            return "0-0"
        for g in groups:
            if g["name"] == k.GROUP:
                return str(_text(g["last-delivered-id"]))
        return "0-0"

    async def _list_waiting(
        self, sk: k.ShardKeys, want: int, pos: str | None
    ) -> tuple[list[JobInfo], str | None]:
        if pos is None:
            last = await self._last_delivered(sk)
            start = "-" if last == "0-0" else f"({last}"
        else:
            start = f"({pos}"
        entries: Any = await self.redis.xrange(sk.stream, start, "+", count=want)
        jobs = [self._from_entry(sk, JobState.WAITING, eid, f) for eid, f in entries]
        return jobs, jobs[-1].entry_id if jobs else None

    async def _list_active(
        self, sk: k.ShardKeys, want: int, pos: str | None
    ) -> tuple[list[JobInfo], str | None]:
        try:
            pending: Any = await self.redis.xpending_range(
                sk.stream, k.GROUP, min=f"({pos}" if pos else "-", max="+", count=want
            )
        except ResponseError:  # no stream or group yet
            return [], None
        jobs: list[JobInfo] = []
        for p in pending:
            eid = p["message_id"]
            entries: Any = await self.redis.xrange(sk.stream, eid, eid)
            if entries:
                job = self._from_entry(sk, JobState.ACTIVE, entries[0][0], entries[0][1])
            else:
                job = JobInfo(
                    id=eid.decode(), queue=sk.queue, state=JobState.ACTIVE,
                    enqueued_at_ms=entry_ms(eid), entry_id=eid.decode(), shard=sk.shard,
                )  # fmt: skip
            job.consumer = _text(p["consumer"])
            job.idle_ms = int(p["time_since_delivered"])
            job.attempts += int(p["times_delivered"])
            jobs.append(job)
        last = pending[-1]["message_id"].decode() if pending else None
        return jobs, last

    async def _list_delayed(
        self, sk: k.ShardKeys, want: int, offset: int
    ) -> tuple[list[JobInfo], str | None]:
        members: Any = await self.redis.zrange(
            sk.delayed, offset, offset + want - 1, withscores=True
        )
        if not members:
            return [], None
        ids = [m for m, _ in members]
        payloads: Any = await self.redis.hmget(sk.delayed_payload, ids)
        metas: Any = await self.redis.hmget(sk.delayed_meta, ids)
        jobs = []
        for (jid, due), raw, meta in zip(members, payloads, metas, strict=True):
            attempts, first, error = (meta or b"0::").decode(errors="replace").split(":", 2)
            jobs.append(
                JobInfo(
                    id=jid.decode(),
                    queue=sk.queue,
                    state=JobState.DELAYED,
                    enqueued_at_ms=int(first or 0),
                    attempts=int(attempts or 0),
                    error=error or None,
                    payload=_payload(raw),
                    shard=sk.shard,
                    due_at_ms=int(due),
                )
            )
        return jobs, str(offset + len(jobs))

    async def _list_failed(
        self, sk: k.ShardKeys, want: int, pos: str | None
    ) -> tuple[list[JobInfo], str | None]:
        entries: Any = await self.redis.xrevrange(
            sk.dead, f"({pos}" if pos else "+", "-", count=want
        )
        jobs = []
        for eid, fields in entries:
            job = self._from_entry(sk, JobState.FAILED, eid, fields)
            job.finished_at_ms = entry_ms(eid)
            jobs.append(job)
        return jobs, jobs[-1].entry_id if jobs else None

    async def _list_completed(
        self, sk: k.ShardKeys, want: int, offset: int
    ) -> tuple[list[JobInfo], str | None]:
        raw: Any = await self.redis.lrange(sk.completed, offset, offset + want - 1)
        jobs = []
        for item in raw:
            doc = orjson.loads(item)
            jobs.append(
                JobInfo(
                    id=doc["id"],
                    queue=sk.queue,
                    state=JobState.COMPLETED,
                    enqueued_at_ms=int(doc.get("t") or entry_ms(doc["e"])),
                    attempts=int(doc.get("a", 1)),
                    entry_id=doc["e"],
                    shard=sk.shard,
                    finished_at_ms=doc.get("f"),
                    wait_ms=doc.get("w"),
                    run_ms=doc.get("r"),
                )
            )
        return jobs, str(offset + len(jobs)) if jobs else None

    # ------------------------------------------------------------------ changes
    async def retry_dead(self, queue: str, job_id: str) -> str:
        """Put a dead-lettered job back on its queue with a fresh delivery count.

        Returns the new stream entry id; raises :class:`JobNotFound` if it is not dead.
        """
        async with unavailable_as_typed():
            for sk in self._shards(queue):
                eid = await RETRY_DEAD(
                    self.redis,
                    [sk.stream, sk.index, sk.count, sk.dead],
                    [job_id, self.config.stream_maxlen],
                )
                if eid is not None:
                    return str(eid.decode())
        raise JobNotFound(queue, job_id)

    async def delete_job(self, queue: str, job_id: str) -> Location:
        """Remove a waiting, delayed or dead job (an active one is also forgotten: its worker's
        acknowledgement becomes a no-op). Raises :class:`JobNotFound`."""
        async with unavailable_as_typed():
            for sk in self._shards(queue):
                where = await DELETE(
                    self.redis,
                    [
                        sk.stream,
                        sk.index,
                        sk.count,
                        sk.delayed,
                        sk.delayed_payload,
                        sk.delayed_meta,
                        sk.dead,
                    ],
                    [k.GROUP, job_id],
                )
                if where:
                    return Location(where.decode())
        raise JobNotFound(queue, job_id)

    async def clean(
        self, queue: str, state: JobState | str, older_than_s: float, *, limit: int = 10_000
    ) -> int:
        """Delete up to ``limit`` jobs in ``state`` older than ``older_than_s``; returns how many.

        Age is the enqueue time for waiting and delayed jobs, the dead-letter time for failed
        ones, the finish time for completed ones. Active jobs cannot be cleaned (they are some
        worker's work in progress).
        """
        state = JobState(state)
        if state is JobState.ACTIVE:
            raise ValueError("active jobs cannot be cleaned; delete them one by one")
        cutoff = now_ms() - int(older_than_s * 1000)
        removed = 0
        async with unavailable_as_typed():
            for sk in self._shards(queue):
                left = limit - removed
                if left <= 0:
                    break
                if state is JobState.WAITING:
                    n = await CLEAN_WAITING(
                        self.redis, [sk.stream, sk.index, sk.count], [k.GROUP, cutoff, left]
                    )
                elif state is JobState.DELAYED:
                    n = await CLEAN_DELAYED(
                        self.redis,
                        [sk.delayed, sk.delayed_payload, sk.delayed_meta, sk.index],
                        [cutoff, left],
                    )
                elif state is JobState.FAILED:
                    n = await CLEAN_DEAD(self.redis, [sk.dead, sk.index], [cutoff, left])
                else:
                    n = await CLEAN_COMPLETED(self.redis, [sk.completed], [cutoff])
                removed += int(n)
        return removed

    async def pause(self, queue: str) -> None:
        """Stop deliveries of ``queue`` on every worker (within ``pause_poll_s``)."""
        self._shards(queue)
        async with unavailable_as_typed():
            await self.redis.set(k.paused(queue, self.config.key_prefix), b"1")

    async def resume(self, queue: str) -> None:
        """Undo :meth:`pause`."""
        self._shards(queue)
        async with unavailable_as_typed():
            await self.redis.delete(k.paused(queue, self.config.key_prefix))

    async def is_paused(self, queue: str) -> bool:
        self._shards(queue)
        async with unavailable_as_typed():
            return bool(await self.redis.exists(k.paused(queue, self.config.key_prefix)))

    # ------------------------------------------------------------------ stats
    async def stats(self, queue: str) -> st.QueueStats:
        """Depth, wait and throughput of ``queue`` (a :class:`~conveyor.queue.QueueStats`)."""
        self._shards(queue)
        return await st.queue_stats(self.redis, self.config, queue)

    async def all_stats(self) -> list[st.QueueStats]:
        """:meth:`stats` of every queue, ``sync`` first."""
        return await st.all_stats(self.redis, self.config)

    async def history(self, queue: str) -> list[dict[str, Any]]:
        """The board's 10-second samples of ``queue``, oldest first."""
        self._shards(queue)
        return await st.history(self.redis, queue, self.config.key_prefix)
