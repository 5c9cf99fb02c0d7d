"""How an execution ended: :class:`SandboxStatus`, :class:`SandboxResult`, exit mapping.

The statuses are the engine's step/run status names, so the engine stores them
as they are. :func:`explain_exit` is the mapping for a child that died without answering:
killed by the worker for its wall time or SIGXCPU → ``TIMEOUT``; killed by the kernel
(SIGKILL not ours) or aborted (SIGABRT, what an allocation failure in C code ends in) →
``MEMORY_LIMIT_EXCEEDED``; any other signal or exit → ``FAILED``; the fork-server gone →
``INTERNAL_ERROR``. A ``MemoryError`` the child could still report is mapped in the child.
"""

from __future__ import annotations

import dataclasses
import enum
import signal
from typing import Any

from conveyor.sandbox.forkserver import LOCKDOWN_FAILED
from conveyor.sandbox.limits import Limits


class SandboxStatus(enum.StrEnum):
    """Outcome of one execution; the values are the engine's step/run status names."""

    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    TIMEOUT = "TIMEOUT"
    MEMORY_LIMIT_EXCEEDED = "MEMORY_LIMIT_EXCEEDED"
    INTERNAL_ERROR = "INTERNAL_ERROR"


@dataclasses.dataclass(frozen=True, slots=True)
class SandboxResult:
    """What ``run_code`` returns: ``output`` is exactly what ``run()`` returned (JSON
    types), ``error`` the user-facing message (type, message, the user's own traceback
    lines), ``logs`` the captured stdout/stderr, ``duration_ms`` wall time in the worker."""

    status: SandboxStatus
    output: Any = None
    error: str | None = None
    logs: str = ""
    duration_ms: float = 0.0


def explain_exit(event: dict[str, Any], limits: Limits, limit_s: float) -> tuple[str, str]:  # noqa: PLR0911 - one return per way a child dies
    """Map how a child died to a status and message (see the module docstring)."""
    if event.get("lost"):
        return "INTERNAL_ERROR", "the sandbox fork-server stopped during the step"
    sig = event.get("signal")
    code = event.get("code")
    cpu = float(event.get("cpu_s") or 0.0)
    if event.get("killed"):
        return "TIMEOUT", f"step exceeded its time limit of {limit_s:g} s"
    if event.get("oom"):
        return (
            "MEMORY_LIMIT_EXCEEDED",
            f"the step's processes used more than {limits.memory_kb} KiB together "
            "(killed by the kernel at the step's memory limit)",
        )
    if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu >= limits.cpu_s):
        return "TIMEOUT", f"step exceeded its CPU time limit of {limits.cpu_s} s"
    if sig in (signal.SIGKILL, signal.SIGABRT):
        return (
            "MEMORY_LIMIT_EXCEEDED",
            f"step process was killed by {signal.Signals(sig).name} after running out of "
            f"memory (limit {limits.memory_kb} KiB)",
        )
    if sig is not None:
        name = signal.Signals(sig).name if sig in signal.Signals.__members__.values() else sig
        return "FAILED", f"step process crashed with signal {name}"
    if code == LOCKDOWN_FAILED:
        return "INTERNAL_ERROR", "the step process could not apply its sandbox limits"
    return "FAILED", f"step process exited with code {code} before returning a result"
