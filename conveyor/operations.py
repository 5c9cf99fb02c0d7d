"""What an operator can do to flows, runs and queues, and the reads behind the admin pages.

:class:`Operations` is built once per process by the composition root (:mod:`conveyor.app`)
from the services it needs, passed as arguments; the API handlers and the board both call it,
so ``POST /api/v1/flow-runs/{id}/retry`` and the board's retry button cannot drift apart. It
knows nothing of HTTP: a refusal is a domain error from :mod:`conveyor.errors`'s tree
(:class:`RunFinished`, :class:`UnknownJob`, :class:`~conveyor.errors.InvalidArgument` …),
which ``conveyor/api/errors.py`` turns into a status and an error code at the edge. See
docs/architecture.md, "Shape and data path".
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Awaitable
from typing import Any, Protocol

from conveyor import metrics
from conveyor.engine.registry import FlowRegistry
from conveyor.engine.submit import OnFull, RunJob, Submitter
from conveyor.errors import Conflict, InvalidArgument, NotFound
from conveyor.ids import uuid7
from conveyor.queue import JobNotFound, JobState, Location, QueueAdmin, QueueName
from conveyor.status import RunStatus
from conveyor.store import flows as flow_store
from conveyor.store import runs as run_store
from conveyor.store.db import Database
from conveyor.store.flows import FlowRecord
from conveyor.store.runs import RunWriter

RETRY_STRATEGIES = ("FROM_FAILED_STEP", "ON_LATEST_VERSION")
QUEUES = tuple(q.value for q in QueueName)


class WorkerReader(Protocol):
    """Reads the worker registry (:func:`conveyor.heartbeat.list_workers`, which the
    composition root binds to its Redis client and key prefix)."""

    def __call__(self, *, include_lost: bool) -> Awaitable[list[dict[str, Any]]]: ...


class RunFinished(Conflict):
    """A cancel named a run that already ended."""

    code = "RUN_FINISHED"


class RunNotFinished(Conflict):
    """A retry named a run that has not ended yet."""

    code = "RUN_NOT_FINISHED"


class UnknownQueue(NotFound):
    """No queue has this name."""

    code = "QUEUE_NOT_FOUND"


class UnknownJob(NotFound):
    """The queue holds no such job (in the state the action needs)."""

    code = "JOB_NOT_FOUND"


def check_queue(name: str) -> str:
    """``name`` if it names a queue, else :class:`UnknownQueue`."""
    if name not in QUEUES:
        raise UnknownQueue(f"no queue {name!r}: queues are {', '.join(QUEUES)}")
    return name


def _run_of_job(job_id: str) -> uuid.UUID | None:
    """The run a queue job carries: its id is the run id (``{run}:resume:{ms}`` for a
    resumption)."""
    try:
        return uuid.UUID(job_id.split(":", 1)[0])
    except ValueError:
        return None


class Operations:
    """Operator actions and admin reads over one process's services.

    Parameters: ``db`` (reads and run resets), ``writer`` (run state transitions),
    ``submitter`` (the one way a run is enqueued), ``registry`` (compiled flows, invalidated
    on change), ``queues`` (queue admin over Redis) and ``workers`` (the worker registry).
    """

    def __init__(
        self,
        db: Database,
        *,
        writer: RunWriter,
        submitter: Submitter,
        registry: FlowRegistry,
        queues: QueueAdmin,
        workers: WorkerReader,
    ) -> None:
        self.db = db
        self.queues = queues
        self._writer = writer
        self._submitter = submitter
        self._registry = registry
        self._workers = workers

    # ------------------------------------------------------------------------------- flows
    async def create_flow(self, document: dict[str, Any]) -> FlowRecord:
        """Save a validated flow document as a new flow (``Conflict`` if the name is taken)."""
        return await flow_store.create_flow(self.db, document["name"], document)

    async def update_flow(self, flow_id: uuid.UUID, document: dict[str, Any]) -> FlowRecord:
        """Save a validated document as the flow's next version."""
        flow = await flow_store.update_flow(self.db, flow_id, document["name"], document)
        self._registry.invalidate(flow_id)
        return flow

    async def delete_flow(self, flow_id: uuid.UUID) -> None:
        await flow_store.delete_flow(self.db, flow_id)
        self._registry.invalidate(flow_id)

    async def set_flow_enabled(self, flow_id: uuid.UUID, enabled: bool) -> FlowRecord:
        """Enable or disable a flow (webhooks of a disabled flow answer 404)."""
        flow = await flow_store.set_enabled(self.db, flow_id, enabled)
        self._registry.invalidate(flow_id)
        return flow

    async def start_run(self, flow: FlowRecord, body: Any) -> uuid.UUID:
        """A manual run of ``flow``'s current version with ``body`` as ``trigger.body``.

        A full backlog deletes the row again and raises ``QueueFull``: nothing may run later
        behind the caller's back. Redis down: committed, the reconciler enqueues it."""
        trigger: dict[str, Any] = {"method": "MANUAL", "headers": {}, "query": {}, "body": body}
        run_id = uuid7()
        await self._submitter.submit(
            run_store.NewRun(run_id, flow.id, flow.version, trigger, response_status=202),
            on_full=OnFull.REFUSE,
        )
        return run_id

    # -------------------------------------------------------------------------------- runs
    async def retry_run(self, run_id: uuid.UUID, strategy: str) -> dict[str, Any]:
        """Retry a finished run: ``FROM_FAILED_STEP`` keeps the steps before the failed one
        (same version), ``ON_LATEST_VERSION`` starts over on the flow's current version.
        Returns the run row."""
        if strategy not in RETRY_STRATEGIES:
            raise InvalidArgument(f"strategy must be one of {', '.join(RETRY_STRATEGIES)}")
        row = await run_store.get_run(self.db, run_id)
        version = row["flow_version"]
        if strategy == "ON_LATEST_VERSION":
            version = (await flow_store.get_flow(self.db, row["flow_id"])).version
        result = await run_store.reset_for_retry(
            self.db, run_id, flow_version=version, keep_steps=strategy == "FROM_FAILED_STEP"
        )
        if not result["retried"]:
            raise RunNotFinished(f"run is {result['status']}; only finished runs retry")
        job = RunJob(run_id=str(run_id), flow_id=str(row["flow_id"]), version=version, retry=True)
        # The run is QUEUED in PostgreSQL: if Redis is down or the backlog full right now, the
        # reconciler enqueues it later, as it does for any accepted run.
        await self._submitter.resubmit(job)
        return await run_store.get_run(self.db, run_id)

    async def cancel_run(self, run_id: uuid.UUID) -> dict[str, Any]:
        """Cancel a queued, running or paused run; :class:`RunFinished` if it already ended
        otherwise. Returns the run row."""
        await run_store.get_run(self.db, run_id)
        changed = await self._writer.transition(
            run_store.Transition(
                run_id, RunStatus.CANCELED, error={"step": None, "message": "canceled by user"}
            )
        )
        if changed:
            await run_store.cancel_paused_steps(self.db, run_id)
        row = await run_store.get_run(self.db, run_id)
        if not changed and row["status"] != RunStatus.CANCELED.value:
            raise RunFinished(f"run already ended as {row['status']}")
        return row

    # ------------------------------------------------------------------------------ queues
    async def retry_dead_job(self, queue: str, job_id: str) -> str:
        """Put a dead-lettered job back, and its run back to ``QUEUED`` (from the start): the
        run ended ``INTERNAL_ERROR`` when the job died, and a worker skips runs that already
        ended. Returns the job's new stream entry id; :class:`UnknownJob` if it is not
        dead-lettered — and then the run is left exactly as it was."""
        check_queue(queue)
        where = (await self.queues.locate(queue, [job_id]))[job_id]
        if where is not Location.DEAD:
            raise UnknownJob(f"no failed job {job_id!r} in {queue!r}")
        run_id = _run_of_job(job_id)
        if run_id is not None:
            with contextlib.suppress(NotFound):
                row = await run_store.get_run(self.db, run_id)
                await run_store.reset_for_retry(
                    self.db, run_id, flow_version=row["flow_version"], keep_steps=False
                )
        try:
            return await self.queues.retry_dead(queue, job_id)
        except JobNotFound:
            raise UnknownJob(f"no failed job {job_id!r} in {queue!r}") from None

    async def retry_all_dead(self, queue: str, *, limit: int = 10_000) -> int:
        """Put every dead-lettered job of ``queue`` (up to ``limit``) back, with its run."""
        check_queue(queue)
        retried = 0
        while retried < limit:
            jobs, _ = await self.queues.list_jobs(
                queue, JobState.FAILED, limit=min(200, limit - retried)
            )
            if not jobs:
                break
            for job in jobs:
                with contextlib.suppress(UnknownJob):  # retried or deleted meanwhile
                    await self.retry_dead_job(queue, job.id)
                    retried += 1
        return retried

    async def delete_job(self, queue: str, job_id: str) -> Location:
        """Remove a waiting, delayed, failed (or active) job; :class:`UnknownJob` if absent."""
        check_queue(queue)
        try:
            return await self.queues.delete_job(queue, job_id)
        except JobNotFound:
            raise UnknownJob(f"no job {job_id!r} in {queue!r}") from None

    # ------------------------------------------------------------------- workers, scaling
    async def workers(self, *, include_lost: bool) -> list[dict[str, Any]]:
        """Registered worker processes (``include_lost``: also those whose heartbeat stopped)."""
        return await self._workers(include_lost=include_lost)

    async def scaling_report(self) -> list[dict[str, Any]]:
        """The scaling rules evaluated now (see :func:`conveyor.metrics.evaluate_scaling`)."""
        queues = await self.queues.all_stats()
        workers = await self.workers(include_lost=False)
        try:
            db: tuple[int, int] | None = await self.db.server_connections()
        except Exception:
            db = None
        inputs = metrics.scaling_inputs(queues, workers, metrics.API_WINDOW.summary(), db)
        return metrics.evaluate_scaling(inputs)
