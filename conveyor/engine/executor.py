"""The executor: walks a compiled flow for one run, checkpointing every finished step.

:meth:`Executor.run` takes a :class:`~conveyor.engine.flow.Flow` (compiled once per version)
and a :class:`~conveyor.engine.context.RunContext`, and returns a
:class:`~conveyor.engine.context.RunOutcome`. Each finished step becomes a
:class:`~conveyor.engine.context.StepRecord` sent to the injected checkpoint sink; a
redelivered run passes the records it already has and completed steps are skipped with their
outputs restored (durable execution). Failures stop the walk by raising ``_Stop`` carrying
the outcome, so nested branches and loops unwind without status plumbing.

Restoring inside loops is keyed by (step name, iteration of the innermost loop); that key is
unique only one loop deep, so a loop nested in a loop is restored as a whole once it has
finished and otherwise re-run for the current outer iteration.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from conveyor.engine.conditions import ConditionError
from conveyor.engine.context import (
    RespondCallback,
    RunContext,
    RunEnv,
    RunError,
    RunOutcome,
    Services,
    StepRecord,
)
from conveyor.engine.errors import StepFailed, StepInternalError
from conveyor.engine.flow import Flow, Step
from conveyor.engine.pieces import PIECES
from conveyor.engine.status import RunStatus, StepStatus
from conveyor.engine.templating import LOOP, RUN, SECRETS, TRIGGER, TemplateError, redact

_RUN_STATUS = {
    StepStatus.FAILED: RunStatus.FAILED,
    StepStatus.TIMEOUT: RunStatus.TIMEOUT,
    StepStatus.MEMORY_LIMIT_EXCEEDED: RunStatus.MEMORY_LIMIT_EXCEEDED,
}
#: Extra wall time a code step gets beyond its own timeout so the sandbox, which enforces
#: the timeout itself, can report TIMEOUT with the logs before we cancel the call.
_CODE_GRACE_S = 2.0


class _Stop(Exception):
    """Unwinds the walk: the run failed (not continued) or paused."""

    def __init__(self, outcome: RunOutcome) -> None:
        super().__init__(outcome.status)
        self.outcome = outcome


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True)
class _At:
    """Where and when a step runs: its record's parent/iteration and its start times."""

    parent: str | None
    iteration: int | None
    started: datetime
    t0: float

    @classmethod
    def start(cls, parent: str | None, iteration: int | None) -> _At:
        return cls(parent, iteration, _now(), time.perf_counter())


class Executor:
    """Runs flows; one per worker process, shared by all concurrent runs.

    Parameters: ``services`` — sink, sandbox, HTTP session, SSRF policy and limits
    (see :class:`~conveyor.engine.context.Services`).
    """

    def __init__(self, services: Services) -> None:
        self.services = services

    async def run(
        self, flow: Flow, ctx: RunContext, *, on_respond: RespondCallback | None = None
    ) -> RunOutcome:
        """Execute (or resume) one run of ``flow``; never raises except on cancellation.

        ``on_respond(status, headers, body)`` is awaited as soon as a respond step runs.
        ``ctx.timeout_s`` (else ``Services.flow_timeout_s``) bounds this call.
        """
        return await _Run(self.services, flow, ctx, on_respond).execute()


class _Run:
    """State of one executing run."""

    def __init__(
        self,
        services: Services,
        flow: Flow,
        ctx: RunContext,
        on_respond: RespondCallback | None,
    ) -> None:
        self.services = services
        self.flow = flow
        self.ctx = ctx
        self.env = RunEnv(services, ctx, on_respond)
        self.secret_values = [ctx.secrets[n] for n in flow.secret_names if ctx.secrets.get(n)]
        self.scope: dict[str, Any] = {
            TRIGGER: ctx.trigger,
            RUN: {"id": ctx.run_id, "flow_id": ctx.flow_id, "version": ctx.flow_version},
            SECRETS: ctx.secrets,
        }
        self.done: dict[tuple[str, int | None], StepRecord] = {
            (r["name"], r["iteration"]): r for r in ctx.checkpoints
        }
        self.log_budget = services.max_log_bytes
        self.timeout_s = services.flow_timeout_s
        self.last_output: Any = None
        # The step in flight, so a flow timeout can be recorded against it.
        self.current: tuple[Step, _At] | None = None

    # --- entry ----------------------------------------------------------------------------

    async def execute(self) -> RunOutcome:
        self.timeout_s = self.ctx.timeout_s or self.services.flow_timeout_s
        limit = asyncio.timeout(self.timeout_s)
        try:
            async with limit:
                await self.run_steps(self.flow.steps, self.scope, None, None, 0)
        except _Stop as stop:
            return stop.outcome
        except TimeoutError:
            if not limit.expired():
                return self.internal_error("TimeoutError escaped a step")
            return await self.flow_timed_out()
        except Exception as exc:
            return self.internal_error(f"{type(exc).__name__}: {exc}")
        return RunOutcome(RunStatus.SUCCEEDED, output=self.redact(self.last_output))

    def internal_error(self, message: str) -> RunOutcome:
        step = self.current[0].name if self.current else None
        return RunOutcome(
            RunStatus.INTERNAL_ERROR,
            error={"step": step, "message": self.redact(f"internal error: {message}")},
        )

    async def flow_timed_out(self) -> RunOutcome:
        message = f"flow run exceeded its time limit of {self.services.flow_timeout_s:g} s"
        step_name = None
        if self.current is not None:
            step, at = self.current
            step_name = step.name
            await self.record(step, StepStatus.TIMEOUT, at, error=message)
        return RunOutcome(RunStatus.TIMEOUT, error={"step": step_name, "message": message})

    # --- walking --------------------------------------------------------------------------

    async def run_steps(
        self,
        steps: Sequence[Step],
        scope: dict[str, Any],
        parent: str | None,
        iteration: int | None,
        depth: int,
    ) -> None:
        done = self.done
        for step in steps:
            rec = done.get((step.name, iteration)) if done and depth <= 1 else None
            if rec is not None and rec["status"] != StepStatus.PAUSED:
                await self.restore(step, rec, scope, iteration, depth)
                continue
            typ = step.type
            if typ == "branch":
                await self.branch(step, scope, parent, iteration, depth)
            elif typ == "loop":
                await self.loop(step, scope, parent, iteration, depth)
            elif typ == "delay":
                await self.delay(step, scope, parent, iteration, depth, paused=rec)
            else:
                await self.leaf(step, scope, parent, iteration)

    async def restore(
        self,
        step: Step,
        rec: StepRecord,
        scope: dict[str, Any],
        iteration: int | None,
        depth: int,
    ) -> None:
        if rec["status"] != StepStatus.SUCCEEDED:
            if step.continue_on_failure:
                return
            raise _Stop(self.failure(step, StepStatus(rec["status"]), rec["error"] or "failed"))
        output = rec["output"]
        scope[step.name] = output
        self.last_output = output
        if step.type == "branch":
            taken = isinstance(output, dict) and output.get("branch") == "then"
            arm = step.then if taken else step.else_
            await self.run_steps(arm, scope, step.name, iteration or 0, depth)
        elif step.type == "respond" and self.env.on_respond is not None:
            # The caller may still be waiting after a redelivery; a duplicate is ignored.
            await self.env.on_respond(output["status"], output["headers"], output["body"])

    # --- records --------------------------------------------------------------------------

    def redact(self, value: Any) -> Any:
        return redact(value, self.secret_values) if self.secret_values else value

    def cap_logs(self, logs: str) -> str:
        if not logs:
            return ""
        data = logs.encode()
        if len(data) <= self.log_budget:
            self.log_budget -= len(data)
            return logs
        kept = data[: self.log_budget].decode(errors="ignore")
        self.log_budget = 0
        limit = self.services.max_log_bytes
        return f"{kept}\n[logs truncated: the run's log limit of {limit} bytes was reached]"

    async def record(
        self,
        step: Step,
        status: StepStatus,
        at: _At,
        *,
        input: Any = None,
        output: Any = None,
        error: str | None = None,
        logs: str = "",
        attempt: int = 1,
    ) -> None:
        if self.secret_values:
            input, output, logs = self.redact(input), self.redact(output), self.redact(logs)
            error = self.redact(error)
        record: StepRecord = {
            "name": step.name,
            "type": step.type,
            "status": status.value,
            "input": input,
            "output": output,
            "error": error,
            "logs": self.cap_logs(logs),
            "started_at": at.started,
            "duration_ms": int((time.perf_counter() - at.t0) * 1000),
            "attempt": attempt,
            "parent": at.parent,
            "iteration": at.iteration,
        }
        await self.services.sink.step_finished(self.ctx.run_id, record)

    def failure(self, step: Step, status: StepStatus, message: str) -> RunOutcome:
        error: RunError = {"step": step.name, "message": self.redact(message)}
        return RunOutcome(_RUN_STATUS.get(status, RunStatus.FAILED), error=error)

    async def failed(
        self,
        step: Step,
        exc: StepFailed,
        at: _At,
        *,
        input: Any = None,
        attempt: int = 1,
    ) -> None:
        """Record a failed step, then stop the run unless the step continues on failure."""
        await self.record(
            step,
            exc.status,
            at,
            input=input,
            output=exc.output,
            error=exc.message,
            logs=exc.logs,
            attempt=attempt,
        )
        if not step.continue_on_failure:
            raise _Stop(self.failure(step, exc.status, exc.message))

    async def succeeded(
        self,
        step: Step,
        scope: dict[str, Any],
        output: Any,
        at: _At,
        *,
        input: Any = None,
        logs: str = "",
        attempt: int = 1,
    ) -> None:
        scope[step.name] = output
        self.last_output = output
        await self.record(
            step,
            StepStatus.SUCCEEDED,
            at,
            input=input,
            output=output,
            logs=logs,
            attempt=attempt,
        )

    # --- step kinds -----------------------------------------------------------------------

    async def leaf(
        self, step: Step, scope: dict[str, Any], parent: str | None, iteration: int | None
    ) -> None:
        at = _At.start(parent, iteration)
        self.current = (step, at)
        try:
            inp = step.input_r.render(scope)
        except TemplateError as exc:
            await self.failed(step, StepFailed(str(exc)), at)
            return
        piece = PIECES[step.type]
        attempts, backoff = step.retry.attempts, step.retry.backoff_s
        timeout = step.timeout_s
        if timeout is not None and step.type == "code":
            timeout += _CODE_GRACE_S
        fail = StepFailed("not run")
        for attempt in range(1, attempts + 1):
            try:
                async with asyncio.timeout(timeout) if timeout is not None else nullcontext():
                    output, logs = await piece(self.env, step, inp)
            except StepFailed as exc:
                fail = exc
            except StepInternalError as exc:
                await self.record(step, StepStatus.FAILED, at, input=inp, error=str(exc))
                raise _Stop(
                    RunOutcome(
                        RunStatus.INTERNAL_ERROR,
                        error={"step": step.name, "message": self.redact(str(exc))},
                    )
                ) from None
            except TimeoutError:
                fail = StepFailed(
                    f"step timed out after {step.timeout_s:g} s", status=StepStatus.TIMEOUT
                )
            except Exception as exc:
                fail = StepFailed(f"{type(exc).__name__}: {exc}")
            else:
                await self.succeeded(step, scope, output, at, input=inp, logs=logs, attempt=attempt)
                return
            if attempt < attempts and backoff > 0:
                await asyncio.sleep(min(backoff * 2 ** (attempt - 1), 300.0))
        await self.failed(step, fail, at, input=inp, attempt=attempts)

    async def branch(
        self,
        step: Step,
        scope: dict[str, Any],
        parent: str | None,
        iteration: int | None,
        depth: int,
    ) -> None:
        at = _At.start(parent, iteration)
        self.current = (step, at)
        assert step.when_c is not None
        try:
            taken = step.when_c.evaluate(scope)
        except (TemplateError, ConditionError) as exc:
            await self.failed(step, StepFailed(str(exc)), at)
            return
        arm = "then" if taken else "else"
        await self.succeeded(step, scope, {"branch": arm}, at)
        steps = step.then if taken else step.else_
        await self.run_steps(steps, scope, step.name, iteration or 0, depth)

    async def loop(
        self,
        step: Step,
        scope: dict[str, Any],
        parent: str | None,
        iteration: int | None,
        depth: int,
    ) -> None:
        at = _At.start(parent, iteration)
        self.current = (step, at)
        assert step.items_r is not None
        try:
            items = step.items_r.render(scope)
        except TemplateError as exc:
            await self.failed(step, StepFailed(str(exc)), at)
            return
        if not isinstance(items, list | tuple):
            kind = type(items).__name__ if items is not None else "null"
            await self.failed(step, StepFailed(f"loop items must be a list, got {kind}"), at)
            return
        limit = self.services.max_loop_iterations
        if len(items) > limit:
            msg = f"loop over {len(items)} items exceeds the limit of {limit}"
            await self.failed(step, StepFailed(msg), at)
            return
        names = step.iteration_names
        results: list[dict[str, Any]] = []
        index = 0
        try:
            async with asyncio.timeout(step.timeout_s) if step.timeout_s else nullcontext():
                for index, item in enumerate(items):
                    child = dict(scope)
                    child[LOOP] = {"item": item, "index": index}
                    await self.run_steps(step.steps, child, step.name, index, depth + 1)
                    results.append({n: child[n] for n in names if n in child})
        except _Stop as stop:
            if stop.outcome.status is RunStatus.PAUSED:
                raise
            err = stop.outcome.error
            inner = f'step "{err["step"]}": {err["message"]}' if err else "failed"
            await self.record(step, StepStatus.FAILED, at, error=f"iteration {index}: {inner}")
            if not step.continue_on_failure:
                raise
            return
        except TimeoutError:
            timed_out = StepFailed(
                f"loop timed out after {step.timeout_s:g} s", status=StepStatus.TIMEOUT
            )
            await self.failed(step, timed_out, at)
            return
        self.current = (step, at)
        await self.succeeded(step, scope, results, at)

    async def delay(
        self,
        step: Step,
        scope: dict[str, Any],
        parent: str | None,
        iteration: int | None,
        depth: int,
        *,
        paused: StepRecord | None,
    ) -> None:
        at = _At.start(parent, iteration)
        self.current = (step, at)
        if paused is not None:
            resume_at = datetime.fromisoformat(paused["output"]["resume_at"])
            # Woken early (a clock skew or an eager reconciler): pause again, same deadline.
            if at.started + timedelta(seconds=0.5) < resume_at:
                raise _Stop(RunOutcome(RunStatus.PAUSED, resume_at=resume_at))
            out = {"resumed_at": at.started.isoformat()}
            at.started = paused["started_at"]
            await self.succeeded(step, scope, out, at, input=paused["input"])
            return
        try:
            inp = step.input_r.render(scope)
            seconds = float(inp["seconds"])
            if not 0 <= seconds < 10**9:
                raise ValueError
        except TemplateError as exc:
            await self.failed(step, StepFailed(str(exc)), at)
            return
        except (TypeError, ValueError, KeyError):
            msg = "delay seconds must be a number ≥ 0"
            await self.failed(step, StepFailed(msg), at)
            return
        if seconds < self.services.pause_threshold_s:
            await asyncio.sleep(seconds)
            out = {"resumed_at": _now().isoformat()}
            await self.succeeded(step, scope, out, at, input=inp)
            return
        if depth > 1:
            msg = "delays of 5 s or more cannot pause a run inside a nested loop"
            await self.failed(step, StepFailed(msg), at, input=inp)
            return
        resume_at = at.started + timedelta(seconds=seconds)
        await self.record(
            step,
            StepStatus.PAUSED,
            at,
            input=inp,
            output={"resume_at": resume_at.isoformat()},
        )
        raise _Stop(RunOutcome(RunStatus.PAUSED, resume_at=resume_at))
