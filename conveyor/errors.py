"""The root of Conveyor's exceptions, split by who is at fault.

Every exception Conveyor raises on purpose is a :class:`ConveyorError`; private control-flow
exceptions (a name starting with ``_``) are the only others. The tree below is the real class
hierarchy (``tests/test_errors.py`` checks it); a class's module is in brackets when it is not
this one, and ``+ X`` names a second base.

::

    ConveyorError
    ├── ConfigError              misuse: a bad setting or call (+ ValueError)
    │   ├── InvalidArgument      a service was handed a value it does not take (400)
    │   ├── SettingsError        an AP_* variable is invalid [settings]
    │   ├── ItemInvalid          one item of a list variable is invalid [settings_kinds]
    │   ├── MarkersMissing       a doc has no generated-table markers [settings_doc]
    │   └── SandboxUnavailable   this host cannot isolate code as asked [sandbox.isolation]
    ├── FlowValidationError      a bad flow document; ``details`` carry the paths
    │   ├── FlowInvalid          every problem validation found [engine.errors]
    │   └── TemplateSyntaxError  a ``{{...}}`` that is not a path (+ ValueError) [engine.templating]
    ├── NotFound                 the named flow, run, job or secret does not exist
    │   ├── FlowNotFound         a webhook names no flow, or a disabled one
    │   ├── NotFound             no flow or run answers the CLI's name or id (exit 3) [cli]
    │   ├── UnknownQueue         no queue has this name [operations]
    │   └── UnknownJob           the queue holds no such job [operations]
    ├── Conflict                 the change clashes with existing state (duplicate name)
    │   ├── SignatureReplayed    a signed webhook request was already received (409)
    │   ├── IdempotencyKeyReused an Idempotency-Key came back with another body (422)
    │   ├── RunEnded             the run ended elsewhere (a cancel) while it ran [engine.worker]
    │   ├── RunFinished          a cancel named a run that already ended [operations]
    │   └── RunNotFinished       a retry named a run that has not ended [operations]
    ├── SignatureInvalid         a webhook's signature is missing, wrong or unverifiable (401)
    │   └── SignatureExpired     its timestamp is outside the tolerance (401)
    ├── BackendUnavailable       Redis or PostgreSQL is down: 503, retry later
    │   ├── IngestUnavailable    Redis down while a webhook is taken in (Retry-After: 1)
    │   ├── OutcomeUnreadable    a sync webhook's run outcome cannot be read (Retry-After: 5)
    │   └── EmbeddedError        an embedded server did not start (+ RuntimeError) [embedded]
    ├── StepFailed               user code or a remote failed [engine.errors]
    │   ├── SandboxLimitExceeded the code step hit its time or memory limit [engine.errors]
    │   ├── SsrfRefused          the http step's target is forbidden [engine.errors]
    │   ├── TemplateError        a template did not resolve against the run [engine.templating]
    │   └── ConditionError       a condition could not be evaluated [engine.conditions]
    ├── InternalError            our bug, or our infrastructure broke
    │   ├── StepInternalError    the sandbox failed under a step [engine.errors]
    │   └── ProtocolError        a sandbox peer sent a malformed frame [sandbox.protocol]
    ├── QueueError               the job queue's errors [queue.errors]
    │   ├── QueueFull            backlog at its cap: 429 [queue.errors]
    │   ├── QueueUnavailable     Redis down or read-only (+ BackendUnavailable) [queue.errors]
    │   ├── JobNotFound          no such job (+ NotFound, KeyError) [queue.errors]
    │   └── UndecodablePayload   a stream entry that is not a job (+ ValueError) [queue.job]
    ├── ApiError                 an HTTP answer decided by a handler [api.errors]
    └── ApiClientError           the API answered the CLI an error [client]

Services raise these, never HTTP answers. The API maps the tree to JSON
``{"error": {"code", "message"}}`` in one function, ``conveyor.api.errors.http_error``, which
its middleware (and the board) call: ``code`` is the class's, the HTTP status comes from its
branch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict


class ConveyorError(Exception):
    """Base of every error Conveyor raises on purpose; ``code`` is the API error code."""

    code = "ERROR"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(ConveyorError, ValueError):
    code = "CONFIG_ERROR"


class InvalidArgument(ConfigError):
    """A service was called with a value it does not accept (an unknown retry strategy)."""

    code = "BAD_REQUEST"


class ErrorDetail(TypedDict):
    """One validation problem: where (``steps[3].then[0].input.url``) and what."""

    path: str
    message: str


class FlowValidationError(ConveyorError):
    """A flow document is wrong; ``details`` lists every problem (``path`` + ``message``).

    The API answers 422 ``{"error": {"code": "FLOW_INVALID", "message", "details"}}``.
    """

    code = "FLOW_INVALID"

    def __init__(self, message: str, details: Sequence[ErrorDetail] | None = None) -> None:
        super().__init__(message)
        self.details: list[ErrorDetail] = (
            list(details) if details is not None else [{"path": "", "message": message}]
        )


class NotFound(ConveyorError):
    code = "NOT_FOUND"


class Conflict(ConveyorError):
    code = "CONFLICT"


class BackendUnavailable(ConveyorError):
    """Redis or PostgreSQL cannot be reached; ``backend`` names which."""

    code = "UNAVAILABLE"

    def __init__(self, backend: str, message: str) -> None:
        super().__init__(f"{backend} unavailable: {message}")
        self.backend = backend


class InternalError(ConveyorError):
    code = "INTERNAL_ERROR"


class FlowNotFound(NotFound):
    """A webhook names a flow that does not exist or is disabled."""

    code = "FLOW_NOT_FOUND"


class SignatureReplayed(Conflict):
    """A signed webhook request was already received (its signature is recorded once)."""

    code = "SIGNATURE_REPLAYED"


class IdempotencyKeyReused(Conflict):
    """An Idempotency-Key was used again for a request with a different body; ``run_id`` is
    the run the key belongs to."""

    code = "IDEMPOTENCY_KEY_REUSED"

    def __init__(self, message: str, run_id: str) -> None:
        super().__init__(message)
        self.run_id = run_id


class SignatureInvalid(ConveyorError):
    """A webhook's signature is missing, malformed, wrong, or its secret is not set."""

    code = "SIGNATURE_INVALID"


class SignatureExpired(SignatureInvalid):
    """A webhook's signature timestamp is too far from the server's clock."""

    code = "SIGNATURE_EXPIRED"


class IngestUnavailable(BackendUnavailable):
    """Redis is down while a webhook is taken in; ``run_id`` names the run canceled for it
    (a sync webhook), if any."""

    def __init__(self, run_id: str | None = None) -> None:
        super().__init__("Redis", "unavailable at ingest")
        self.run_id = run_id


class OutcomeUnreadable(BackendUnavailable):
    """A sync webhook's run outcome cannot be read (PostgreSQL down); the run goes on."""

    def __init__(self, run_id: str) -> None:
        super().__init__("PostgreSQL", "the run's outcome cannot be read")
        self.message = "the run's outcome cannot be read right now; poll the run"
        self.run_id = run_id
