"""What a handler receives, what admin calls return, and how both map to stream entries.

A job lives as one stream entry whose fields carry everything (job id, JSON payload, earlier
deliveries, last error), so delivering it costs no extra read. Stream ids start with the
millisecond the entry was added, which is where wait times come from.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import Any

import orjson

from conveyor.queue.errors import QueueError

#: Stream entry field names (one byte each: they are repeated in every entry).
F_ID = b"i"
F_PAYLOAD = b"p"
F_ATTEMPTS = b"a"
F_ERROR = b"e"
F_FIRST = b"t"


class JobState(StrEnum):
    """States the admin API lists (BullMQ's names; ``failed`` means dead-lettered)."""

    WAITING = "waiting"
    ACTIVE = "active"
    DELAYED = "delayed"
    FAILED = "failed"
    COMPLETED = "completed"


class Location(StrEnum):
    """Where :meth:`QueueAdmin.locate` found a job id."""

    STREAM = "stream"  # waiting or being worked on (in the group's PEL)
    DELAYED = "delayed"
    DEAD = "dead"


#: Locations meaning "the queue still owns this job": the reconciler leaves such runs alone.
LIVE = frozenset({Location.STREAM, Location.DELAYED})


class UndecodablePayload(QueueError, ValueError):
    """A stream entry whose payload is not JSON (or whose fields are mangled).

    ``job`` carries whatever could be read, so the entry can still be dead-lettered by id.
    """

    def __init__(self, reason: str, job: Job) -> None:
        super().__init__(reason)
        self.reason = reason
        self.job = job


@dataclasses.dataclass(slots=True)
class Job:
    """One delivery of a job to a handler.

    :param id: the job id given at enqueue (the run id).
    :param queue: queue name (``runs`` or ``sync``).
    :param payload: the decoded JSON payload.
    :param attempt: 1-based delivery number, counting redeliveries after errors and crashes.
    :param entry_id: the stream entry id (``<ms>-<seq>``) of this delivery.
    :param shard: the queue shard the entry lives on.
    :param enqueued_ms: when the job was first enqueued (epoch ms).
    :param last_error: the error that caused the previous delivery to fail, if any.
    :param raw: the payload bytes as stored.
    :param entry_ms: millisecond timestamp of this delivery's stream entry.
    """

    id: str
    queue: str
    payload: Any
    attempt: int
    entry_id: str
    shard: int
    enqueued_ms: int
    last_error: str | None = None
    raw: bytes = b""
    entry_ms: int = 0
    #: Set by the consumer's heartbeat when another consumer took this delivery over (this
    #: process was cut off from Redis past the visibility timeout): the run is fenced.
    lost: bool = dataclasses.field(default=False, compare=False, repr=False)
    #: Monotonic time from which the consumer knows this delivery was still its own.
    confirmed: float = dataclasses.field(default=0.0, compare=False, repr=False)
    #: The consumer's ownership check (see :meth:`ensure_owned`); ``None`` outside a consumer.
    fence: Callable[[Job], Awaitable[None]] | None = dataclasses.field(
        default=None, compare=False, repr=False
    )

    async def ensure_owned(self) -> None:
        """Return while this delivery is surely still this process's; raise if another
        consumer took it over. Handlers call it before each durable write (a checkpoint): while
        the consumer cannot confirm ownership (Redis unreachable for most of the visibility
        timeout) it waits, so a run taken over elsewhere never writes a second checkpoint."""
        if self.fence is not None:
            await self.fence(self)
        elif self.lost:
            raise _EntryLost(self.entry_id)


class _EntryLost(Exception):
    """The delivery was taken over by another consumer: stop before writing anything."""


@dataclasses.dataclass(slots=True)
class JobInfo:
    """A job as the admin API and the board show it (``to_dict`` is the JSON shape)."""

    id: str
    queue: str
    state: JobState
    enqueued_at_ms: int
    attempts: int = 0
    error: str | None = None
    payload: Any = None
    entry_id: str | None = None
    shard: int = 0
    consumer: str | None = None
    idle_ms: int | None = None
    due_at_ms: int | None = None
    finished_at_ms: int | None = None
    wait_ms: int | None = None
    run_ms: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def entry_ms(entry_id: str | bytes) -> int:
    """Millisecond part of a stream id."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.split("-", 1)[0])


def now_ms() -> int:
    return int(time.time() * 1000)


def encode_payload(payload: Any) -> bytes:
    """Bytes are taken as already-encoded JSON (the API hands over what it received)."""
    if isinstance(payload, bytes):
        return payload
    return orjson.dumps(payload)


def fields_dict(fields: Any) -> dict[bytes, bytes]:
    """Entry fields as a dict, from either a flat ``[k, v, …]`` list (Lua) or a dict (redis-py)."""
    if isinstance(fields, dict):
        return fields
    it = iter(fields)
    return dict(zip(it, it, strict=False))


def decode_entry(queue: str, shard: int, entry_id: bytes, fields: Any, deliveries: int) -> Job:
    """A :class:`Job` from a raw entry; raises :class:`UndecodablePayload` with the reason.

    Even an undecodable job comes back through ``exc.job`` so it can be dead-lettered by id.
    """
    eid = entry_id.decode()
    at_ms = int(eid.partition("-")[0])
    attempts = error = first = None
    if type(fields) is list and len(fields) == 4 and fields[0] == F_ID and fields[2] == F_PAYLOAD:
        # The common shape (a first delivery as the producer wrote it), without a dict.
        raw_id, raw = fields[1], fields[3]
    elif type(fields) is dict and len(fields) == 2 and F_ID in fields and F_PAYLOAD in fields:
        raw_id, raw = fields[F_ID], fields[F_PAYLOAD]  # the same, as redis-py parses a read
    else:
        f = fields_dict(fields)
        raw_id, raw = f.get(F_ID), f.get(F_PAYLOAD)
        attempts, error, first = f.get(F_ATTEMPTS), f.get(F_ERROR), f.get(F_FIRST)
    # Positional: the generated __init__ binds them faster than keywords (one job per entry).
    job = Job(
        raw_id.decode(errors="replace") if raw_id else eid,  # id
        queue,
        None,  # payload
        (int(attempts) if attempts else 0) + deliveries,  # attempt
        eid,  # entry_id
        shard,
        int(first) if first else at_ms,  # enqueued_ms
        error.decode(errors="replace") if error else None,  # last_error
        raw or b"",  # raw
        at_ms,  # entry_ms
    )
    if raw_id is None or raw is None:
        raise UndecodablePayload("entry has no job id or no payload field", job)
    try:
        job.payload = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise UndecodablePayload(f"payload is not valid JSON: {exc}", job) from None
    return job


def safe_json(raw: bytes) -> Any:
    """Decoded payload for display; undecodable bytes come back as text."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode(errors="replace")
