"""The executor: walks a compiled flow for one run, checkpointing every finished step.

:meth:`Executor.run` takes a :class:`~conveyor.engine.flow.Flow` (compiled once per version)
and a :class:`~conveyor.engine.context.RunContext`, and returns a
:class:`~conveyor.engine.context.RunOutcome`. Each finished step becomes a
:class:`~conveyor.engine.context.StepRecord` sent to the injected checkpoint sink; a
redelivered run passes the records it already has and completed steps are skipped with their
outputs restored (durable execution). Failures stop the walk by raising ``Stop`` carrying
the outcome, so nested branches and loops unwind without status plumbing. What a step does is its
type's :class:`~conveyor.engine.spec.StepSpec`: a leaf *piece* run here with retries and a
timeout, or a walk function (branch, loop, delay) that steers the walk through this run.

Restoring inside loops is keyed by (step name, iteration of the innermost loop); that key is
unique only one loop deep, so a loop nested in a loop is restored as a whole once it has
finished and otherwise re-run for the current outer iteration.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

from conveyor.engine.context import (
    CheckpointSink,
    RespondCallback,
    RunContext,
    RunEnv,
    RunError,
    RunOutcome,
    Services,
    StepRecord,
    slot_maker,
    step_record,
)
from conveyor.engine.errors import StepFailed, StepInternalError
from conveyor.engine.flow import Flow, Step
from conveyor.engine.spec import At, Piece, Stop, Where, now
from conveyor.engine.templating import RUN, SECRETS, TRIGGER, TemplateError, redact
from conveyor.status import RunStatus, StepStatus

#: ``RunOutcome(status, output, error, resume_at)`` and ``RunEnv(services, ctx, on_respond,
#: on_code_start)``
#: positionally, built without their ``__init__`` (one each per run).
_outcome = slot_maker(RunOutcome)
_run_env = slot_maker(RunEnv)
_where = slot_maker(Where)
#: Where every top-level step of a run is (immutable, so shared).
_TOP = Where(None, None, 0)

_SUCCEEDED: str = StepStatus.SUCCEEDED.value

_RUN_STATUS = {
    StepStatus.FAILED: RunStatus.FAILED,
    StepStatus.TIMEOUT: RunStatus.TIMEOUT,
    StepStatus.MEMORY_LIMIT_EXCEEDED: RunStatus.MEMORY_LIMIT_EXCEEDED,
}


#: Flow time limits this long or longer are watched by the executor's shared watchdog, which
#: looks at the runs in flight every :data:`WATCH_TICK_S`, instead of by an event-loop timer
#: of their own (arming and cancelling one per run cost more than the rest of a short run's
#: bookkeeping but its steps); such a limit ends a run up to ``WATCH_TICK_S`` late. Shorter
#: limits keep a precise timer each.
WATCHED_LIMIT_S = 10.0
WATCH_TICK_S = 0.25


class _Limit:
    """One run's flow time limit under the shared watchdog: ``asyncio.Timeout``'s rules
    (the task's cancel, and only that one, becomes ``TimeoutError`` on exit; ``expired()``)
    without a timer of its own — the watchdog cancels the task once ``deadline`` (on the
    loop's clock) has passed."""

    __slots__ = ("_expired", "cancelling", "deadline", "dog", "task")

    def __init__(self, dog: _Watchdog, task: asyncio.Task[Any], deadline: float) -> None:
        self.dog = dog
        self.task = task
        self.deadline = deadline
        self.cancelling = 0
        self._expired = False

    def expired(self) -> bool:
        return self._expired

    def expire(self) -> None:
        self._expired = True
        self.task.cancel()

    def enter(self) -> None:
        """Start watching (``async with``'s entry, without a coroutine)."""
        self.cancelling = self.task.cancelling()
        self.dog.add(self)

    def leave(self, exc_type: type[BaseException] | None, exc: BaseException | None) -> None:
        """Stop watching; raises ``TimeoutError`` where ``asyncio.Timeout`` would."""
        self.dog.limits.pop(self, None)
        # Spent: the cancel it sent is taken back, and answered with TimeoutError unless
        # someone else asked for a cancel too (as asyncio.Timeout.__aexit__ decides).
        if (
            self._expired
            and self.task.uncancel() <= self.cancelling
            and exc_type is asyncio.CancelledError
        ):
            raise TimeoutError from exc

    async def __aenter__(self) -> _Limit:
        self.enter()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: Any, tb: Any) -> None:
        self.leave(exc_type, exc)


class _Watchdog:
    """Expires the flow time limits of the runs in flight on one event loop: every
    :data:`WATCH_TICK_S` while any is registered, the task of a run past its deadline is
    cancelled, as its own ``asyncio.Timeout`` would have done."""

    __slots__ = ("handle", "limits", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.limits: dict[_Limit, float] = {}
        self.handle: asyncio.TimerHandle | None = None

    def limit(self, timeout_s: float) -> _Limit | None:
        """A limit of ``timeout_s`` from now for the current task (``None`` outside one)."""
        task = asyncio.current_task()
        if task is None:
            return None
        return _Limit(self, task, self.loop.time() + timeout_s)

    def add(self, limit: _Limit) -> None:
        self.limits[limit] = limit.deadline
        if self.handle is None:
            self.handle = self.loop.call_later(WATCH_TICK_S, self._tick)

    def discard(self, limit: _Limit) -> None:
        self.limits.pop(limit, None)

    def _tick(self) -> None:
        self.handle = None
        now = self.loop.time()
        for limit in [t for t, deadline in self.limits.items() if deadline <= now]:
            del self.limits[limit]
            limit.expire()
        if self.limits:
            self.handle = self.loop.call_later(WATCH_TICK_S, self._tick)


class Executor:
    """Runs flows; one per worker process, shared by all concurrent runs.

    Parameters: ``services`` — sink, sandbox, HTTP session, SSRF policy and limits
    (see :class:`~conveyor.engine.context.Services`).
    """

    def __init__(self, services: Services) -> None:
        self.services = services
        self._watchdog: _Watchdog | None = None

    def watchdog(self) -> _Watchdog:
        """The watchdog of the running event loop."""
        loop = asyncio.get_running_loop()
        dog = self._watchdog
        if dog is None or dog.loop is not loop:
            dog = self._watchdog = _Watchdog(loop)
        return dog

    def run(
        self,
        flow: Flow,
        ctx: RunContext,
        *,
        on_respond: RespondCallback | None = None,
        sink: CheckpointSink | None = None,
    ) -> Coroutine[Any, Any, RunOutcome]:
        """Execute (or resume) one run of ``flow`` (awaited: the run's coroutine itself, no
        wrapper); never raises except on cancellation.

        ``on_respond(status, headers, body)`` is awaited as soon as a respond step runs.
        ``ctx.timeout_s`` (else ``Services.flow_timeout_s``) bounds this call. ``sink``
        receives this run's records instead of ``Services.sink``.
        """
        return _Run(self.services, flow, ctx, on_respond, sink).execute(self)


class _Run:
    """State of one executing run."""

    def __init__(
        self,
        services: Services,
        flow: Flow,
        ctx: RunContext,
        on_respond: RespondCallback | None,
        sink: CheckpointSink | None = None,
    ) -> None:
        self.services = services
        self.flow = flow
        self.ctx = ctx
        self.run_id = ctx.run_id
        self.sink = sink = sink if sink is not None else services.sink
        self.env = _run_env(services, ctx, on_respond, getattr(sink, "code_started", None))
        # (Comprehensions are calls of their own: skipped when there is nothing to walk.)
        self.secret_values = (
            [ctx.secrets[n] for n in flow.secret_names if ctx.secrets.get(n)]
            if flow.secret_names
            else []
        )
        self.scope: dict[str, Any] = {
            TRIGGER: ctx.trigger,
            RUN: {"id": ctx.run_id, "flow_id": ctx.flow_id, "version": ctx.flow_version},
            SECRETS: ctx.secrets,
        }
        self.done: dict[tuple[str, int | None], StepRecord] = (
            {(r.name, r.iteration): r for r in ctx.checkpoints} if ctx.checkpoints else {}
        )
        # Optional on a sink: told before each step starts (the worker's makes held
        # checkpoints durable before a step with effects).
        self.before_step: Callable[[str, str], Awaitable[None]] | None = getattr(
            sink, "before_step", None
        )
        # Their forms without a coroutine, where the sink has them (see CheckpointSink).
        self.pre_step: Callable[[str, str], Awaitable[None] | None] | None = getattr(
            sink, "pre_step", None
        )
        self.checkpoint: Callable[[str, StepRecord], Awaitable[None] | None] | None = getattr(
            sink, "checkpoint", None
        )
        self.log_budget = services.max_log_bytes
        self.timeout_s = services.flow_timeout_s
        self.last_output: Any = None
        # The step in flight, so a flow timeout can be recorded against it.
        self.current: tuple[Step, At] | None = None

    # --- the walker side walk functions see (conveyor.engine.spec.Walker) ------------------

    def start(self, step: Step, where: Where) -> At:
        """Start timing ``step`` and make it the step a flow timeout is recorded against."""
        at = At(where.parent, where.iteration, now(), time.perf_counter())
        self.current = (step, at)
        return at

    def track(self, step: Step, at: At) -> None:
        """Make ``step`` the step in flight again (after its children ran)."""
        self.current = (step, at)

    # --- entry ----------------------------------------------------------------------------

    async def execute(self, executor: Executor | None = None) -> RunOutcome:
        self.timeout_s = timeout_s = self.ctx.timeout_s or self.services.flow_timeout_s
        # A long limit is watched (see WATCHED_LIMIT_S): no timer of its own.
        watched = (
            executor.watchdog().limit(timeout_s)
            if executor is not None and timeout_s >= WATCHED_LIMIT_S
            else None
        )
        limit = watched if watched is not None else asyncio.timeout(timeout_s)
        try:
            if watched is None:
                async with limit:
                    await self.run_steps(self.flow.steps, self.scope, None, None, 0)
            else:
                # ``async with watched`` without its two coroutines.
                watched.enter()
                try:
                    await self.run_steps(self.flow.steps, self.scope, None, None, 0)
                except BaseException as exc:
                    watched.leave(type(exc), exc)
                    raise
                watched.leave(None, None)
        except Stop as stop:
            return stop.outcome
        except TimeoutError:
            if not limit.expired():
                return self.internal_error("TimeoutError escaped a step")
            return await self.flow_timed_out()
        except Exception as exc:
            return self.internal_error(f"{type(exc).__name__}: {exc}")
        return _outcome(RunStatus.SUCCEEDED, self.redact(self.last_output))

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
        done = self.done if depth <= 1 else None
        before_step = self.before_step
        pre_step = self.pre_step
        # Immutable: one for every step of this list that does not resume a pause.
        top = parent is None and iteration is None and depth == 0
        plain = _TOP if top else _where(parent, iteration, depth)
        for step in steps:
            where = plain
            if done:
                rec = done.get((step.name, iteration))
                if rec is not None:
                    if rec.status != StepStatus.PAUSED:
                        await self.restore(step, rec, scope, plain)
                        continue
                    where = Where(parent, iteration, depth, paused=rec)
            if pre_step is not None:
                pending = pre_step(self.run_id, step.type)
                if pending is not None:
                    await pending
            elif before_step is not None:
                await before_step(self.run_id, step.type)
            spec = step.spec
            if spec.walk is not None:
                await spec.walk(self, step, scope, where)
            else:
                assert spec.piece is not None
                await self.leaf(step, spec.piece, scope, where)

    async def restore(
        self,
        step: Step,
        rec: StepRecord,
        scope: dict[str, Any],
        where: Where,
    ) -> None:
        if rec.status != StepStatus.SUCCEEDED:
            if step.continue_on_failure:
                return
            raise Stop(self.failure(step, StepStatus(rec.status), rec.error or "failed"))
        output = rec.output
        scope[step.name] = output
        self.last_output = output
        if step.spec.restore is not None:
            await step.spec.restore(self, step, output, scope, where)

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
        at: At,
        *,
        input: Any = None,
        output: Any = None,
        error: str | None = None,
        logs: str = "",
        attempt: int = 1,
    ) -> None:
        await self.finished(
            self.make_record(
                step,
                status.value,
                at,
                input=input,
                output=output,
                error=error,
                logs=logs,
                attempt=attempt,
            )
        )

    async def finished(self, record: StepRecord) -> None:
        """Hand ``record`` to the sink."""
        checkpoint = self.checkpoint
        if checkpoint is None:
            await self.sink.step_finished(self.run_id, record)
            return
        pending = checkpoint(self.run_id, record)
        if pending is not None:
            await pending

    def make_record(
        self,
        step: Step,
        status: str,
        at: At,
        *,
        input: Any,
        output: Any,
        error: str | None,
        logs: str,
        attempt: int,
    ) -> StepRecord:
        """The finished step's record: redacted, its logs within the run's budget, timed
        from ``at``."""
        if self.secret_values:
            input, output, logs = self.redact(input), self.redact(output), self.redact(logs)
            error = self.redact(error)
        return step_record(
            step.name,
            step.type,
            status,
            input,
            output,
            error,
            self.cap_logs(logs),
            at.started,
            int((time.perf_counter() - at.t0) * 1000),
            attempt,
            at.parent,
            at.iteration,
        )

    def failure(self, step: Step, status: StepStatus, message: str) -> RunOutcome:
        error: RunError = {"step": step.name, "message": self.redact(message)}
        return RunOutcome(_RUN_STATUS.get(status, RunStatus.FAILED), error=error)

    async def failed(
        self,
        step: Step,
        exc: StepFailed,
        at: At,
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
            raise Stop(self.failure(step, exc.status, exc.message))

    async def succeeded(
        self,
        step: Step,
        scope: dict[str, Any],
        output: Any,
        at: At,
        *,
        input: Any = None,
        logs: str = "",
        attempt: int = 1,
    ) -> None:
        pending = self.succeeded_now(step, scope, output, at, input, logs, attempt)
        if pending is not None:
            await pending

    def succeeded_now(  # noqa: PLR0917 - succeeded()'s arguments, positional on the hot path
        self,
        step: Step,
        scope: dict[str, Any],
        output: Any,
        at: At,
        input: Any,
        logs: str,
        attempt: int,
    ) -> Awaitable[None] | None:
        """:meth:`succeeded`'s work: what to await for the sink, or ``None``."""
        scope[step.name] = output
        self.last_output = output
        record = self.make_record(
            step,
            _SUCCEEDED,
            at,
            input=input,
            output=output,
            error=None,
            logs=logs,
            attempt=attempt,
        )
        checkpoint = self.checkpoint
        if checkpoint is None:
            return self.sink.step_finished(self.run_id, record)
        return checkpoint(self.run_id, record)

    # --- step kinds -----------------------------------------------------------------------

    async def leaf(  # noqa: PLR0912 - render, attempts, four outcomes, the record
        self, step: Step, piece: Piece, scope: dict[str, Any], where: Where
    ) -> None:
        """Run a leaf step's piece: render its input, retry, time out, record."""
        at = self.start(step, where)
        try:
            inp = step.input_r.render(scope)
        except TemplateError as exc:
            await self.failed(step, StepFailed(str(exc)), at)
            return
        attempts, backoff = step.retry.attempts, step.retry.backoff_s
        timeout = step.timeout_s
        if timeout is not None:
            timeout += step.spec.timeout_grace_s
        fail: StepFailed | None = None
        for attempt in range(1, attempts + 1):
            try:
                if timeout is None:
                    output, logs = await piece(self.env, step, inp)
                else:
                    async with asyncio.timeout(timeout):
                        output, logs = await piece(self.env, step, inp)
            except StepFailed as exc:
                fail = exc
            except StepInternalError as exc:
                await self.record(step, StepStatus.FAILED, at, input=inp, error=str(exc))
                raise Stop(
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
                # succeeded() without its coroutine, nor the sink's when it only holds.
                pending = self.succeeded_now(step, scope, output, at, inp, logs, attempt)
                if pending is not None:
                    await pending
                return
            if attempt < attempts and backoff > 0:
                await asyncio.sleep(min(backoff * 2 ** (attempt - 1), 300.0))
        if fail is None:
            fail = StepFailed("not run")
        await self.failed(step, fail, at, input=inp, attempt=attempts)
