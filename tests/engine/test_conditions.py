"""Branch conditions: every operator, coercion rules, and all/any groups."""

from __future__ import annotations

from typing import Any

import pytest

from conveyor.engine.conditions import ConditionError, compile_condition

SCOPE: dict[str, Any] = {
    "s": {"n": 5, "txt": "5", "name": "order-42", "tags": ["a", "b"], "obj": {"k": 1}, "t": True}
}


def check(left: Any, op: str, right: Any = None, *, unary: bool = False) -> bool:
    cond: dict[str, Any] = {"left": left, "op": op}
    if not unary:
        cond["right"] = right
    return compile_condition({"all": [cond]}).evaluate(SCOPE)


@pytest.mark.parametrize(
    ("left", "op", "right", "expected"),
    [
        ("{{s.n}}", "eq", 5, True),
        ("{{s.txt}}", "eq", 5, True),
        ("{{s.n}}", "ne", 6, True),
        ("{{s.t}}", "eq", 1, False),
        ("{{s.txt}}", "gt", 4, True),
        ("{{s.n}}", "gte", "5", True),
        ("{{s.n}}", "lt", 5.5, True),
        ("{{s.n}}", "lte", 4, False),
        ("{{s.name}}", "contains", "42", True),
        ("{{s.tags}}", "contains", "b", True),
        ("{{s.obj}}", "contains", "k", True),
        ("{{s.tags}}", "not_contains", "z", True),
        ("{{s.name}}", "matches", "^order-[0-9]+$", True),
        ("{{s.name}}", "matches", "^x", False),
    ],
)
def test_binary_operators(left: Any, op: str, right: Any, expected: bool) -> None:
    """Each binary operator compares as documented (numeric strings coerced)."""
    assert check(left, op, right) is expected


def test_unary_operators() -> None:
    """exists treats a missing key as absent; is_true/is_false accept booleans and text."""
    assert check("{{s.n}}", "exists", unary=True)
    assert check("{{s.missing}}", "not_exists", unary=True)
    assert check("{{nostep.x}}", "not_exists", unary=True)
    assert check("{{s.t}}", "is_true", unary=True)
    assert check("TRUE", "is_true", unary=True)
    assert check("false", "is_false", unary=True)
    assert not check("{{s.n}}", "is_true", unary=True)


def test_numeric_ops_reject_non_numbers() -> None:
    """gt on text that is not a number fails the step with a clear message."""
    with pytest.raises(ConditionError, match="gt compares numbers"):
        check("{{s.name}}", "gt", 1)


def test_groups_all_any_nested() -> None:
    """all needs every item, any needs one; groups nest."""
    yes = {"left": 1, "op": "eq", "right": 1}
    no = {"left": 1, "op": "eq", "right": 2}
    assert not compile_condition({"all": [yes, no]}).evaluate(SCOPE)
    assert compile_condition({"any": [no, yes]}).evaluate(SCOPE)
    assert compile_condition({"all": [yes, {"any": [no, yes]}]}).evaluate(SCOPE)
