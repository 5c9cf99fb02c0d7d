"""The branch step: evaluate ``when``, record the arm taken, walk ``then`` or ``else``.

The branch's own record (``{"branch": "then"|"else"}``) is written before its arm runs, so
steps in either arm may refer to it; on redelivery the recorded arm is walked again.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from conveyor.engine.conditions import ConditionError, check_condition, compile_condition
from conveyor.engine.errors import StepFailed
from conveyor.engine.schema import STEPS, ref, step_schema
from conveyor.engine.spec import Arm, Checks, StepSpec, StepType, Walker, Where
from conveyor.engine.templating import TemplateError

if TYPE_CHECKING:
    from conveyor.engine.flow import Step


def check(v: Checks, step: Mapping[str, Any], p: str) -> None:
    """``when`` is required and must be a valid condition."""
    if "when" not in step:
        v.err(f"{p}.when", "is required for a branch step")
        return
    for path, msg in check_condition(step["when"], f"{p}.when"):
        v.err(path, msg)
    v.check_syntax(step["when"], f"{p}.when")


def _compile(raw: Mapping[str, Any], children: Mapping[str, Any]) -> Mapping[str, Any]:
    return {"when_c": compile_condition(raw["when"])}


async def walk(run: Walker, step: Step, scope: dict[str, Any], where: Where) -> None:
    """Evaluate the condition, record the arm, then walk it."""
    at = run.start(step, where)
    assert step.when_c is not None
    try:
        taken = step.when_c.evaluate(scope)
    except (TemplateError, ConditionError) as exc:
        await run.failed(step, StepFailed(str(exc)), at)
        return
    await run.succeeded(step, scope, {"branch": "then" if taken else "else"}, at)
    arm = step.then if taken else step.else_
    await run.run_steps(arm, scope, step.name, where.iteration or 0, where.depth)


async def restore(
    run: Walker, step: Step, output: Any, scope: dict[str, Any], where: Where
) -> None:
    """Walk the arm the recorded output names (its finished steps restore in turn)."""
    taken = isinstance(output, dict) and output.get("branch") == "then"
    arm = step.then if taken else step.else_
    await run.run_steps(arm, scope, step.name, where.iteration or 0, where.depth)


SPEC: Final = StepSpec(
    StepType.BRANCH,
    keys=frozenset({"when", "then", "else"}),
    check=check,
    template_keys=("when",),
    arms=(Arm("then", "then"), Arm("else", "else_")),
    compile=_compile,
    walk=walk,
    restore=restore,
    schema=step_schema(
        "branch",
        'Runs then or else. Output: {"branch": "then"|"else"}.',
        {"when": ref("Condition"), "then": STEPS, "else": STEPS},
        ("when",),
    ),
)
