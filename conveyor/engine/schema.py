"""JSON Schema (OpenAPI 3.0 dialect) pieces for describing step documents.

Each step type's :class:`~conveyor.engine.spec.StepSpec` carries the schema of its document
(``schema``), built with :func:`step_schema`; the API's OpenAPI document
(``conveyor/api/openapi.py``) collects them from the registry, so a new step type describes
itself in its own module (docs/architecture.md, "Adding a step type").
"""

from __future__ import annotations

from typing import Any, Final

Json = dict[str, Any]


def ref(name: str) -> Json:
    """A reference to ``#/components/schemas/<name>``."""
    return {"$ref": f"#/components/schemas/{name}"}


def obj(props: Json, required: tuple[str, ...] = (), **extra: Any) -> Json:
    """An object schema with ``props`` (and ``required`` keys, if any)."""
    schema: Json = {"type": "object", "properties": props, **extra}
    if required:
        schema["required"] = list(required)
    return schema


STR: Final[Json] = {"type": "string"}
ANY: Final[Json] = {"description": "any JSON value", "nullable": True}
TEMPLATE: Final[Json] = {
    "type": "string",
    "description": "a template, e.g. {{trigger.body.items}}",
    "pattern": r"\{\{",
}
#: A list of child steps (a branch's arms, a loop's body).
STEPS: Final[Json] = {"type": "array", "items": ref("Step")}
#: An input object whose keys are not checked (strings may hold templates).
INPUT: Final[Json] = {
    "type": "object",
    "additionalProperties": True,
    "description": "rendered before the step runs: strings may hold {{templates}}",
}

#: Keys every step accepts (docs/flows.md, "The document").
STEP_COMMON: Final[Json] = {
    "name": {
        "type": "string",
        "pattern": r"^[A-Za-z_][A-Za-z0-9_]*$",
        "description": "unique across the flow (nested steps included); not trigger, run, "
        "secrets or loop. Later steps read its output as {{name}}.",
    },
    "retry": obj(
        {
            "attempts": {"type": "integer", "minimum": 1, "maximum": 10, "default": 1},
            "backoff_s": {"type": "number", "minimum": 0, "maximum": 300, "default": 0},
        },
        additionalProperties=False,
        description="re-run a failed transform, code, http or respond step; waits "
        "backoff_s × 2^(n-1) before try n+1",
    ),
    "timeout_s": {
        "type": "number",
        "exclusiveMinimum": True,
        "minimum": 0,
        "maximum": 86400,
        "description": "seconds per attempt (a loop: the whole loop)",
    },
    "continue_on_failure": {
        "type": "boolean",
        "default": False,
        "description": "a failure of this step does not stop the run",
    },
}


def step_schema(typ: str, description: str, props: Json, required: tuple[str, ...] = ()) -> Json:
    """The document schema of step type ``typ``: the common keys plus ``props``."""
    return obj(
        {"type": {"type": "string", "enum": [typ]}, **STEP_COMMON, **props},
        ("name", "type", *required),
        additionalProperties=False,
        description=description,
    )
