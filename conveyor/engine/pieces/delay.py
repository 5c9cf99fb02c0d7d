"""The delay step: wait ``seconds``; a long wait pauses the run instead of holding a worker.

Below ``Services.pause_threshold_s`` the step sleeps in place. Longer, it records itself
``PAUSED`` with ``resume_at`` and stops the walk; the run is re-queued for that time and the
step, found paused on resume, finishes then (keeping its original start time and input).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

from conveyor.engine.context import RunOutcome
from conveyor.engine.errors import StepFailed
from conveyor.engine.schema import TEMPLATE, obj, step_schema
from conveyor.engine.spec import (
    Checks,
    StepSpec,
    StepType,
    Stop,
    Walker,
    Where,
    is_number,
    is_template,
    now,
)
from conveyor.engine.templating import TemplateError
from conveyor.status import RunStatus, StepStatus

if TYPE_CHECKING:
    from conveyor.engine.flow import Step


def check_input(v: Checks, inp: Mapping[str, Any], p: str) -> None:
    """``seconds`` is required: a number ≥ 0 or a template."""
    sec = inp.get("seconds")
    if sec is None:
        v.err(f"{p}.seconds", "is required")
    elif not is_template(sec) and (not is_number(sec) or sec < 0):
        v.err(f"{p}.seconds", "must be a number of seconds ≥ 0")


async def walk(run: Walker, step: Step, scope: dict[str, Any], where: Where) -> None:
    """Sleep, pause the run, or finish a paused delay whose time has come."""
    at = run.start(step, where)
    if where.paused is not None:
        resume_at = datetime.fromisoformat(where.paused.output["resume_at"])
        # Woken early (a clock skew or an eager reconciler): pause again, same deadline.
        if at.started + timedelta(seconds=0.5) < resume_at:
            raise Stop(RunOutcome(RunStatus.PAUSED, resume_at=resume_at))
        out = {"resumed_at": at.started.isoformat()}
        at.started = where.paused.started_at or at.started
        await run.succeeded(step, scope, out, at, input=where.paused.input)
        return
    try:
        inp = step.input_r.render(scope)
        seconds = float(inp["seconds"])
        if not 0 <= seconds < 10**9:
            raise ValueError
    except TemplateError as exc:
        await run.failed(step, StepFailed(str(exc)), at)
        return
    except (TypeError, ValueError, KeyError):
        await run.failed(step, StepFailed("delay seconds must be a number ≥ 0"), at)
        return
    if seconds < run.services.pause_threshold_s:
        await asyncio.sleep(seconds)
        await run.succeeded(step, scope, {"resumed_at": now().isoformat()}, at, input=inp)
        return
    if where.depth > 1:
        msg = "delays of 5 s or more cannot pause a run inside a nested loop"
        await run.failed(step, StepFailed(msg), at, input=inp)
        return
    resume_at = at.started + timedelta(seconds=seconds)
    output = {"resume_at": resume_at.isoformat()}
    await run.record(step, StepStatus.PAUSED, at, input=inp, output=output)
    raise Stop(RunOutcome(RunStatus.PAUSED, resume_at=resume_at))


SPEC: Final = StepSpec(
    StepType.DELAY,
    input_keys=frozenset({"seconds"}),
    check_input=check_input,
    walk=walk,
    schema=step_schema(
        "delay",
        'Waits (from 5 s on, the run pauses). Output: {"resumed_at"}.',
        {
            "input": obj(
                {"seconds": {"oneOf": [{"type": "number", "minimum": 0}, TEMPLATE]}},
                ("seconds",),
                additionalProperties=False,
            )
        },
        ("input",),
    ),
)
