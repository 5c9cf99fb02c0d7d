"""The code piece: hand ``run(input)`` to the injected sandbox, map its result to the step.

The worker never executes user code itself (validation only parses it); the sandbox reports
status, output, error and captured stdout/stderr, which become the step's output and logs.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from conveyor.engine.errors import SandboxLimitExceeded, StepFailed, StepInternalError
from conveyor.engine.schema import INPUT, step_schema
from conveyor.engine.spec import Checks, StepSpec, StepType
from conveyor.status import StepStatus

if TYPE_CHECKING:
    from conveyor.engine.context import RunEnv
    from conveyor.engine.flow import Step

MAX_CODE_CHARS: Final = 1_000_000
#: Extra wall time a code step gets beyond its own timeout so the sandbox, which enforces
#: the timeout itself, can report TIMEOUT with the logs before we cancel the call.
CODE_GRACE_S: Final = 2.0

_OK = frozenset({"SUCCEEDED", "OK", "SUCCESS"})
_STATUS = {
    "TIMEOUT": StepStatus.TIMEOUT,
    "MEMORY_LIMIT_EXCEEDED": StepStatus.MEMORY_LIMIT_EXCEEDED,
    "MEMORY_LIMIT": StepStatus.MEMORY_LIMIT_EXCEEDED,
    "OOM": StepStatus.MEMORY_LIMIT_EXCEEDED,
}


def check(v: Checks, step: Mapping[str, Any], p: str) -> None:
    """``code`` is Python source that compiles and defines ``run(input)``."""
    p = f"{p}.code"
    code = step.get("code")
    if not isinstance(code, str) or not code.strip():
        v.err(p, "is required: Python source defining run(input)")
        return
    if len(code) > MAX_CODE_CHARS:
        v.err(p, f"is longer than {MAX_CODE_CHARS} characters")
        return
    # Parse only, never execute: the worker must not run user code outside the sandbox.
    try:
        tree = ast.parse(code, filename="<step>", mode="exec")
        # Bytecode compilation (still no execution) catches what the parser lets through,
        # e.g. `return` or `await` outside a function.
        compile(tree, "<step>", "exec", dont_inherit=True)
    except SyntaxError as exc:
        v.err(p, f"does not compile: {exc.msg} (line {exc.lineno})")
        return
    except (ValueError, RecursionError, MemoryError) as exc:
        v.err(p, f"does not compile: {type(exc).__name__}: {exc}")
        return
    if not any(
        isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name == "run" for n in tree.body
    ):
        v.err(p, "must define a top-level function run(input) (def or async def)")


def _compile(raw: Mapping[str, Any], children: Mapping[str, Any]) -> Mapping[str, Any]:
    return {"code": raw.get("code")}


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
    # The worker's sink hears when the code starts (it may owe the run's RUNNING write).
    started = env.on_code_start
    extra = {"on_started": started} if started is not None else {}
    result = await sandbox.run_code(
        flow_id=env.ctx.flow_id,
        flow_version=env.ctx.flow_version,
        step=step.name,
        code=step.code,
        input=input,
        timeout_s=timeout_s,
        # SANDBOX_PROCESS keeps all code steps of one run in one locked-down child.
        run_id=env.ctx.run_id,
        **extra,
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


SPEC: Final = StepSpec(
    StepType.CODE,
    keys=frozenset({"input", "code"}),
    check=check,
    compile=_compile,
    piece=code,
    timeout_grace_s=CODE_GRACE_S,
    schema=step_schema(
        "code",
        "Python run in a sandboxed process. Output: what run(input) returned (JSON).",
        {
            "code": {
                "type": "string",
                "description": "Python source defining def run(input) or async def run(input)",
            },
            "input": {**INPUT, "default": {}},
        },
        ("code",),
    ),
)
