"""Run and step statuses, re-exported for the engine: they live in :mod:`conveyor.status` so
the store can share them without importing the engine."""

from __future__ import annotations

from conveyor.status import IN_FLIGHT, STEP_COMPLETED, TERMINAL, UNSUCCESSFUL, RunStatus, StepStatus

__all__ = ["IN_FLIGHT", "STEP_COMPLETED", "TERMINAL", "UNSUCCESSFUL", "RunStatus", "StepStatus"]
