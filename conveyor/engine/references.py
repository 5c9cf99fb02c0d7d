"""Reference checks: every template may only name data that exists when its step runs.

A step may reference ``trigger`` (``method, headers, query, body``), ``run`` (``id, flow_id,
version``), ``secrets.NAME``, earlier steps in execution order (including steps inside an
earlier branch's arms — they may be absent at run time, which fails the step with its path),
its enclosing branch, and — inside a loop's steps — ``loop.item``/``loop.index`` and earlier
steps of the same iteration. Steps inside a loop are not visible after it: the loop's own
output (a list of ``{inner_step: output}``) is. The walk tolerates malformed documents so
reference problems are reported alongside structural ones.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from conveyor.engine.errors import ErrorDetail
from conveyor.engine.spec import Registry
from conveyor.engine.templating import (
    LOOP,
    LOOP_KEYS,
    RUN,
    RUN_KEYS,
    SECRETS,
    TRIGGER,
    TRIGGER_KEYS,
    Ref,
    TemplateSyntaxError,
    iter_refs,
    walk_strings,
)


@dataclass(frozen=True, slots=True)
class _Place:
    """Where a step sits: pre-order position and its chain of ancestors, each as
    (container, arm key, whether that arm is a loop body)."""

    order: int
    chain: Chain


Chain = tuple[tuple[str, str, bool], ...]
#: Reserved roots whose first segment must be one of these keys (``secrets`` is checked apart).
_ROOT_KEYS: dict[str, tuple[str, ...]] = {
    TRIGGER: TRIGGER_KEYS,
    RUN: RUN_KEYS,
    LOOP: LOOP_KEYS,
}


def _children(
    step: Mapping[str, Any], arms: dict[str, bool]
) -> Iterator[tuple[str, bool, list[Any]]]:
    # Every arm key any type uses, whatever this step's type: a malformed document is still
    # indexed as far as it goes.
    for arm, iterates in arms.items():
        kids = step.get(arm)
        if isinstance(kids, list):
            yield arm, iterates, kids


def _index(steps: list[Any], chain: Chain, arms: dict[str, bool], out: dict[str, _Place]) -> None:
    for step in steps:
        if not isinstance(step, Mapping):
            continue
        name = step.get("name")
        if isinstance(name, str) and name not in out:
            out[name] = _Place(len(out), chain)
        for arm, iterates, kids in _children(step, arms):
            _index(kids, (*chain, (str(name), arm, iterates)), arms, out)


def check_references(
    doc: Mapping[str, Any], registry: Registry
) -> tuple[list[ErrorDetail], set[str]]:
    """Return the reference errors and the set of secret names the flow uses."""
    checker = _Checker(registry)
    steps = doc.get("steps")
    if isinstance(steps, list):
        _index(steps, (), registry.arm_keys(), checker.places)
        checker.walk(steps, "steps", set(), (), 0)
    trig = doc.get("trigger")
    if isinstance(trig, Mapping) and isinstance(trig.get("secret"), str):
        for ref in checker.refs(trig["secret"], "trigger.secret"):
            if ref.root == SECRETS and ref.segments:
                checker.secrets.add(str(ref.segments[0]))
    return checker.errors, checker.secrets


class _Checker:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.template_keys = registry.template_keys()
        self.places: dict[str, _Place] = {}
        self.errors: list[ErrorDetail] = []
        self.secrets: set[str] = set()

    def refs(self, text: str, path: str) -> list[Ref]:
        try:
            return list(iter_refs(text))
        except TemplateSyntaxError:
            return []  # reported by the structural pass

    def walk(
        self,
        steps: list[Any],
        path: str,
        visible: set[str],
        chain: Chain,
        loop_depth: int,
    ) -> set[str]:
        """Check ``steps``; return the names they add for steps that follow them."""
        added: set[str] = set()
        for i, step in enumerate(steps):
            if not isinstance(step, Mapping):
                continue
            p = f"{path}[{i}]"
            name = step.get("name")
            name = name if isinstance(name, str) else ""
            for key in self.template_keys:
                if key in step:
                    self.check_value(
                        step[key],
                        f"{p}.{key}",
                        visible,
                        chain=chain,
                        current=name,
                        loop_depth=loop_depth,
                    )
            spec = self.registry.get(step.get("type"))
            for arm in spec.arms if spec is not None else ():
                kids = step.get(arm.key)
                if not isinstance(kids, list):
                    continue
                inner = (*chain, (name, arm.key, arm.iterates))
                if arm.iterates:
                    # A loop body: its names stay inside (the loop's output is what follows).
                    self.walk(kids, f"{p}.{arm.key}", set(visible), inner, loop_depth + 1)
                else:
                    # The step's own record (a branch's chosen arm) exists before its arms run.
                    kid_visible = visible | {name}
                    added |= self.walk(kids, f"{p}.{arm.key}", kid_visible, inner, loop_depth)
            added.add(name)
            visible |= added
        return added

    def check_value(
        self,
        value: Any,
        path: str,
        visible: set[str],
        *,
        chain: Chain,
        current: str,
        loop_depth: int,
    ) -> None:
        for p, text in walk_strings(value, path):
            if "{{" not in text:
                continue
            for ref in self.refs(text, p):
                msg = self.problem(ref, visible, chain, current, loop_depth)
                if msg:
                    self.errors.append({"path": p, "message": msg})

    def problem(
        self,
        ref: Ref,
        visible: set[str],
        chain: Chain,
        current: str,
        loop_depth: int,
    ) -> str | None:
        if ref.root == SECRETS or ref.root in _ROOT_KEYS:
            return self.root_problem(ref, loop_depth)
        if ref.root in visible:
            return None
        return self.step_problem(ref.root, chain, current)

    def root_problem(self, ref: Ref, loop_depth: int) -> str | None:
        """What is wrong with a reference to ``trigger``, ``run``, ``secrets`` or ``loop``."""
        root, segs = ref.root, ref.segments
        first = segs[0] if segs else None
        if root == SECRETS:
            if not isinstance(first, str) or len(segs) != 1:
                return "secrets must be referenced one at a time: {{secrets.NAME}}"
            self.secrets.add(first)
            return None
        if root == LOOP and loop_depth == 0:
            return "loop is only available inside a loop's steps"
        keys = _ROOT_KEYS[root]
        if first is None or first in keys:
            return None
        if root == LOOP:
            return f"loop has no {first!r}; use loop.item or loop.index"
        return f"{root} has no {first!r}; use one of {', '.join(keys)}"

    def step_problem(self, root: str, chain: Chain, current: str) -> str | None:
        """Why a step that is not visible here cannot be referenced."""
        place = self.places.get(root)
        if place is None:
            return f'template refers to unknown step "{root}"'
        if root == current:
            return f'step "{root}" cannot refer to its own output'
        names_in_chain = [n for n, _, _ in chain]
        if root in names_in_chain:
            return (
                f'template refers to enclosing loop "{root}", whose output exists only after '
                "it finishes; use {{loop.item}} / {{loop.index}}"
            )
        for (a_name, a_arm, _), (b_name, b_arm, _) in zip(chain, place.chain, strict=False):
            if a_name != b_name:
                break
            if a_arm != b_arm:
                return f'template refers to step "{root}" in the other arm of branch "{a_name}"'
        for anc, _, iterates in place.chain:
            if iterates and anc not in names_in_chain:
                return (
                    f'template refers to step "{root}" inside loop "{anc}"; its outputs are '
                    f"in the loop's output, e.g. {{{{{anc}[0].{root}}}}}"
                )
        return f'template refers to step "{root}", which runs later'
