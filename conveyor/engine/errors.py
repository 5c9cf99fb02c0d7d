"""Engine exceptions, on the project's error tree (:mod:`conveyor.errors` draws all of it).

::

    FlowValidationError
    └── FlowInvalid            the flow document is wrong (422 FLOW_INVALID, carries paths)
    StepFailed                 a step failed at run time: user code, a remote, a template
    ├── SandboxLimitExceeded   the code step hit its time or memory limit
    └── SsrfRefused            the http step's target is a forbidden address
    InternalError
    └── StepInternalError      our side broke while running a step (sandbox down): the run
                               ends INTERNAL_ERROR, not FAILED, and is not retried in place

Template and condition failures (:class:`~conveyor.engine.templating.TemplateError`,
:class:`~conveyor.engine.conditions.ConditionError`) are ``StepFailed`` too; the executor
records them on the step that rendered or evaluated them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from conveyor.errors import ConveyorError, ErrorDetail, FlowValidationError, InternalError
from conveyor.status import StepStatus

__all__ = [
    "ErrorDetail",
    "FlowInvalid",
    "FlowValidationError",
    "SandboxLimitExceeded",
    "SsrfRefused",
    "StepFailed",
    "StepInternalError",
]


class FlowInvalid(FlowValidationError):
    """A flow document failed validation; ``details`` lists every problem found.

    The API answers 422 ``{"error": {"code": "FLOW_INVALID", "message", "details"}}``.
    """

    def __init__(self, details: Sequence[ErrorDetail]) -> None:
        details = list(details)
        first = details[0] if details else None
        summary = f"{first['path']}: {first['message']}" if first else "invalid flow"
        more = len(details) - 1
        super().__init__(summary + (f" (and {more} more)" if more > 0 else ""), details)


class StepFailed(ConveyorError):
    """A step failed; ``status`` is the step status to record (FAILED, TIMEOUT, …)."""

    code = "STEP_FAILED"

    def __init__(
        self,
        message: str,
        *,
        status: StepStatus = StepStatus.FAILED,
        logs: str = "",
        output: Any = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.logs = logs
        #: What the step produced before failing (an http error response), for the record.
        self.output = output


class SandboxLimitExceeded(StepFailed):
    """The sandbox stopped a code step at its time or memory limit (``status`` says which)."""


class SsrfRefused(StepFailed):
    """The http step tried to reach an address SSRF protection forbids."""


class StepInternalError(InternalError):
    """Infrastructure under a step failed (e.g. the sandbox reported INTERNAL_ERROR)."""
