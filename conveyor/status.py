"""Run and step statuses shared by the engine, the store, the API and the board.

Statuses are ``str`` enums so they serialise as their names in JSON and in Postgres text
columns without conversion; the named sets say which statuses end a run and which ones the
worker may still move forward, so callers never spell those lists out themselves.
"""

from __future__ import annotations

import enum


class RunStatus(enum.StrEnum):
    """Lifecycle state of one flow run (see docs/architecture.md)."""

    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    PAUSED = "PAUSED"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    TIMEOUT = "TIMEOUT"
    INTERNAL_ERROR = "INTERNAL_ERROR"
    CANCELED = "CANCELED"
    MEMORY_LIMIT_EXCEEDED = "MEMORY_LIMIT_EXCEEDED"


#: A run in one of these states never changes again (except through a user's retry,
#: which creates a new attempt).
TERMINAL: frozenset[RunStatus] = frozenset(
    {
        RunStatus.SUCCEEDED,
        RunStatus.FAILED,
        RunStatus.TIMEOUT,
        RunStatus.INTERNAL_ERROR,
        RunStatus.CANCELED,
        RunStatus.MEMORY_LIMIT_EXCEEDED,
    }
)
#: States the reconciler must keep alive (re-enqueue when their queue entry is gone).
IN_FLIGHT: frozenset[RunStatus] = frozenset({RunStatus.QUEUED, RunStatus.RUNNING, RunStatus.PAUSED})
#: Terminal states a sync webhook answers with 500 (everything terminal but success).
UNSUCCESSFUL: frozenset[RunStatus] = TERMINAL - {RunStatus.SUCCEEDED}


class StepStatus(enum.StrEnum):
    """Outcome of one step record; ``SKIPPED`` is never recorded for an untaken branch arm
    (those steps are absent), only for steps not reached because the run stopped."""

    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    TIMEOUT = "TIMEOUT"
    MEMORY_LIMIT_EXCEEDED = "MEMORY_LIMIT_EXCEEDED"
    PAUSED = "PAUSED"
    #: A paused step (a pausing delay) whose run was canceled: it will never resume.
    CANCELED = "CANCELED"


#: Step statuses that count as "done" for durable resumption: such a step is not re-run.
STEP_COMPLETED: frozenset[StepStatus] = frozenset({StepStatus.SUCCEEDED})
