"""Run submission: the one way a run gets from "accepted" to "on the queue".

Every caller — webhooks (async and sync), a manual run, a retry, the scheduler, the
reconciler — goes through :class:`Submitter`, so the order and the backlog policy cannot drift:

1. **insert** the run row (group commit); a repeat of its idempotency key inserts nothing and
   enqueues nothing — the earlier run is the answer;
2. **enqueue** its :class:`RunJob` (the job id is the run id, so enqueueing twice adds once);
3. **backlog full** (``AP_QUEUE_MAX_LENGTH``): :attr:`OnFull.REFUSE` when a caller is there to
   retry (an HTTP request: the just-inserted row is deleted and :class:`~conveyor.queue.QueueFull`
   raised, which the API answers 429 — refused work, never dropped work; a repeat of the run's
   idempotency key that found its row, in the same insert batch or while the refusal was
   being decided, is refused alike instead of replaying a deleted run), :attr:`OnFull.DEFER`
   otherwise (the row stays ``QUEUED`` and the reconciler enqueues it once there is room);
4. **Redis down**: the row is committed, so the run is deferred to the reconciler as well; the
   :class:`Submission` carries the error for callers that must react (a sync webhook cancels).

See docs/architecture.md, "Shape and data path".
"""

from __future__ import annotations

import asyncio
import enum
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from conveyor.engine.context import slot_maker
from conveyor.queue import Producer, QueueFull, QueueName, QueueUnavailable
from conveyor.store import runs as run_store
from conveyor.store.runs import NewRun, RunWriter

#: The start of a job's payload: ``{"run_id": …, "flow_id": …, "version": …`` as orjson
#: writes it (ids are hex and dashes: nothing to escape).
_JOB = b'{"run_id":"%s","flow_id":"%s","version":%d'
_QUEUED = "QUEUED"
#: Flow ids → their text in a job (a flow's webhooks come again and again); cleared when full.
_FLOW_TEXT: dict[uuid.UUID, bytes] = {}
_FLOW_TEXT_MAX = 4096

#: Refusals remembered for repeats of their runs' idempotency keys (``Submitter._refused``).
_REFUSED_MAX = 4096


@dataclass(frozen=True, slots=True)
class RunJob:
    """The queue payload of one run.

    ``run_id``, ``flow_id``, ``version``: what to run. ``trigger``: the trigger payload when it
    travels inline (``None``: the worker reads it from PostgreSQL). ``reply``: the pub/sub
    channel of a waiting sync request. ``retry``: not a fresh start — the worker loads the
    trigger and any checkpoints from PostgreSQL. ``resume``: a paused run's resumption.
    """

    run_id: str
    flow_id: str
    version: int
    trigger: dict[str, Any] | None = None
    reply: str | None = None
    retry: bool = False
    resume: bool = False

    def to_payload(self) -> dict[str, Any]:
        """The JSON object put on the queue (unset optional fields are left out)."""
        out: dict[str, Any] = {"run_id": self.run_id, "flow_id": self.flow_id}
        out["version"] = self.version
        if self.trigger is not None:
            out["trigger"] = self.trigger
        if self.reply:
            out["reply"] = self.reply
        if self.retry:
            out["retry"] = True
        if self.resume:
            out["resume"] = True
        return out

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> RunJob:
        """Read a queued payload; ``KeyError``/``ValueError`` on a malformed one."""
        trigger = payload.get("trigger")
        reply = payload.get("reply")
        return cls(
            run_id=str(payload["run_id"]),
            flow_id=str(payload["flow_id"]),
            version=int(payload["version"]),
            trigger=dict(trigger) if isinstance(trigger, Mapping) else None,
            reply=str(reply) if reply else None,
            retry=bool(payload.get("retry")),
            resume=bool(payload.get("resume")),
        )

    @property
    def fresh(self) -> bool:
        """A first start: nothing is stored for it yet but the run row."""
        return not (self.retry or self.resume)


class OnFull(enum.Enum):
    """What a full backlog does to a run the submission just inserted."""

    #: Delete the row and raise ``QueueFull``: a caller is there to retry (HTTP 429).
    REFUSE = "refuse"
    #: Keep the row ``QUEUED``: the reconciler enqueues it once there is room.
    DEFER = "defer"


@dataclass(frozen=True, slots=True)
class Submission:
    """What a submission did. ``created`` False: an earlier run holds the idempotency key
    (``run_id``, ``status``, ``response_status`` are that run's; nothing was enqueued).
    ``enqueued`` False with ``created``: deferred to the reconciler — backlog full under
    :attr:`OnFull.DEFER`, or Redis down (``outage`` holds the error)."""

    run_id: uuid.UUID
    created: bool
    enqueued: bool
    status: str = "QUEUED"
    response_status: int | None = None
    outage: QueueUnavailable | None = None
    #: ``str(run_id)`` when the submission had it at hand (else empty).
    id_text: str = ""


#: ``Submission(...)`` positionally, every field given (built without keyword parsing).
_enqueued = slot_maker(Submission)


class Submitter:
    """Inserts and enqueues runs with one policy (see the module docstring).

    Parameters: ``writer`` commits run rows, ``producer`` adds jobs to the queue.
    """

    def __init__(self, writer: RunWriter, producer: Producer) -> None:
        self.writer = writer
        self.producer = producer
        #: Runs being submitted (by ``UUID.int``) → ``None``, or the future a repeat of the
        #: run's idempotency key waits on until the first caller knows its outcome.
        self._submitting: dict[int, asyncio.Future[None] | None] = {}
        #: Runs refused under :attr:`OnFull.REFUSE` (rows deleted or being deleted) → the
        #: refusal's (queue, cap), which a repeat of the key is refused with too; the newest
        #: :data:`_REFUSED_MAX`. Not the exception itself: its traceback would keep the
        #: refused request's frames — its trigger and body — alive.
        self._refused: dict[int, tuple[str, int]] = {}

    async def submit(
        self,
        new: NewRun,
        *,
        on_full: OnFull,
        inline_trigger: bool = True,
        reply: str | None = None,
        dedup_key: str | None = None,
    ) -> Submission:
        """Insert ``new``, then enqueue its job on ``new.queue``. ``inline_trigger`` False
        leaves a large trigger in PostgreSQL (the worker reads it from there).

        The enqueue is chained to the insert's group commit: once the statement commits, the
        batch enqueues the jobs of every run it created in one script call per queue, and
        the caller wakes once, with both done."""
        # RunJob(...).to_payload() written out as the bytes orjson would make of it (this
        # runs for every webhook), with the trigger encoded once for the job and the row.
        run_id = str(new.id)
        trigger = new.trigger
        encoded = None if trigger is None else orjson.dumps(trigger, default=str)
        flow_text = _FLOW_TEXT.get(new.flow_id)
        if flow_text is None:
            if len(_FLOW_TEXT) >= _FLOW_TEXT_MAX:
                _FLOW_TEXT.clear()
            flow_text = _FLOW_TEXT[new.flow_id] = str(new.flow_id).encode()
        payload = _JOB % (run_id.encode(), flow_text, new.flow_version)
        if inline_trigger and encoded is not None:
            payload += b',"trigger":' + encoded
        if reply:
            payload += b',"reply":' + orjson.dumps(reply)
        payload += b"}"
        # A repeat of the key (in this batch or a later one) waits until this caller knows
        # its outcome: see _first_outcome.
        submitting = self._submitting
        key = new.id.int
        submitting[key] = None
        try:
            inserted = await self.writer.insert(
                new, then=self._enqueue, arg=(run_id, payload, dedup_key), trigger_json=encoded
            )
            if not inserted.created:
                await self._first_outcome(inserted.run_id, on_full)
                return Submission(
                    inserted.run_id,
                    created=False,
                    enqueued=False,
                    status=inserted.status,
                    response_status=inserted.response_status,
                )
            result = inserted.then
            if isinstance(result, BaseException):
                if isinstance(result, QueueFull):
                    if on_full is OnFull.DEFER:
                        return Submission(inserted.run_id, created=True, enqueued=False)
                    # Refused, so not accepted: nothing may run later behind the caller's
                    # back; a repeat of its key is refused alike (_first_outcome).
                    refused = self._refused
                    if len(refused) >= _REFUSED_MAX:
                        del refused[next(iter(refused))]
                    refused[key] = (result.queue, result.cap)
                    await run_store.delete_run(self.writer.db, inserted.run_id)
                    raise result
                if isinstance(result, QueueUnavailable):
                    # Committed: the reconciler enqueues it once Redis is back.
                    return Submission(inserted.run_id, created=True, enqueued=False, outage=result)
                raise result
            return _enqueued(inserted.run_id, True, True, _QUEUED, None, None, run_id)
        finally:
            waiter = submitting.pop(key, None)
            if waiter is not None:
                waiter.set_result(None)

    async def _first_outcome(self, run_id: uuid.UUID, on_full: OnFull) -> None:
        """A repeat of the idempotency key of ``run_id``: when this process's submission of
        that run is still going on, wait for its outcome; when the backlog refused it (its
        row deleted, or about to be), the repeat is refused alike (``QueueFull``) — a replay
        would answer 2xx for a run that does not exist."""
        key = run_id.int
        if key in self._submitting:
            waiter = self._submitting[key]
            if waiter is None:
                waiter = self._submitting[key] = asyncio.get_running_loop().create_future()
            await asyncio.shield(waiter)
        refused = self._refused.get(key)
        if refused is not None and on_full is OnFull.REFUSE:
            raise QueueFull(*refused)

    async def _enqueue(
        self, created: Sequence[tuple[NewRun, tuple[str, bytes, str | None]]]
    ) -> list[str | BaseException]:
        """The jobs of the runs an insert batch created: one enqueue per queue (the
        :data:`~conveyor.store.runs.AfterInsert` of :meth:`submit`; each run's argument is
        its ``(job id, encoded payload, dedup key)``)."""
        queue = created[0][0].queue
        if all(new.queue == queue for new, _ in created):
            return await self.producer.enqueue_batch(queue, [job for _, job in created])
        out: list[str | BaseException] = [""] * len(created)
        by_queue: dict[str, list[int]] = {}
        for i, (new, _) in enumerate(created):
            by_queue.setdefault(new.queue, []).append(i)
        for name, idx in by_queue.items():
            jobs = [created[i][1] for i in idx]
            try:
                results = await self.producer.enqueue_batch(name, jobs)
            except Exception as exc:  # this queue's jobs only: another's may be enqueued
                results = [exc] * len(idx)
            for i, result in zip(idx, results, strict=True):
                out[i] = result
        return out

    async def resubmit(
        self,
        job: RunJob,
        *,
        queue: str = QueueName.RUNS.value,
        job_id: str | None = None,
        delay_s: float = 0.0,
    ) -> Submission:
        """Enqueue ``job`` for a run already ``QUEUED`` (or ``PAUSED``) in PostgreSQL: a
        retry, a resumption, a reconciler pass. A full backlog or Redis down defers it to the
        reconciler (the row is the record of it); ``outage`` says which."""
        rid = uuid.UUID(job.run_id)
        try:
            await self.producer.enqueue(
                queue, job.to_payload(), job_id=job_id or job.run_id, delay_s=delay_s
            )
        except QueueFull:
            return Submission(rid, created=False, enqueued=False)
        except QueueUnavailable as exc:
            return Submission(rid, created=False, enqueued=False, outage=exc)
        return Submission(rid, created=False, enqueued=True)
