"""Step specs: a new step type is one spec plus its registration, nothing else.

The toy types here live in a test-local :class:`Registry` next to the built-in specs; flow
validation, reference checks, compilation, round trips and the executor all pick them up
without any change to ``flow.py``, ``references.py`` or ``executor.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from conveyor.engine.context import RunEnv, Services
from conveyor.engine.errors import FlowInvalid, StepFailed
from conveyor.engine.executor import Executor
from conveyor.engine.flow import STEP_TYPES, Step, parse_flow
from conveyor.engine.spec import (
    REGISTRY,
    Arm,
    Checks,
    Registry,
    StepSpec,
    StepType,
    Walker,
    Where,
)
from conveyor.status import RunStatus, StepStatus
from tests.engine.support import MemorySink, flow_doc, make_ctx


def _check_shout(v: Checks, inp: Mapping[str, Any], p: str) -> None:
    if "text" not in inp:
        v.err(f"{p}.text", "is required")


async def _shout(env: RunEnv, step: Step, input: Any) -> tuple[Any, str]:
    text = input["text"]
    if not isinstance(text, str):
        raise StepFailed("shout text must be text")
    return text.upper() + step.compiled, f"shouted {len(text)} characters"


def _compile_shout(raw: Mapping[str, Any], children: Mapping[str, Any]) -> Mapping[str, Any]:
    return {"compiled": "!" * raw.get("volume", 1)}


async def _group(run: Walker, step: Step, scope: dict[str, Any], where: Where) -> None:
    at = run.start(step, where)
    await run.succeeded(step, scope, {"size": len(step.then)}, at)
    await run.run_steps(step.then, scope, step.name, where.iteration or 0, where.depth)


#: A leaf type: one piece, checked input keys, an extra key compiled once per version.
SHOUT = StepSpec(
    "shout",
    keys=frozenset({"input", "volume"}),
    input_keys=frozenset({"text"}),
    check_input=_check_shout,
    compile=_compile_shout,
    piece=_shout,
)
#: A control-flow type: a required list of children in ``do`` that run in the same scope.
GROUP = StepSpec(
    "group",
    keys=frozenset({"do"}),
    template_keys=(),
    arms=(Arm("do", "then", required=True),),
    walk=_group,
)


@pytest.fixture
def registry() -> Registry:
    """The built-in specs plus the two toy types, in a registry of the test's own."""
    return Registry([*REGISTRY, SHOUT, GROUP])


async def _run(doc: dict[str, Any], registry: Registry) -> tuple[Any, MemorySink]:
    sink = MemorySink()
    flow = parse_flow(doc, registry=registry)
    outcome = await Executor(Services(sink=sink)).run(flow, make_ctx({"who": "ada"}))
    return outcome, sink


def test_builtin_types_are_registered_in_order() -> None:
    """The process registry holds exactly the built-in types, in the documented order."""
    expected = ("transform", "code", "http", "branch", "loop", "delay", "respond")
    assert expected == STEP_TYPES
    assert tuple(StepType) == expected
    assert REGISTRY.get("shout") is None


async def test_leaf_type_runs_from_its_registration_alone(registry: Registry) -> None:
    """A registered leaf type validates, compiles, runs and records like a built-in one."""
    doc = flow_doc(
        {"name": "a", "type": "shout", "volume": 2, "input": {"text": "hi {{trigger.body.who}}"}},
        {"name": "b", "type": "transform", "input": {"got": "{{a}}"}},
    )
    outcome, sink = await _run(doc, registry)
    assert outcome.status is RunStatus.SUCCEEDED
    assert outcome.output == {"got": "HI ADA!!"}
    rec = sink.one("a")
    assert (rec["type"], rec["status"], rec["logs"]) == (
        "shout",
        StepStatus.SUCCEEDED,
        "shouted 6 characters",
    )


async def test_leaf_type_failure_is_a_step_failure(registry: Registry) -> None:
    """A piece of a registered type raising StepFailed fails its step and the run."""
    doc = flow_doc({"name": "a", "type": "shout", "input": {"text": 3}})
    outcome, sink = await _run(doc, registry)
    assert outcome.status is RunStatus.FAILED
    assert sink.one("a")["error"] == "shout text must be text"


def test_registered_type_is_validated_by_its_spec(registry: Registry) -> None:
    """Unknown keys, unknown inputs, missing inputs and missing arms come from the spec."""
    doc = flow_doc(
        {"name": "a", "type": "shout", "input": {"loud": True}, "when": 1},
        {"name": "g", "type": "group"},
    )
    with pytest.raises(FlowInvalid) as info:
        parse_flow(doc, registry=registry)
    assert info.value.details == [
        {"path": "steps[0].when", "message": "unknown key for a shout step"},
        {"path": "steps[0].input.loud", "message": "unknown input for a shout step"},
        {"path": "steps[0].input.text", "message": "is required"},
        {"path": "steps[1].do", "message": "is required for a group step"},
    ]


def test_unregistered_type_is_refused_by_the_default_registry() -> None:
    """Without its registration the same document names an unknown type."""
    doc = flow_doc({"name": "a", "type": "shout", "input": {"text": "x"}})
    with pytest.raises(FlowInvalid) as info:
        parse_flow(doc)
    expected = f"unknown step type 'shout'; expected one of {', '.join(STEP_TYPES)}"
    assert info.value.details == [{"path": "steps[0].type", "message": expected}]


async def test_control_flow_type_walks_its_arm(registry: Registry) -> None:
    """A walk function's children are validated, reference-checked, run and round-tripped."""
    doc = flow_doc(
        {
            "name": "g",
            "type": "group",
            "do": [{"name": "inner", "type": "shout", "input": {"text": "x{{g.size}}"}}],
        },
        {"name": "after", "type": "transform", "input": {"v": "{{inner}}"}},
    )
    flow = parse_flow(doc, registry=registry)
    assert flow.step_names == {"g", "inner", "after"}
    assert flow.to_document()["steps"][0]["do"][0]["name"] == "inner"
    outcome, sink = await _run(doc, registry)
    assert outcome.status is RunStatus.SUCCEEDED
    assert outcome.output == {"v": "X1!"}
    assert sink.one("inner")["parent"] == "g"


def test_arm_references_follow_the_spec(registry: Registry) -> None:
    """A non-iterating arm's steps are visible after the step; a later step is not inside."""
    doc = flow_doc(
        {
            "name": "g",
            "type": "group",
            "do": [{"name": "inner", "type": "transform", "input": {"v": "{{later}}"}}],
        },
        {"name": "later", "type": "transform", "input": {}},
    )
    with pytest.raises(FlowInvalid) as info:
        parse_flow(doc, registry=registry)
    assert info.value.details == [
        {
            "path": "steps[0].do[0].input.v",
            "message": 'template refers to step "later", which runs later',
        }
    ]


def test_registry_refuses_duplicates_and_half_specs() -> None:
    """A type registers once, and a spec has exactly one way to run."""
    with pytest.raises(ValueError, match="already registered"):
        Registry([SHOUT, SHOUT])
    with pytest.raises(ValueError, match="exactly one of piece or walk"):
        StepSpec("nothing")
