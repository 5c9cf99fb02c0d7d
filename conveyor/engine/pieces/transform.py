"""The transform step: its output is its rendered input, nothing else happens."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from conveyor.engine.schema import INPUT, step_schema
from conveyor.engine.spec import StepSpec, StepType

if TYPE_CHECKING:
    from conveyor.engine.context import RunEnv
    from conveyor.engine.flow import Step


async def transform(env: RunEnv, step: Step, input: Any) -> tuple[Any, str]:
    """Output is the rendered input itself."""
    return input, ""


SPEC: Final = StepSpec(
    StepType.TRANSFORM,
    piece=transform,
    schema=step_schema(
        "transform", "Output: the rendered input object.", {"input": {**INPUT, "default": {}}}
    ),
)
