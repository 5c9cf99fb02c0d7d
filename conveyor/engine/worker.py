"""The worker role: queue consumer → executor → PostgreSQL, then acknowledge.

One :class:`RunWorker` per process serves the ``sync`` then the ``runs`` queue with
``AP_WORKER_CONCURRENCY`` runs at once. For each job it executes the compiled flow version,
streams step checkpoints to PostgreSQL in batches across runs (those of steps without effects
held until the next durable write), moves the run to ``RUNNING`` — a guarded update: a run
canceled meanwhile is skipped — with its first durable write, or once a contained code step
has run for :data:`LAZY_RUNNING_S` (a redelivery: before anything else), commits the final
state with the held checkpoints in one statement, tells a waiting sync caller, and only then
returns — the consumer acknowledges after that, so a worker that dies mid-run leaves the
entry pending and another worker reclaims it, skipping the steps already checkpointed. A run
that ends ``FAILED`` or ``TIMEOUT`` is a completed job; only an exception here (our bug, a
database outage) makes the queue redeliver.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import uuid
from collections.abc import AsyncIterator, Awaitable, Mapping
from datetime import UTC, datetime
from typing import Any

import asyncpg
import structlog
from redis.exceptions import RedisClusterException, RedisError

from conveyor import metrics
from conveyor.engine.context import (
    RunContext,
    RunOutcome,
    Services,
    StepRecord,
    slot_maker,
)
from conveyor.engine.executor import Executor
from conveyor.engine.flow import Flow
from conveyor.engine.reconciler import Reconciler, resume_job_id
from conveyor.engine.registry import FlowRegistry
from conveyor.engine.replies import ReplyPublisher
from conveyor.engine.scheduler import Scheduler
from conveyor.engine.spec import StepType
from conveyor.engine.ssrf import SsrfPolicy, create_http_session
from conveyor.engine.submit import RunJob, Submitter
from conveyor.errors import Conflict
from conveyor.logging import bind_run
from conveyor.queue import Consumer, Job, Producer, QueueConfig, QueueUnavailable
from conveyor.queue import keys as qkeys
from conveyor.queue.admin import QueueAdmin
from conveyor.queue.errors import is_unavailable
from conveyor.sandbox.client import Sandbox
from conveyor.sandbox.config import SandboxConfig
from conveyor.settings import Settings
from conveyor.status import RunStatus
from conveyor.store import runs as run_store
from conveyor.store.runs import Finish, RunWriter, StepRow, Transition
from conveyor.store.secrets import SecretBox, load_secrets

log = structlog.get_logger(__name__)


class RunEnded(Conflict):
    """The run reached a final state elsewhere (a cancel) while this worker executed it."""


#: Step types without effects outside the run (a transform renders, a branch chooses, a
#: respond answers a waiting caller, and answers again when replayed). Their checkpoints are
#: held back and written with the next checkpoint that must be durable first — before any
#: other step type starts — or with the run's final state (:meth:`RunWriter.finish`), in one
#: statement. Re-running such a step after a crash has no effect beyond its own record; every
#: other type's checkpoint is written before the next step starts, as before.
DEFERRED_TYPES = frozenset({StepType.TRANSFORM, StepType.BRANCH, StepType.RESPOND})
#: With a sandbox that contains its children (:attr:`Sandbox.contained`: no network, no host
#: writes, the host's services out of reach) a code step has no effect outside the run
#: either — its output is all it leaves — so its checkpoint is held too. In the partial or
#: unsandboxed modes it may reach the network, so it stays a step with effects. Unlike a
#: transform, a code step need not compute the same output twice (a clock, randomness, a warm
#: child's state), so nobody may see a held code output before it is committed: a respond
#: step run while one is held answers the caller only after the next durable write
#: (:attr:`_Sink.pending`).
CONTAINED_DEFERRED_TYPES = DEFERRED_TYPES | {StepType.CODE}

#: A first delivery's contained code step starts before the run's RUNNING is written: once
#: its code has been running this long (from the moment it is handed to the sandbox child,
#: after any wait for a slot) RUNNING is written — guarded, with the records held so far — so
#: a run executing user code shows as running (and is canceled as such) within this time; a
#: run found ended meanwhile (canceled while queued) has its code step killed and stops there.
#: A step done sooner never needs it: RUNNING rides with the next durable write — in the
#: 4-step sync flow its final state, two statements per run instead of three. Measured at the
#: 4-step benchmark's max rate on 2 busy cores, a warm code step took 3.3 ms from hand-over to
#: its record (p50; p95 8.6 ms, max 29 ms): at 5 ms a quarter of the runs still paid for
#: RUNNING, at 20 ms about one in a hundred. A run canceled while queued may thus compute for
#: up to this long; contained code has no effect outside its output, and that is never
#: committed (the final write is guarded too).
LAZY_RUNNING_S = 0.020
#: How long a handler handing its delivery back waits for a RUNNING write already in flight
#: (one batched statement; longer only when PostgreSQL itself is stuck).
LANDING_BOUND_S = 5.0

# Positional constructors of the records made for every run and step (see slot_maker): a
# step row always holds a StepRecord (from the executor), and a first delivery's context
# has no checkpoints — what their __post_init__ would convert.
_step_row = slot_maker(StepRow, post_init=False)
_fresh_context = slot_maker(RunContext, post_init=False)
_transition = slot_maker(Transition)
_finish = slot_maker(Finish)


class _Sink:
    """Checkpoint sink of one run: numbers its steps after those already stored, holds back
    the records of ``deferred`` step types (:data:`DEFERRED_TYPES`, or
    :data:`CONTAINED_DEFERRED_TYPES`) until a durable write is due.

    ``start_pending``: the run's RUNNING transition has not been written yet (a first
    delivery); the first durable write carries it, guarded like every transition, so a run
    canceled meanwhile stops before any step with effects starts. ``rid``: the run's id
    parsed (else parsed from the first ``run_id`` the executor passes).

    ``on_respond``: the run's respond callback — its answer goes to a waiting sync caller
    (``reply``, through ``replies``) at once, or is held as ``pending`` when a code step's
    record was held when it ran (see :data:`CONTAINED_DEFERRED_TYPES`); the next durable write
    — before the next step, or the run's final state — delivers it once committed.
    ``answered``: whether a listener got an answer (then no final message is sent).
    """

    __slots__ = (
        "answered",
        "cancelling",
        "code_held",
        "code_since",
        "deferred",
        "error",
        "held",
        "job",
        "killed",
        "lazy",
        "pending",
        "replies",
        "reply",
        "rid",
        "run_id",
        "seq",
        "start_pending",
        "starting",
        "task",
        "timer",
        "writer",
    )

    def __init__(
        self,
        writer: RunWriter,
        first_seq: int,
        job: Job | None = None,
        *,
        start_pending: bool = False,
        rid: uuid.UUID | None = None,
        deferred: frozenset[StepType] = DEFERRED_TYPES,
        reply: str | None = None,
        replies: ReplyPublisher | None = None,
        run_id: str = "",
    ) -> None:
        self.run_id = run_id
        self.writer = writer
        self.deferred = deferred
        self.reply = reply if replies is not None else None
        self.replies = replies
        self.pending: dict[str, Any] | None = None
        self.answered = False
        self.seq = first_seq
        self.job = job
        self.held: list[StepRow] = []
        #: Whether a code step's record is among ``held``.
        self.code_held = False
        self.start_pending = start_pending
        self.rid = rid
        #: A contained code step started with RUNNING not written is in flight (see
        #: LAZY_RUNNING_S); its start arms ``timer``, whose write runs as ``starting``.
        self.lazy = False
        self.timer: asyncio.TimerHandle | None = None
        self.starting: asyncio.Task[BaseException | bool] | None = None
        #: The run's task and its cancel count when the lazy step started: a write finding the
        #: run ended cancels it (``killed``) to stop the code step.
        self.task: asyncio.Task[Any] | None = None
        self.cancelling = 0
        #: When the run's first contained code step was handed to its child (loop time): the
        #: LAZY_RUNNING_S budget is the run's, not each step's.
        self.code_since: float | None = None
        self.killed = False
        #: The exception a write of this sink raised into the executor (which would make an
        #: INTERNAL_ERROR outcome of it): the run's handler raises it instead, so the job is
        #: retried with nothing of this delivery committed.
        self.error: Exception | None = None

    def _rid(self, run_id: str) -> uuid.UUID:
        rid = self.rid
        if rid is None:
            rid = self.rid = uuid.UUID(run_id)
        return rid

    def checkpoint(self, run_id: str, record: StepRecord) -> Awaitable[None] | None:
        """:meth:`step_finished` as the executor calls it: ``None`` when there is nothing to
        await (a record held: no coroutine made), else what to await."""
        if self.lazy:
            return self.step_finished(run_id, record)
        self._hold(run_id, record)
        if record.type not in self.deferred:
            return self._flush_noted(run_id)
        return None

    async def step_finished(self, run_id: str, record: StepRecord) -> None:
        if self.lazy:
            try:
                await self.settle()
            except Exception as exc:
                self._failed(exc)
                raise
        self._hold(run_id, record)
        if record.type not in self.deferred:
            await self._flush_noted(run_id)

    def _hold(self, run_id: str, record: StepRecord) -> None:
        seq = self.seq
        self.seq += 1
        typ = record.type
        metrics.observe_step(typ, record.duration_ms)
        self.held.append(_step_row(self.rid or self._rid(run_id), seq, record))
        if typ == StepType.CODE:
            self.code_held = True

    async def _flush_noted(self, run_id: str) -> None:
        try:
            await self.flush(run_id)
        except Exception as exc:
            self._failed(exc)
            raise

    def _failed(self, exc: Exception) -> None:
        """A write failed under the executor: noted for the run's handler (a run found ended
        is an outcome, not a failure)."""
        if not isinstance(exc, RunEnded) and self.error is None:
            self.error = exc

    def pre_step(self, run_id: str, step_type: str) -> Awaitable[None] | None:
        """:meth:`before_step` as the executor calls it: ``None`` when it has nothing to do
        (no coroutine made), else what to await."""
        if (
            self.lazy
            or self.pending is not None
            or (
                (self.held or self.start_pending)
                and (step_type not in self.deferred or step_type == StepType.CODE)
            )
        ):
            return self.before_step(run_id, step_type)
        return None

    async def before_step(self, run_id: str, step_type: str) -> None:
        """A step is about to start: anything held is made durable first unless the step
        is one of the deferred types too — or a held answer waits for it. A code step not
        held starts only once the run's RUNNING is written; a held (contained) one may start
        before, RUNNING following within :data:`LAZY_RUNNING_S` of its code starting (or with
        the next durable write if it is done by then): a run executing user code shows as
        running (and can be canceled as such), and a run canceled while queued has its code
        step killed with nothing of it stored."""
        try:
            if self.lazy:
                await self.settle()
            if self.pending is not None or (
                (self.held or self.start_pending) and step_type not in self.deferred
            ):
                await self.flush(run_id)
                return
        except Exception as exc:
            self._failed(exc)
            raise
        if self.start_pending and step_type == StepType.CODE:
            # A contained code step (else it is not deferred): RUNNING waits (code_started)
            # — unless the run's code has had its LAZY_RUNNING_S already (earlier code steps).
            since = self.code_since
            if since is not None and asyncio.get_running_loop().time() - since >= LAZY_RUNNING_S:
                try:
                    await self.flush(run_id)
                except Exception as exc:
                    self._failed(exc)
                    raise
                return
            self.lazy = True
            task = self.task = asyncio.current_task()
            self.cancelling = task.cancelling() if task is not None else 0

    def code_started(self) -> None:
        """The sandbox handed a code step's code to its child (every attempt): while the run's
        RUNNING is not written, arm its write for :data:`LAZY_RUNNING_S` after the run's
        first code step started (the budget is the run's: a run of many quick code steps
        shows as RUNNING once they have taken that long together)."""
        if self.lazy and self.timer is None and self.starting is None:
            loop = asyncio.get_running_loop()
            now = loop.time()
            since = self.code_since
            if since is None:
                since = self.code_since = now
            self.timer = loop.call_later(max(0.0, since + LAZY_RUNNING_S - now), self._start)

    def _start(self) -> None:
        self.timer = None
        task = self.task
        if (
            self.lazy
            and self.start_pending
            and task is not None
            and not task.done()
            # Not while someone else cancels the run's task (the worker stopping): the
            # delivery is released without a RUNNING written behind its back.
            and task.cancelling() <= self.cancelling
        ):
            self.starting = asyncio.get_running_loop().create_task(self._write_running())

    async def _write_running(self) -> BaseException | bool:
        """RUNNING and the records held so far, while the code step runs: whether stored, or
        the exception the write raised (re-raised to the run by :meth:`settle`). A run ended
        meanwhile has its task canceled (the code step is killed) if the step still runs."""
        try:
            rows = self.take()
            self.start_pending = False
            if rows:
                await self.fence()
            assert self.rid is not None
            change = _transition(self.rid, RunStatus.RUNNING, bump_attempt=True)
            stored = await self.writer.finish(_finish(change, rows))
        except Exception as exc:
            return exc
        if not stored and self.lazy and self.task is not None:
            self.killed = True
            self.task.cancel()
        return stored

    async def settle(self) -> None:
        """The lazy code step is over: its RUNNING write disarmed if not yet due, else
        awaited (every later write comes after it); :class:`RunEnded` if it found the run
        ended."""
        self.lazy = False
        timer = self.timer
        if timer is not None:
            self.timer = None
            timer.cancel()
        starting = self.starting
        if starting is None:
            return
        # Kept until its result is read: a cancel of this wait (a flow timeout) leaves it to
        # the next settle (RunWorker._execute), so its error or "ended" is never lost and no
        # later write overtakes it.
        result = await asyncio.shield(starting)
        self.starting = None
        if isinstance(result, BaseException):
            raise result
        if not result:
            raise RunEnded(f"run {self.rid} ended before it started")

    def stopped(self) -> bool:
        """Whether a cancel of the run's task is this sink's (the run ended while its code
        step ran), and nobody else's: it is then taken back."""
        task = self.task
        if not self.killed or task is None:
            return False
        self.killed = False
        return task.uncancel() <= self.cancelling

    async def landed(self) -> None:
        """Wait (at most :data:`LANDING_BOUND_S`) for a RUNNING write already in flight, its
        result left to nobody: the run's delivery is being handed back."""
        starting = self.starting
        if starting is not None and not starting.done():
            await asyncio.wait({starting}, timeout=LANDING_BOUND_S)

    def disarm(self) -> None:
        """The run's handler is leaving: no RUNNING write may start after it."""
        self.lazy = False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    async def on_respond(self, status: int, headers: Mapping[str, str], body: Any) -> None:
        """A respond step ran: its answer to the waiting caller, now or (a code output held)
        once committed."""
        reply = self.reply
        if reply is None:
            return
        message = {
            "run_id": self.run_id or str(self.rid),
            "kind": "respond",
            "status": status,
            "headers": dict(headers),
            "body": body,
        }
        if self.code_held:
            # The answer may show a held code output: sent once that is committed.
            self.pending = message
            return
        # A respond that could not be delivered is followed by the final message.
        assert self.replies is not None
        if await self.replies.publish(reply, message):
            self.answered = True

    async def deliver_pending(self) -> None:
        """Send the held answer, if any (its outputs are committed now); ``answered`` says
        whether a listener got one."""
        message, self.pending = self.pending, None
        if message is not None and self.reply is not None:
            assert self.replies is not None
            if await self.replies.publish(self.reply, message):
                self.answered = True

    async def fence(self) -> None:
        if self.job is not None:
            # Fenced: a delivery another worker took over (this one was cut off from Redis)
            # stops here instead of checkpointing the same step twice.
            await self.job.ensure_owned()

    def take(self) -> list[StepRow]:
        """The held records, handed over to be written with the run's final state."""
        held, self.held = self.held, []
        self.code_held = False
        return held

    async def flush(self, run_id: str) -> None:
        if self.lazy or self.starting is not None:
            await self.settle()
        rows = self.take()
        if self.start_pending:
            # RUNNING and the held records in one statement (nothing stored if it ended).
            self.start_pending = False
            if rows:
                await self.fence()
            change = _transition(self._rid(run_id), RunStatus.RUNNING, bump_attempt=True)
            if not await self.writer.finish(_finish(change, rows)):
                raise RunEnded(f"run {run_id} ended before it started")
            await self.deliver_pending()
            return
        if not rows:
            await self.deliver_pending()
            return
        await self.fence()
        if len(rows) == 1:
            stored = [await self.writer.add_step(rows[0])]
        else:
            stored = await asyncio.gather(*(self.writer.add_step(r) for r in rows))
        if not all(stored):
            # Canceled (or timed out) meanwhile: stop before the next step runs.
            name = rows[-1].record.name
            raise RunEnded(f"run {run_id} ended while step {name!r} ran")
        await self.deliver_pending()


def _ended(run_id: str) -> RunOutcome:
    """The outcome of a run found ended elsewhere mid-way (never stored: its final write is
    guarded; the caller hears the stored state)."""
    return RunOutcome(
        RunStatus.INTERNAL_ERROR,
        error={"step": None, "message": f"run {run_id} ended while it was executing"},
    )


class _Unrouted:
    """The executor's process-wide sink: never used, as the worker hands each run its own
    :class:`_Sink` (``Executor.run(..., sink=)``)."""

    async def step_finished(self, run_id: str, record: StepRecord) -> None:
        raise RuntimeError(f"run {run_id} was started without its checkpoint sink")


class RunWorker:
    """Executes queued runs in this process.

    Parameters: ``settings``; ``db``-backed ``writer``, ``registry`` and secret ``box``;
    ``redis`` for the queue and the sync replies; ``sandbox`` for code steps.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        writer: RunWriter,
        registry: FlowRegistry,
        box: SecretBox,
        redis: Any,
        sandbox: Sandbox | None,
        http: Any,
        queue_config: QueueConfig | None = None,
    ) -> None:
        self.settings = settings
        self.writer = writer
        self.registry = registry
        self.box = box
        self.redis = redis
        self.queue_config = queue_config or QueueConfig.from_settings(settings)
        self.sandbox = sandbox
        self.producer = Producer(redis, self.queue_config)
        self.replies = ReplyPublisher(redis)
        self.submitter = Submitter(writer, self.producer)
        #: Flow ids as queued → (parsed, canonical text); flows are few, bounded all the same.
        self._flow_ids: dict[str, tuple[uuid.UUID, str]] = {}
        #: Compiled versions by (flow id as queued, version): a version never changes, and a
        #: key of strings is hashed and compared in C — the registry's (UUID, version) key
        #: calls UUID.__hash__ and __eq__ in Python on every lookup. Bounded like _flow_ids.
        self._flows: dict[tuple[str, int], Flow] = {}
        self.executor = Executor(
            Services(
                sink=_Unrouted(),
                sandbox=sandbox,
                http=http,
                ssrf=SsrfPolicy(
                    enabled=settings.ssrf_protection_enabled,
                    allow_list=settings.ssrf_allow_list,
                ),
                flow_timeout_s=float(settings.flow_timeout_seconds),
                max_log_bytes=settings.max_flow_run_log_bytes,
            )
        )
        self.consumer = Consumer(
            redis,
            self.handle,
            self.queue_config,
            on_dead=self.on_dead,
            transient=backend_down,
            concurrency=settings.worker_concurrency,
        )

    async def handle(self, job: Job) -> None:
        """Run one job's flow run to a committed end (or pause)."""
        run = RunJob.from_payload(job.payload)
        with bind_run(run.flow_id, run.run_id):
            await self._handle(job, run)

    async def _handle(self, job: Job, run: RunJob) -> None:
        run_id = run.run_id
        rid = uuid.UUID(run_id)
        started_s = metrics.job_started(job.entry_ms)
        fresh = job.attempt == 1 and run.fresh
        reply = run.reply
        # A first delivery starts lazily: its RUNNING transition goes with the first durable
        # write — before the first step with effects, with its held checkpoints; while a
        # contained code step runs past LAZY_RUNNING_S — or, for a run that needs none, with
        # its final state (_commit). Until then nothing it did is
        # visible. A redelivery moves to RUNNING first, as it may resume a step with effects.
        if not fresh:
            started = await self.writer.transition(
                Transition(rid, RunStatus.RUNNING, bump_attempt=True)
            )
            if not started:
                # Canceled (or finished by an earlier delivery): nothing to run; tell a waiter.
                if reply:
                    await self._final_from_store(reply, rid)
                return
        trigger = run.trigger
        checkpoints: list[StepRecord] = []
        if not fresh:
            checkpoints = await run_store.get_steps(self.writer.db, rid)
            first_seq = max((s.seq or 0 for s in checkpoints), default=-1) + 1
        else:
            first_seq = 0
        if trigger is None:
            trigger = (await run_store.get_run(self.writer.db, rid))["trigger"]
        flow_ids = self._flow_ids.get(run.flow_id)
        if flow_ids is None:
            flow_ids = self._flow_id(run.flow_id)
        flow_id, flow_text = flow_ids
        version = run.version
        key = (run.flow_id, version)
        flow = self._flows.get(key)
        if flow is None:
            flow = await self.registry.version(flow_id, version)
            # Never more than the registry keeps (AP_PIECES_CACHE_MAX_ENTRIES): this cache
            # holds compiled versions alive, and a flow document may be megabytes.
            if len(self._flows) >= self.registry.max_versions:
                self._flows.clear()
            self._flows[key] = flow
        secrets = (
            await load_secrets(self.writer.db, self.box, flow.secret_names)
            if flow.secret_names
            else {}
        )
        ctx = (_fresh_context if not checkpoints else RunContext)(
            run_id, flow_text, version, trigger, secrets, checkpoints
        )

        sink = _Sink(
            self.writer,
            first_seq,
            job,
            start_pending=fresh,
            rid=rid,
            deferred=self._deferred(),
            reply=reply,
            replies=self.replies,
            run_id=run_id,
        )
        outcome = await self._execute(flow, ctx, sink)
        metrics.observe_run(outcome.status.value, started_s)
        # The caller already has its answer once a respond step ran: no final message.
        await self._commit(rid, run, outcome, None if sink.answered else reply, sink)

    async def _execute(self, flow: Flow, ctx: RunContext, sink: _Sink) -> RunOutcome:
        """The executor's outcome of the run, once its sink has settled (a RUNNING write
        still in flight awaited)."""
        try:
            outcome = await self.executor.run(flow, ctx, on_respond=sink.on_respond, sink=sink)
            if sink.error is not None:
                # A checkpoint write failed (the executor made an INTERNAL_ERROR outcome of
                # it): the job fails and is retried; what it held is not committed.
                raise sink.error
            if sink.lazy or sink.starting is not None:
                await sink.settle()
        except asyncio.CancelledError:
            if not sink.stopped():
                # Handed back (the worker stops): a RUNNING write already in flight lands
                # first, or it could land after another worker took the run over.
                await sink.landed()
                raise
            # The run ended (canceled) while its first code step ran: that step was killed.
            return _ended(ctx.run_id)
        except RunEnded:
            return _ended(ctx.run_id)
        finally:
            sink.disarm()
            if sink.killed:
                # The sink's cancel of this task was absorbed below the executor (e.g. by
                # asyncio.wait_for in the sandbox): take it back, or the consumer's worker
                # task would stop after this job.
                sink.stopped()
        return outcome

    def _flow_id(self, text: str) -> tuple[uuid.UUID, str]:
        flow_id = uuid.UUID(text)
        if len(self._flow_ids) >= 10_000:
            self._flow_ids.clear()
        found = self._flow_ids[text] = (flow_id, str(flow_id))
        return found

    def _deferred(self) -> frozenset[StepType]:
        """The step types whose checkpoints a run started now may hold (asked per run: the
        sandbox's isolation is probed again when its fork-server restarts)."""
        sandbox = self.sandbox
        if sandbox is not None and sandbox.contained:
            return CONTAINED_DEFERRED_TYPES
        return DEFERRED_TYPES

    async def _commit(
        self,
        rid: uuid.UUID,
        run: RunJob,
        outcome: RunOutcome,
        reply: str | None,
        sink: _Sink,
    ) -> None:
        run_id = run.run_id
        # Fenced before the last write, always: a delivery taken over by another worker (this
        # one cut off past the visibility timeout) must not end the run the new owner is
        # running — even when nothing was held (an _EntryLost raised inside a checkpoint
        # became an INTERNAL_ERROR outcome in the executor; job.lost still says why).
        job = sink.job
        if job is not None:
            await job.ensure_owned()  # sink.fence(), inline
        if outcome.status is RunStatus.PAUSED and outcome.resume_at is not None:
            await sink.flush(run_id)
            await self.writer.transition(
                Transition(rid, RunStatus.PAUSED, resume_at=outcome.resume_at)
            )
            delay = max(0.0, (outcome.resume_at - datetime.now(UTC)).total_seconds())
            # A full backlog defers the resumption to the reconciler (the run is PAUSED with
            # its resume_at); Redis down fails the job, which is then retried.
            sub = await self.submitter.resubmit(
                dataclasses.replace(run, trigger=None, resume=True),
                job_id=resume_job_id(run_id, outcome.resume_at),
                delay_s=delay,
            )
            if sub.outage is not None:
                raise sub.outage
            return
        error = dict(outcome.error) if outcome.error else None
        held = sink.take()
        # The held checkpoints and the final state: one statement, batched across runs. A run
        # that never needed a durable write before counts its attempt here (it never went
        # through RUNNING).
        start_pending, sink.start_pending = sink.start_pending, False
        change = _transition(
            rid, outcome.status, output=outcome.output, error=error, bump_attempt=start_pending
        )
        stored = await self.writer.finish(_finish(change, held))
        if not reply:
            return
        # Committed: from here on nothing may fail the job. The reply is transport; a caller
        # that misses it reads the stored result (conveyor.engine.replies).
        if stored:
            # A respond held back for a code output: its answer now, else the final message.
            if sink.pending is not None:
                await sink.deliver_pending()
            if sink.answered:
                return
            await self._final(reply, run_id, outcome.status.value, outcome.output, error)
            return
        sink.pending = None  # ended elsewhere: that answer's outputs were never committed
        try:
            # Canceled (or ended) meanwhile: the caller hears what PostgreSQL says, not us.
            await self._final_from_store(reply, rid)
        except Exception as exc:
            log.warning("reply.not_sent", error=repr(exc))

    async def _final_from_store(self, reply: str, rid: uuid.UUID) -> None:
        row = await run_store.get_run(self.writer.db, rid)
        await self._final(reply, str(rid), row["status"], row["output"], row["error"])

    async def _final(self, reply: str, run_id: str, status: str, output: Any, error: Any) -> None:
        await self.replies.publish(
            reply,
            {
                "run_id": run_id,
                "kind": "final",
                "run_status": status,
                "output": output,
                "error": error,
            },
        )

    async def on_dead(self, job: Job, error: str) -> None:
        """The queue gave up on a job: the run ends INTERNAL_ERROR, never stuck RUNNING."""
        payload = job.payload if isinstance(job.payload, Mapping) else {}
        try:
            rid = uuid.UUID(str(payload.get("run_id")))
        except ValueError:
            return  # no run to end (a malformed job): the entry is simply dead-lettered
        err = {"step": None, "message": f"internal error after {job.attempt} deliveries: {error}"}
        await self.writer.transition(Transition(rid, RunStatus.INTERNAL_ERROR, error=err))
        if reply := payload.get("reply"):
            with contextlib.suppress(Exception):  # transport only: the caller reads the store
                await self._final_from_store(str(reply), rid)

    async def start(self) -> None:
        await self.consumer.start()

    async def close(self) -> None:
        """Drain: running jobs get ``AP_WORKER_DRAIN_SECONDS``, then they are stopped and
        handed back to the queue (another worker resumes them from their checkpoints)."""
        await self.consumer.close(timeout_s=float(self.settings.worker_drain_seconds))
        await self.producer.close()
        await self.replies.close()


#: PostgreSQL errors meaning "the server is away" (connection lost, shutting down, starting,
#: out of connection slots).
_PG_DOWN = (
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.TooManyConnectionsError,
)


def _pg_down(exc: BaseException) -> bool:
    """A PostgreSQL connection failure: an asyncpg connection error, or an ``OSError`` /
    ``TimeoutError`` raised inside asyncpg (connecting, reading its socket: refused, reset, a
    unix socket gone). Not any ``OSError``: a sandbox's ``TimeoutError`` or a
    ``BrokenPipeError`` elsewhere, or an asyncpg ``InterfaceError`` (misuse), is the job's
    own failure and spends a delivery."""
    seen = 0
    cur: BaseException | None = exc
    while cur is not None and seen < 8:
        if isinstance(cur, _PG_DOWN):
            return True
        if isinstance(cur, OSError | TimeoutError):
            tb = cur.__traceback__
            while tb is not None:
                if "/asyncpg/" in tb.tb_frame.f_code.co_filename.replace("\\", "/"):
                    return True
                tb = tb.tb_next
        cur = cur.__cause__
        seen += 1
    return False


def backend_down(exc: BaseException) -> str | None:
    """The backend whose outage ``exc`` reports (the job is retried without spending a
    delivery), or ``None`` for a real failure."""
    if isinstance(exc, QueueUnavailable) or (
        isinstance(exc, (RedisError, RedisClusterException)) and is_unavailable(exc)
    ):
        return "redis"
    if _pg_down(exc):
        return "postgres"
    return None


#: Generation-0 threshold of the cyclic garbage collector in a process that executes runs
#: (Python's default: 700). Every run allocates hundreds of short-lived containers
#: (coroutines, futures, records, request objects); at 700 allocations the collector ran
#: some 40 times a second under load, each time traversing the objects of every run in
#: flight, and with its older generations took 6–8 % of the server's CPU in the sync
#: benchmark. Cycles are still collected, a little later (a few MB at most).
GC_GEN0_THRESHOLD = 20_000


def tune_gc() -> None:
    """Raise the collector's generation-0 threshold to :data:`GC_GEN0_THRESHOLD` and move
    what start-up built (modules, compiled code, pools, caches) out of its sight for good
    (``gc.freeze``; once per process)."""
    gen0, gen1, gen2 = gc.get_threshold()
    if 0 < gen0 < GC_GEN0_THRESHOLD:
        gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)
    if not gc.get_freeze_count():
        gc.freeze()


@contextlib.asynccontextmanager
async def worker_role(
    settings: Settings,
    *,
    writer: RunWriter,
    registry: FlowRegistry,
    box: SecretBox,
    redis: Any,
) -> AsyncIterator[tuple[RunWorker, dict[str, Any]]]:
    """The worker role's services, started in this order and closed in reverse: sandbox, HTTP
    session, consumer, reconciler, scheduler. Yields the worker and the sandbox's isolation
    report (a dict the sandbox keeps current; readiness and metrics read it)."""
    sandbox = Sandbox(SandboxConfig.from_settings(settings))
    await sandbox.start()
    policy = SsrfPolicy(
        enabled=settings.ssrf_protection_enabled, allow_list=settings.ssrf_allow_list
    )
    http = create_http_session(policy)
    worker = RunWorker(
        settings,
        writer=writer,
        registry=registry,
        box=box,
        redis=redis,
        sandbox=sandbox,
        http=http,
    )
    await worker.start()
    reconciler = Reconciler(
        worker.writer,
        worker.producer,
        QueueAdmin(redis, worker.queue_config),
        flow_timeout_s=float(settings.flow_timeout_seconds),
        retention_days=settings.execution_data_retention_days,
    )
    await reconciler.start()
    scheduler = Scheduler(
        worker.writer.db,
        worker.writer,
        worker.producer,
        redis,
        trigger_timeout_s=float(settings.trigger_timeout_seconds),
        lease_key=qkeys.scheduler_lease(settings.redis_key_prefix),
    )
    await scheduler.start()
    tune_gc()
    try:
        yield worker, sandbox.isolation
    finally:
        await scheduler.close()
        await reconciler.close()
        await worker.close()
        await http.close()
        await sandbox.close()
