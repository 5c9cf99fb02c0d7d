"""PostgreSQL is the source of truth: put back what Redis lost, close what a crash left open.

Every worker process runs :class:`Reconciler` every ``interval_s``. It reads the live runs
(``QUEUED``/``RUNNING``/``PAUSED``) not touched for ``grace_s`` and asks the queue where each
job is. A run whose entry is gone — Redis restarted empty, a Redis that was down at ingest,
an entry trimmed — is enqueued again (a paused run into the delayed set, due at its stored
``resume_at``). Enqueue is idempotent per job id, so two reconcilers racing add nothing twice.
A ``RUNNING`` run older than ``AP_FLOW_TIMEOUT_SECONDS`` plus the grace ends ``TIMEOUT`` even if
the worker that started it died, and a live run whose job was dead-lettered ends
``INTERNAL_ERROR``: nothing stays ``RUNNING`` forever. Once an hour it also trims
run history older than ``AP_EXECUTION_DATA_RETENTION_DAYS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import structlog

from conveyor.aio import raise_if_cancelling
from conveyor.backoff import Outage
from conveyor.engine.submit import RunJob, Submitter
from conveyor.queue import Location, Producer, QueueUnavailable
from conveyor.queue.admin import QueueAdmin
from conveyor.status import RunStatus
from conveyor.store import runs as run_store
from conveyor.store.db import CONNECTION_ERRORS
from conveyor.store.runs import RunWriter, Transition

log = structlog.get_logger(__name__)


def resume_job_id(run_id: str, resume_at: datetime) -> str:
    """Job id of a paused run's resumption: unique per pause, derivable from PostgreSQL."""
    return f"{run_id}:resume:{int(resume_at.timestamp() * 1000)}"


def _job_id(row: dict[str, Any]) -> str:
    """The id of the queue entry a live run should have: a paused run, and a resumed one
    still running, are carried by their resumption job."""
    if row["resume_at"] is not None:
        return resume_job_id(str(row["id"]), row["resume_at"])
    return str(row["id"])


class Reconciler:
    """Re-enqueues live runs missing from Redis and times out abandoned ones.

    Parameters: ``writer`` (its ``db`` is read); ``producer``/``admin`` on the same Redis;
    ``flow_timeout_s`` (AP_FLOW_TIMEOUT_SECONDS); ``grace_s`` how old a run must be before it
    is checked (default 30 s: an ingest commits before it enqueues); ``interval_s`` between
    passes (default 15 s).
    """

    def __init__(
        self,
        writer: RunWriter,
        producer: Producer,
        admin: QueueAdmin,
        *,
        flow_timeout_s: float,
        grace_s: float = 30.0,
        interval_s: float = 15.0,
        retention_days: int | None = None,
        retention_every_s: float = 3600.0,
    ) -> None:
        self.writer = writer
        self.producer = producer
        self.submitter = Submitter(writer, producer)
        self.admin = admin
        self.flow_timeout_s = flow_timeout_s
        self.grace_s = grace_s
        self.interval_s = interval_s
        self.retention_days = retention_days
        self.retention_every_s = retention_every_s
        self._retention_due = 0.0
        self._task: asyncio.Task[None] | None = None

    async def run_once(self, page: int = 1000) -> dict[str, int]:
        """One pass over every live run, ``page`` at a time (a backlog of runs that are fine
        must not hide the lost ones behind it); returns counts of ``requeued`` and
        ``timed_out`` runs."""
        counts = {"requeued": 0, "timed_out": 0}
        after: tuple[datetime, uuid.UUID] | None = None
        while True:
            rows = await run_store.live_runs(
                self.writer.db, older_than_s=self.grace_s, limit=page, after=after
            )
            await self._check(rows, counts)
            if len(rows) < page:
                break
            after = (rows[-1]["updated_at"], rows[-1]["id"])
        if counts["requeued"] or counts["timed_out"]:
            log.warning("reconciled runs", **counts)
        return counts

    async def _check(self, rows: list[dict[str, Any]], counts: dict[str, int]) -> None:
        now = datetime.now(UTC)
        by_queue: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            # updated_at of a RUNNING row is its last start (or resumption): time spent
            # paused in a long delay does not count against AP_FLOW_TIMEOUT_SECONDS.
            if (
                row["status"] == RunStatus.RUNNING.value
                and (now - row["updated_at"]).total_seconds() > self.flow_timeout_s + self.grace_s
            ):
                msg = f"run exceeded AP_FLOW_TIMEOUT_SECONDS ({self.flow_timeout_s:.0f} s)"
                if await self.writer.transition(
                    Transition(row["id"], RunStatus.TIMEOUT, error={"step": None, "message": msg})
                ):
                    counts["timed_out"] += 1
                continue
            # Resumptions ride the runs queue whatever queue the run came from.
            queue = "runs" if row["resume_at"] is not None else row["queue"]
            by_queue.setdefault(queue, []).append(row)
        for queue, group in by_queue.items():
            where = await self.admin.locate(queue, [_job_id(r) for r in group])
            missing = [(r["id"], r["updated_at"]) for r in group if where[_job_id(r)] is None]
            # A job acknowledged between the read above and the lookup is gone from Redis
            # because its run was committed first: a second look at PostgreSQL keeps it from
            # being enqueued (and delivered) again.
            live = await run_store.unchanged_live(self.writer.db, missing)
            for row in group:
                found = where[_job_id(row)]
                if found in (Location.STREAM, Location.DELAYED):
                    continue
                if found is None and row["id"] not in live:
                    continue
                if found is Location.DEAD:
                    # The queue gave up on it but could not end the run then (PostgreSQL was
                    # down): end it now rather than run a job again that keeps failing.
                    msg = "internal error: the job was dead-lettered"
                    await self.writer.transition(
                        Transition(
                            row["id"],
                            RunStatus.INTERNAL_ERROR,
                            error={"step": None, "message": msg},
                        )
                    )
                    continue
                if await self._requeue(queue, row, now):
                    counts["requeued"] += 1

    async def _requeue(self, queue: str, row: dict[str, Any], now: datetime) -> bool:
        """Enqueue ``row``'s job again; False when the backlog is full (the run waits for
        the next pass). Redis down ends the pass (``QueueUnavailable``)."""
        resume_at = row["resume_at"]
        job = RunJob(
            run_id=str(row["id"]),
            flow_id=str(row["flow_id"]),
            version=row["flow_version"],
            # Not fresh: the worker loads the trigger and any checkpoints from PostgreSQL.
            retry=True,
            resume=resume_at is not None,
        )
        delay = 0.0 if resume_at is None else max(0.0, (resume_at - now).total_seconds())
        sub = await self.submitter.resubmit(job, queue=queue, job_id=_job_id(row), delay_s=delay)
        if sub.outage is not None:
            raise sub.outage
        return sub.enqueued

    async def apply_retention(self) -> int:
        """Delete finished runs older than the retention (none if it is not set)."""
        if not self.retention_days:
            return 0
        deleted = await run_store.delete_older_than(self.writer.db, self.retention_days)
        if deleted:
            log.info("run history trimmed", deleted=deleted, older_than_days=self.retention_days)
        return deleted

    async def _loop(self) -> None:
        # One line when a backend goes away and one when it is back, not one per pass.
        redis = Outage("redis", "reconcile", cap_s=self.interval_s)
        postgres = Outage("postgres", "reconcile", cap_s=self.interval_s)
        while True:
            raise_if_cancelling()
            try:
                if time.monotonic() >= self._retention_due:
                    self._retention_due = time.monotonic() + self.retention_every_s
                    try:
                        await self.apply_retention()
                    except CONNECTION_ERRORS:
                        self._retention_due = 0.0  # PostgreSQL down: trim on the next pass
                        raise
                await self.run_once()
            except QueueUnavailable as exc:
                redis.failed(exc)  # the next pass tries again
            except CONNECTION_ERRORS as exc:
                postgres.failed(exc)
            except Exception:
                log.exception("reconciler pass failed")
            else:
                redis.ok()
                postgres.ok()
            await asyncio.sleep(self.interval_s)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
