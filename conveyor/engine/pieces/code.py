"""The code piece: hand ``run(input)`` to the injected sandbox, map its result to the step.

The worker never executes user code itself (validation only parses it); the sandbox reports
status, output, error and captured stdout/stderr, which become the step's output and logs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from conveyor.engine.context import RunEnv
from conveyor.engine.errors import SandboxLimitExceeded, StepFailed, StepInternalError
from conveyor.engine.flow import Step
from conveyor.engine.status import StepStatus

_OK = frozenset({"SUCCEEDED", "OK", "SUCCESS"})
_STATUS = {
    "TIMEOUT": StepStatus.TIMEOUT,
    "MEMORY_LIMIT_EXCEEDED": StepStatus.MEMORY_LIMIT_EXCEEDED,
    "MEMORY_LIMIT": StepStatus.MEMORY_LIMIT_EXCEEDED,
    "OOM": StepStatus.MEMORY_LIMIT_EXCEEDED,
}


def _error_text(error: Any) -> str:
    if isinstance(error, Mapping):
        typ, msg = error.get("type"), error.get("message")
        if typ and msg is not None:
            return f"{typ}: {msg}"
        return str(msg or typ or "code step failed")
    return str(error) if error else "code step failed"


async def code(env: RunEnv, step: Step, input: Any) -> tuple[Any, str]:
    """Run the step's code in the sandbox; output is exactly what ``run()`` returned."""
    sandbox = env.services.sandbox
    if sandbox is None:
        raise StepFailed("no sandbox is configured for code steps")
    assert step.code is not None
    timeout_s = step.timeout_s or env.services.code_timeout_s
    result = await sandbox.run_code(
        flow_id=env.ctx.flow_id,
        flow_version=env.ctx.flow_version,
        step=step.name,
        code=step.code,
        input=input,
        timeout_s=timeout_s,
        # SANDBOX_PROCESS keeps all code steps of one run in one locked-down child.
        run_id=env.ctx.run_id,
    )
    status = str(result.status).upper()
    logs = result.logs or ""
    if status in _OK:
        return result.output, logs
    if status == "INTERNAL_ERROR":
        raise StepInternalError(f"sandbox: {_error_text(result.error)}")
    step_status = _STATUS.get(status, StepStatus.FAILED)
    message = _error_text(result.error)
    if step_status is StepStatus.TIMEOUT and not result.error:
        message = f"code step timed out after {timeout_s:g} s"
    limit = step_status in (StepStatus.TIMEOUT, StepStatus.MEMORY_LIMIT_EXCEEDED)
    raise (SandboxLimitExceeded if limit else StepFailed)(message, status=step_status, logs=logs)
