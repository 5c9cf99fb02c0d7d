"""The root of Conveyor's exceptions, split by who is at fault.

::

    ConveyorError
    ├── ConfigError            misuse: a bad setting or call (SettingsError)
    ├── FlowValidationError    a bad flow document; carries paths (engine.errors.FlowInvalid)
    ├── NotFound               the named flow, run, job or secret does not exist
    ├── Conflict               the change clashes with existing state (duplicate name)
    ├── BackendUnavailable     Redis or PostgreSQL is down: 503, retry later
    ├── StepFailed             user code or a remote failed (engine.errors.StepFailed)
    │   └── SandboxLimitExceeded
    └── InternalError          our bug

The API maps this tree to JSON ``{"error": {"code", "message"}}`` in one middleware
(:mod:`conveyor.api.errors`).
"""

from __future__ import annotations


class ConveyorError(Exception):
    """Base of every error Conveyor raises on purpose; ``code`` is the API error code."""

    code = "ERROR"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(ConveyorError, ValueError):
    code = "CONFIG_ERROR"


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
