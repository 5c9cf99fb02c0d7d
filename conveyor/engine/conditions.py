"""Branch conditions: ``{all|any: [{left, op, right}]}`` compiled once, evaluated per run.

Operators are a closed set of plain comparisons — no expressions — so a condition can do
nothing but compare two template-resolved values. ``gt/gte/lt/lte`` compare numbers, with
numeric strings coerced; ``eq``/``ne`` also treat ``5`` and ``"5"`` as equal, because values
arriving from webhooks (query strings, form posts) are usually text.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from conveyor.engine.errors import StepFailed
from conveyor.engine.templating import Renderer, TemplateError, compile_value

UNARY_OPS: Final = frozenset({"exists", "not_exists", "is_true", "is_false"})
BINARY_OPS: Final = frozenset(
    {"eq", "ne", "gt", "gte", "lt", "lte", "contains", "not_contains", "matches"}
)
OPS: Final = UNARY_OPS | BINARY_OPS
#: Regex patterns are user input evaluated in the worker; bounding their size and the
#: subject's size keeps a pathological pattern from pinning the event loop for long.
MAX_PATTERN_LEN: Final = 1000
MAX_MATCH_SUBJECT: Final = 100_000


class ConditionError(StepFailed):
    """A condition could not be evaluated (e.g. ``gt`` on a non-number): the step fails."""


def _number(value: Any, op: str) -> float:
    if isinstance(value, bool):
        raise ConditionError(f"{op} compares numbers, got a boolean")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise ConditionError(f"{op} compares numbers, got {value!r:.80}")


def _loose_eq(left: Any, right: Any) -> bool:
    if left == right and type(left) is not bool and type(right) is not bool:
        return True
    if isinstance(left, bool) or isinstance(right, bool):
        return left is right
    num, other = (left, right) if isinstance(left, int | float) else (right, left)
    if isinstance(num, int | float) and isinstance(other, str):
        try:
            return float(other.strip()) == float(num)
        except ValueError:
            return False
    return False


def _contains(container: Any, item: Any) -> bool:
    if isinstance(container, str):
        return (item if isinstance(item, str) else str(item)) in container
    if isinstance(container, list | tuple):
        return any(_loose_eq(x, item) for x in container)
    if isinstance(container, Mapping):
        return str(item) in container
    if container is None:
        return False
    raise ConditionError(f"contains needs a string, list or object, got {container!r:.80}")


def _matches(subject: Any, pattern: Any) -> bool:
    if not isinstance(pattern, str) or len(pattern) > MAX_PATTERN_LEN:
        raise ConditionError("matches needs a regular expression string (≤ 1000 chars)")
    text = subject if isinstance(subject, str) else ("" if subject is None else str(subject))
    try:
        return re.search(pattern, text[:MAX_MATCH_SUBJECT]) is not None
    except re.error as exc:
        raise ConditionError(f"matches: invalid regular expression: {exc}") from None


def _is_true(v: Any) -> bool:
    return v is True or (isinstance(v, str) and v.strip().lower() == "true")


def _is_false(v: Any) -> bool:
    return v is False or (isinstance(v, str) and v.strip().lower() == "false")


_BINARY: Final[dict[str, Callable[[Any, Any], bool]]] = {
    "eq": _loose_eq,
    "ne": lambda a, b: not _loose_eq(a, b),
    "gt": lambda a, b: _number(a, "gt") > _number(b, "gt"),
    "gte": lambda a, b: _number(a, "gte") >= _number(b, "gte"),
    "lt": lambda a, b: _number(a, "lt") < _number(b, "lt"),
    "lte": lambda a, b: _number(a, "lte") <= _number(b, "lte"),
    "contains": _contains,
    "not_contains": lambda a, b: not _contains(a, b),
    "matches": _matches,
}


class Condition:
    """A compiled condition tree; ``evaluate(scope)`` returns the boolean."""

    __slots__ = ()

    def evaluate(self, scope: Mapping[str, Any]) -> bool:
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class Compare(Condition):
    """One ``{left, op, right}``; ``right`` is ``None`` for unary operators."""

    left: Renderer
    op: str
    right: Renderer | None

    def evaluate(self, scope: Mapping[str, Any]) -> bool:
        if self.op in ("exists", "not_exists"):
            # A missing key is the very thing exists tests for, so it is not an error here.
            try:
                present = self.left.render(scope) is not None
            except TemplateError:
                present = False
            return present if self.op == "exists" else not present
        left = self.left.render(scope)
        if self.op == "is_true":
            return _is_true(left)
        if self.op == "is_false":
            return _is_false(left)
        assert self.right is not None
        return _BINARY[self.op](left, self.right.render(scope))


@dataclass(frozen=True, slots=True)
class Group(Condition):
    """``all`` (every item true) or ``any`` (at least one) over nested conditions."""

    mode: str
    items: tuple[Condition, ...]

    def evaluate(self, scope: Mapping[str, Any]) -> bool:
        if self.mode == "all":
            return all(c.evaluate(scope) for c in self.items)
        return any(c.evaluate(scope) for c in self.items)


def check_condition(when: Any, path: str) -> list[tuple[str, str]]:
    """Return ``(path, message)`` for everything wrong with a raw ``when`` document."""
    errors: list[tuple[str, str]] = []
    if not isinstance(when, Mapping):
        return [(path, "must be an object with 'all' or 'any'")]
    keys = set(when)
    if len(keys) != 1 or not keys <= {"all", "any"}:
        return [(path, "must have exactly one key, 'all' or 'any'")]
    mode = next(iter(keys))
    items = when[mode]
    if not isinstance(items, list) or not items:
        return [(f"{path}.{mode}", "must be a non-empty list of conditions")]
    for i, item in enumerate(items):
        p = f"{path}.{mode}[{i}]"
        if isinstance(item, Mapping) and set(item) & {"all", "any"}:
            errors.extend(check_condition(item, p))
        elif not isinstance(item, Mapping):
            errors.append((p, "must be an object {left, op, right}"))
        else:
            errors.extend(_check_compare(item, p))
    return errors


def _check_compare(item: Mapping[str, Any], p: str) -> list[tuple[str, str]]:
    """Problems of one ``{left, op, right}`` comparison at path ``p``."""
    errors = [
        (f"{p}.{k}", "unknown key") for k in sorted(set(item) - {"left", "op", "right"}, key=str)
    ]
    if "left" not in item:
        errors.append((f"{p}.left", "is required"))
    op = item.get("op")
    if op not in OPS:
        message = f"unknown operator {op!r}; expected one of {', '.join(sorted(OPS))}"
        return [*errors, (f"{p}.op", message)]
    if op in UNARY_OPS and "right" in item:
        errors.append((f"{p}.right", f"operator {op} takes no right operand"))
    if op in BINARY_OPS and "right" not in item:
        errors.append((f"{p}.right", f"operator {op} needs a right operand"))
    right = item.get("right")
    if op == "matches" and isinstance(right, str) and "{{" not in right:
        if len(right) > MAX_PATTERN_LEN:
            errors.append((f"{p}.right", "regular expression longer than 1000 chars"))
        else:
            try:
                re.compile(right)
            except re.error as exc:
                errors.append((f"{p}.right", f"invalid regular expression: {exc}"))
    return errors


def compile_condition(when: Mapping[str, Any]) -> Condition:
    """Compile a ``when`` document that :func:`check_condition` accepted."""
    mode = "all" if "all" in when else "any"
    items: list[Condition] = []
    for item in when[mode]:
        if set(item) & {"all", "any"}:
            items.append(compile_condition(item))
        else:
            right = compile_value(item["right"]) if "right" in item else None
            items.append(Compare(compile_value(item["left"]), item["op"], right))
    return Group(mode, tuple(items))
