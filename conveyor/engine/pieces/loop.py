"""The loop step: run ``steps`` once per item of ``items``, each iteration in its own scope.

``{{loop.item}}``/``{{loop.index}}`` name the current item; the loop's output is a list of
``{inner_step: output}``, one per iteration, covering its direct children and the steps in
their branch arms (a nested loop's insides are in that loop's own output).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, Final

from conveyor.engine.errors import StepFailed
from conveyor.engine.schema import STEPS, TEMPLATE, step_schema
from conveyor.engine.spec import (
    Arm,
    Checks,
    StepSpec,
    StepType,
    Stop,
    Walker,
    Where,
    is_template,
)
from conveyor.engine.templating import LOOP, TemplateError, compile_value
from conveyor.status import RunStatus, StepStatus

if TYPE_CHECKING:
    from conveyor.engine.flow import Step


def check(v: Checks, step: Mapping[str, Any], p: str) -> None:
    """``items`` is a list or a template yielding one."""
    items = step.get("items")
    if items is None:
        v.err(f"{p}.items", "is required: a template yielding a list, or a list")
    elif not isinstance(items, list) and not is_template(items):
        v.err(f"{p}.items", "must be a list or a template yielding a list")
    v.check_syntax(items, f"{p}.items")


def iteration_names(steps: Sequence[Step]) -> list[str]:
    """Names whose outputs make up one iteration: ``steps`` and, recursively, the steps in
    their arms that do not iterate themselves (a nested loop's body is its own business)."""
    names: list[str] = []
    for s in steps:
        names.append(s.name)
        for arm in s.spec.arms:
            if not arm.iterates:
                names += iteration_names(getattr(s, arm.attr))
    return names


def _compile(raw: Mapping[str, Any], children: Mapping[str, Sequence[Step]]) -> Mapping[str, Any]:
    return {
        "items_r": compile_value(raw["items"]),
        "iteration_names": tuple(iteration_names(children["steps"])),
    }


async def walk(run: Walker, step: Step, scope: dict[str, Any], where: Where) -> None:
    """Render the items, walk the body per item, record the list of iteration outputs."""
    at = run.start(step, where)
    assert step.items_r is not None
    try:
        items = step.items_r.render(scope)
    except TemplateError as exc:
        await run.failed(step, StepFailed(str(exc)), at)
        return
    if not isinstance(items, list | tuple):
        kind = type(items).__name__ if items is not None else "null"
        await run.failed(step, StepFailed(f"loop items must be a list, got {kind}"), at)
        return
    limit = run.services.max_loop_iterations
    if len(items) > limit:
        msg = f"loop over {len(items)} items exceeds the limit of {limit}"
        await run.failed(step, StepFailed(msg), at)
        return
    names = step.iteration_names
    results: list[dict[str, Any]] = []
    index = 0
    try:
        async with asyncio.timeout(step.timeout_s) if step.timeout_s else nullcontext():
            for index, item in enumerate(items):
                child = dict(scope)
                child[LOOP] = {"item": item, "index": index}
                await run.run_steps(step.steps, child, step.name, index, where.depth + 1)
                results.append({n: child[n] for n in names if n in child})
    except Stop as stop:
        if stop.outcome.status is RunStatus.PAUSED:
            raise
        err = stop.outcome.error
        inner = f'step "{err["step"]}": {err["message"]}' if err else "failed"
        await run.record(step, StepStatus.FAILED, at, error=f"iteration {index}: {inner}")
        if not step.continue_on_failure:
            raise
        return
    except TimeoutError:
        timed_out = StepFailed(
            f"loop timed out after {step.timeout_s:g} s", status=StepStatus.TIMEOUT
        )
        await run.failed(step, timed_out, at)
        return
    run.track(step, at)
    await run.succeeded(step, scope, results, at)


SPEC: Final = StepSpec(
    StepType.LOOP,
    keys=frozenset({"items", "steps"}),
    check=check,
    template_keys=("items",),
    arms=(Arm("steps", "steps", iterates=True, required=True),),
    compile=_compile,
    walk=walk,
    schema=step_schema(
        "loop",
        "Runs steps once per item ({{loop.item}}, {{loop.index}}). Output: one "
        "{inner step: output} object per iteration.",
        {"items": {"oneOf": [TEMPLATE, {"type": "array", "items": {}}]}, "steps": STEPS},
        ("items", "steps"),
    ),
)
