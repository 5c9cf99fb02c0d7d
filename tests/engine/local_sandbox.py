"""A plain subprocess implementation of the engine's Sandbox interface, for engine tests.

One fresh ``python -I`` per code step, in its own session, no ``AP_*`` variables, an
address-space rlimit and a wall-time limit that kills the process group — but no isolation
beyond that, so unlike the real :mod:`conveyor.sandbox` a step can read and write the host's
files, which the executor's retry tests use to count attempts. Production uses the fork-server.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import orjson

from conveyor.status import StepStatus

MAX_OUTPUT_BYTES: Final = 16 * 1024 * 1024

# Runs in the child. User stdout/stderr are captured in buffers so the real stdout carries
# only our one JSON result line; the result is produced with the stdlib json module so the
# child needs nothing outside the standard library.
_RUNNER: Final = r"""
import asyncio, io, json, resource, sys, traceback
req = json.loads(sys.stdin.buffer.read())
limit = req["memory_kb"] * 1024
if limit > 0:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
out = sys.stdout
buf = io.StringIO()
sys.stdout = sys.stderr = buf
res = {}
try:
    ns = {"__name__": "__step__"}
    exec(compile(req["code"], "<step>", "exec"), ns)
    value = ns["run"](req["input"])
    if asyncio.iscoroutine(value):
        value = asyncio.run(value)
    res = {"status": "SUCCEEDED", "output": json.loads(json.dumps(value))}
except MemoryError:
    res = {"status": "MEMORY_LIMIT_EXCEEDED", "error": "MemoryError: memory limit exceeded"}
except BaseException as exc:
    tb = traceback.extract_tb(exc.__traceback__)
    line = next((f.lineno for f in reversed(tb) if f.filename == "<step>"), None)
    where = f" (line {line})" if line else ""
    res = {"status": "FAILED", "error": f"{type(exc).__name__}: {exc}{where}"}
res["logs"] = buf.getvalue()
try:
    data = json.dumps(res)
except BaseException as exc:
    res = {"status": "FAILED", "error": f"result is not JSON: {exc}", "logs": res["logs"]}
    data = json.dumps(res)
out.write(data)
out.flush()
"""


@dataclass(frozen=True, slots=True)
class SandboxResult:
    """A ``SandboxResult`` look-alike; ``status`` is a StepStatus value."""

    status: str
    output: Any = None
    error: str | None = None
    logs: str = ""
    duration_ms: float = 0.0


class LocalSandbox:
    """Runs code steps in a plain child process per call.

    Parameters: ``python`` interpreter path (default: this one); ``memory_kb`` address-space
    limit per child (AP_SANDBOX_MEMORY_LIMIT, default 1 GiB; 0 disables).
    """

    def __init__(self, *, python: str | None = None, memory_kb: int = 1_048_576) -> None:
        self.python = python or sys.executable
        self.memory_kb = memory_kb
        self.env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}

    async def run_code(
        self,
        *,
        flow_id: str,
        flow_version: int,
        step: str,
        code: str,
        input: Any,
        timeout_s: float,
        run_id: str | None = None,
        on_started: Callable[[], object] | None = None,
    ) -> SandboxResult:
        """Execute ``run(input)`` from ``code`` in a child; never raises for user errors
        (``on_started()`` once the child is started)."""
        t0 = time.perf_counter()
        request = orjson.dumps({"code": code, "input": input, "memory_kb": self.memory_kb})
        try:
            proc = await asyncio.create_subprocess_exec(
                self.python,
                "-I",
                "-c",
                _RUNNER,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=self.env,
                start_new_session=True,
                cwd="/",
            )
        except OSError as exc:
            # Our failure, not the step's: the engine ends the run INTERNAL_ERROR.
            return SandboxResult(status="INTERNAL_ERROR", error=f"cannot start sandbox: {exc}")
        if on_started is not None:
            on_started()
        try:
            async with asyncio.timeout(timeout_s):
                stdout, stderr = await proc.communicate(request)
        except TimeoutError:
            return SandboxResult(
                status=StepStatus.TIMEOUT.value,
                error=f"code step timed out after {timeout_s:g} s",
                duration_ms=(time.perf_counter() - t0) * 1000,
            )
        finally:
            # Kill the whole session: the step may have started processes of its own.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            if proc.returncode is None:
                await proc.wait()
        duration_ms = (time.perf_counter() - t0) * 1000
        if len(stdout) > MAX_OUTPUT_BYTES:
            return SandboxResult(
                status=StepStatus.FAILED.value,
                error=f"code step output larger than {MAX_OUTPUT_BYTES} bytes",
                duration_ms=duration_ms,
            )
        try:
            res = orjson.loads(stdout)
        except orjson.JSONDecodeError:
            tail = stderr.decode(errors="replace")[-500:]
            status = StepStatus.FAILED.value
            if "MemoryError" in tail:
                status = StepStatus.MEMORY_LIMIT_EXCEEDED.value
            return SandboxResult(
                status=status,
                error=f"code step process exited with {proc.returncode}: {tail}".strip(),
                duration_ms=duration_ms,
            )
        return SandboxResult(
            status=res["status"],
            output=res.get("output"),
            error=res.get("error"),
            logs=res.get("logs", ""),
            duration_ms=duration_ms,
        )
