"""Engine exceptions, split by who is at fault.

::

    Exception
    ├── FlowInvalid        the flow document is wrong (422 FLOW_INVALID, carries paths)
    ├── StepFailed         a step failed at run time: user code, a remote, a template
    │   └── SsrfRefused    the http step's target is a forbidden address
    └── StepInternalError  our side broke while running a step (sandbox down): the run
                           ends INTERNAL_ERROR, not FAILED, and is not retried in place

Template and condition failures (:class:`~conveyor.engine.templating.TemplateError`,
:class:`~conveyor.engine.conditions.ConditionError`) become ``StepFailed`` inside the
executor. When the project-wide ``ConveyorError`` root lands, these re-parent onto it
(``FlowInvalid`` is the style guide's ``FlowValidationError``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypedDict

from conveyor.engine.status import StepStatus


class ErrorDetail(TypedDict):
    """One validation problem: where (``steps[3].then[0].input.url``) and what."""

    path: str
    message: str


class FlowInvalid(Exception):
    """A flow document failed validation; ``details`` lists every problem found.

    The API answers 422 ``{"error": {"code": "FLOW_INVALID", "message", "details"}}``.
    """

    code = "FLOW_INVALID"

    def __init__(self, details: Sequence[ErrorDetail]) -> None:
        self.details: list[ErrorDetail] = list(details)
        first = self.details[0] if self.details else None
        summary = f"{first['path']}: {first['message']}" if first else "invalid flow"
        more = len(self.details) - 1
        self.message = summary + (f" (and {more} more)" if more > 0 else "")
        super().__init__(self.message)


FlowValidationError = FlowInvalid


class StepFailed(Exception):
    """A step failed; ``status`` is the step status to record (FAILED, TIMEOUT, …)."""

    def __init__(
        self,
        message: str,
        *,
        status: StepStatus = StepStatus.FAILED,
        logs: str = "",
        output: Any = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.logs = logs
        #: What the step produced before failing (an http error response), for the record.
        self.output = output


class SsrfRefused(StepFailed):
    """The http step tried to reach an address SSRF protection forbids."""


class StepInternalError(Exception):
    """Infrastructure under a step failed (e.g. the sandbox reported INTERNAL_ERROR)."""
