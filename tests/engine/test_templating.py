"""Templating: typed whole values, interpolation, clear missing-key errors, no evaluation."""

from __future__ import annotations

from typing import Any

import pytest

from conveyor.engine.templating import (
    TemplateError,
    TemplateSyntaxError,
    compile_value,
    parse_ref,
    redact,
    render,
)

SCOPE: dict[str, Any] = {
    "trigger": {
        "method": "POST",
        "headers": {"content-type": "application/json"},
        "query": {},
        "body": {"amount": 150, "items": [{"sku": "a"}, {"sku": "b"}], "odd key": 1},
    },
    "parse": {"total": 150, "flag": True, "none": None, "list": [1, 2]},
    "secrets": {"KEY": "s3cr3t"},
}


def test_whole_value_keeps_type() -> None:
    """A string that is exactly one template yields the referenced value unchanged."""
    assert render("{{parse.total}}", SCOPE) == 150
    assert render("{{ parse.flag }}", SCOPE) is True
    assert render("{{parse.none}}", SCOPE) is None
    assert render("{{parse.list}}", SCOPE) == [1, 2]
    assert render("{{trigger.body.items[1].sku}}", SCOPE) == "b"


def test_interpolation_uses_json_for_non_strings() -> None:
    """Templates inside text are interpolated; numbers, lists, null become JSON."""
    out = render("t={{parse.total}} l={{parse.list}} n={{parse.none}} m={{trigger.method}}", SCOPE)
    assert out == "t=150 l=[1,2] n=null m=POST"
    assert render("{{parse.total}}{{parse.total}}", SCOPE) == "150150"


def test_nested_structures_render() -> None:
    """Mappings and lists are walked; constant subtrees are returned as they are."""
    value = {"a": ["{{parse.total}}", 2], "b": {"c": "x"}, "d": 1.5}
    assert render(value, SCOPE) == {"a": [150, 2], "b": {"c": "x"}, "d": 1.5}
    assert compile_value({"b": {"c": "x"}}).constant


def test_path_forms() -> None:
    """Dot keys may contain '-', brackets take indexes and quoted keys."""
    assert render("{{trigger.headers.content-type}}", SCOPE) == "application/json"
    assert render('{{trigger.body["odd key"]}}', SCOPE) == 1
    assert render("{{trigger.body.items[-1].sku}}", SCOPE) == "b"
    assert render("{{parse.list.0}}", SCOPE) == 1
    ref = parse_ref(" parse.list[0] ")
    assert (ref.root, ref.segments) == ("parse", ("list", 0))


def test_missing_key_names_the_full_path() -> None:
    """The error says which key was missing and where, quoting the template."""
    with pytest.raises(TemplateError) as info:
        render("{{parse.totl}}", SCOPE)
    assert str(info.value) == 'template {{parse.totl}}: key "totl" not found in step "parse"'
    with pytest.raises(TemplateError, match=r'key "x" not found in trigger.body.items\[0\]'):
        render("{{trigger.body.items[0].x}}", SCOPE)
    with pytest.raises(TemplateError, match=r"index 5 out of range in trigger.body.items"):
        render("{{trigger.body.items[5]}}", SCOPE)
    with pytest.raises(TemplateError, match=r"parse.total is a number"):
        render("{{parse.total.x}}", SCOPE)


def test_missing_step_and_secret() -> None:
    """An absent step (untaken arm) and an unset secret have their own messages."""
    with pytest.raises(TemplateError, match=r'step "notify" did not run'):
        render("{{notify.status}}", SCOPE)
    with pytest.raises(TemplateError, match=r'secret "NOPE" is not set'):
        render("{{secrets.NOPE}}", SCOPE)


@pytest.mark.parametrize(
    "text",
    [
        "{{__import__('os').system('id')}}",
        "{{ parse.total + 1 }}",
        "{{parse.total()}}",
        "{{ parse.total if 1 else 2 }}",
        "{{ range(10) }}",
        "{{}}",
        "{{ a | upper }}",
    ],
)
def test_expressions_are_never_evaluated(text: str) -> None:
    """Anything other than a plain path is a syntax error, never code."""
    with pytest.raises(TemplateSyntaxError):
        compile_value({"x": text})


def test_attribute_lookup_is_not_possible() -> None:
    """Paths only index dicts and lists, so dunder names reach no Python attribute."""
    with pytest.raises(TemplateError):
        render("{{parse.__class__}}", SCOPE)
    with pytest.raises(TemplateError):
        render("{{trigger.method.upper}}", SCOPE)


def test_redact_replaces_secret_values_everywhere() -> None:
    """redact() walks strings, dicts and lists; longer secrets win; empty ones are ignored."""
    value = {"a": "Bearer s3cr3t", "b": ["s3cr3t", 1, None], "c": {"d": "s3cr3t-long"}}
    assert redact(value, ["s3cr3t", "s3cr3t-long", ""]) == {
        "a": "Bearer ***",
        "b": ["***", 1, None],
        "c": {"d": "***"},
    }
    assert redact(value, []) is value
