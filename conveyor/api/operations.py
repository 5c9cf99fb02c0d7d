"""What a user can do to runs and flows, shared by the API handlers and the board.

Handlers parse requests and render answers; these functions hold the one implementation of
each action (retry, cancel, enable/disable), so ``POST /api/v1/flow-runs/{id}/retry`` and the
board's retry button cannot drift apart.
"""

from __future__ import annotations

import contextlib
import uuid
from typing import Any

from aiohttp import web

from conveyor.api.errors import ApiError
from conveyor.engine.submit import RunJob
from conveyor.errors import NotFound
from conveyor.keys import DB, REDIS, REGISTRY, RUN_WRITER, SETTINGS, SUBMITTER
from conveyor.queue import QueueAdmin, QueueConfig
from conveyor.status import RunStatus
from conveyor.store import flows as flow_store
from conveyor.store import runs as run_store
from conveyor.store.flows import FlowRecord

RETRY_STRATEGIES = ("FROM_FAILED_STEP", "ON_LATEST_VERSION")


async def retry_run(app: web.Application, run_id: uuid.UUID, strategy: str) -> dict[str, Any]:
    """Retry a finished run: ``FROM_FAILED_STEP`` keeps the steps before the failed one (same
    version),
    ``ON_LATEST_VERSION`` starts over on the flow's current version. Returns the run row."""
    if strategy not in RETRY_STRATEGIES:
        raise ApiError(400, "BAD_REQUEST", f"strategy must be one of {', '.join(RETRY_STRATEGIES)}")
    db = app[DB]
    row = await run_store.get_run(db, run_id)
    version = row["flow_version"]
    if strategy == "ON_LATEST_VERSION":
        version = (await flow_store.get_flow(db, row["flow_id"])).version
    result = await run_store.reset_for_retry(
        db, run_id, flow_version=version, keep_steps=strategy == "FROM_FAILED_STEP"
    )
    if not result["retried"]:
        raise ApiError(
            409, "RUN_NOT_FINISHED", f"run is {result['status']}; only finished runs retry"
        )
    job = RunJob(run_id=str(run_id), flow_id=str(row["flow_id"]), version=version, retry=True)
    # The run is QUEUED in PostgreSQL: if Redis is down or the backlog full right now, the
    # reconciler enqueues it later, as it does for any accepted run.
    await app[SUBMITTER].resubmit(job)
    return await run_store.get_run(db, run_id)


async def cancel_run(app: web.Application, run_id: uuid.UUID) -> dict[str, Any]:
    """Cancel a queued, running or paused run; 409 if it already ended otherwise."""
    db = app[DB]
    await run_store.get_run(db, run_id)
    changed = await app[RUN_WRITER].transition(
        run_store.Transition(
            run_id, RunStatus.CANCELED, error={"step": None, "message": "canceled by user"}
        )
    )
    row = await run_store.get_run(db, run_id)
    if not changed and row["status"] != RunStatus.CANCELED.value:
        raise ApiError(409, "RUN_FINISHED", f"run already ended as {row['status']}")
    return row


async def set_flow_enabled(app: web.Application, flow_id: uuid.UUID, enabled: bool) -> FlowRecord:
    """Enable or disable a flow (webhooks of a disabled flow answer 404)."""
    flow = await flow_store.set_enabled(app[DB], flow_id, enabled)
    app[REGISTRY].invalidate(flow_id)
    return flow


def _run_of_job(job_id: str) -> uuid.UUID | None:
    """The run a queue job carries: its id is the run id (``{run}:resume:{ms}`` for a
    resumption)."""
    try:
        return uuid.UUID(job_id.split(":", 1)[0])
    except ValueError:
        return None


async def retry_dead_job(app: web.Application, queue: str, job_id: str) -> str:
    """Put a dead-lettered job back, and its run back to ``QUEUED`` (from the start): the run
    ended ``INTERNAL_ERROR`` when the job died, and a worker skips runs that already ended.
    Returns the job's new stream entry id; ``JobNotFound`` if it is not dead-lettered."""
    run_id = _run_of_job(job_id)
    if run_id is not None:
        with contextlib.suppress(NotFound):
            row = await run_store.get_run(app[DB], run_id)
            await run_store.reset_for_retry(
                app[DB], run_id, flow_version=row["flow_version"], keep_steps=False
            )
    return await QueueAdmin(app[REDIS], QueueConfig.from_settings(app[SETTINGS])).retry_dead(
        queue, job_id
    )
