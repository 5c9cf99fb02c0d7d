"""Flow parsing and validation: every error kind is reported with its path, all at once."""

from __future__ import annotations

from typing import Any

import pytest

from conveyor.engine.errors import FlowInvalid
from conveyor.engine.flow import Flow, load_document, parse_flow

DESIGN_EXAMPLE = """
name: order-alert
trigger: {type: webhook}
steps:
  - name: parse
    type: transform
    input: {total: "{{trigger.body.amount}}", email: "{{trigger.body.customer.email}}"}
  - name: score
    type: code
    input: {total: "{{parse.total}}"}
    code: |
      def run(input):
          return {"big": input["total"] > 100}
  - name: route
    type: branch
    when: {all: [{left: "{{score.big}}", op: is_true}]}
    then: [{name: notify, type: http, input: {method: POST, url: "https://example.com/hook",
            json: {e: "{{parse.email}}"}}}]
    else: []
  - name: reply
    type: respond
    input: {status: 200, body: {big: "{{score.big}}"}}
"""


def flow_with(*steps: dict[str, Any], trigger: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": "f", "trigger": trigger or {"type": "webhook"}, "steps": list(steps)}


def errors_of(doc: Any) -> list[tuple[str, str]]:
    with pytest.raises(FlowInvalid) as info:
        parse_flow(doc)
    return [(d["path"], d["message"]) for d in info.value.details]


def has(errors: list[tuple[str, str]], path: str, fragment: str) -> bool:
    return any(p == path and fragment in m for p, m in errors)


def t(name: str, **input: Any) -> dict[str, Any]:
    return {"name": name, "type": "transform", "input": input}


def test_design_example_parses_and_round_trips() -> None:
    """The reference example flow is valid and to_document() parses back to the same document."""
    flow = parse_flow(DESIGN_EXAMPLE)
    assert isinstance(flow, Flow)
    assert [s.name for s in flow.steps] == ["parse", "score", "route", "reply"]
    assert flow.step_names == {"parse", "score", "route", "notify", "reply"}
    doc = flow.to_document()
    assert parse_flow(doc).to_document() == doc
    assert doc["steps"][2]["then"][0]["name"] == "notify"


def test_json_and_yaml_text_are_both_accepted() -> None:
    """load_document reads JSON and YAML; undecodable text is a FlowInvalid at the root."""
    assert load_document('{"a": 1}') == {"a": 1}
    assert load_document("a: 1\n", "application/yaml") == {"a": 1}
    assert errors_of("{not: [valid") == [("", errors_of("{not: [valid")[0][1])]
    with pytest.raises(FlowInvalid):
        load_document("{", "application/json")


def test_document_is_copied_and_normalised() -> None:
    """The parsed flow does not alias the caller's dict; YAML dates become ISO strings."""
    doc = flow_with(t("a", x=[1]))
    flow = parse_flow(doc)
    doc["steps"][0]["input"]["x"].append(2)
    assert flow.to_document()["steps"][0]["input"] == {"x": [1]}
    yaml_flow = parse_flow(
        "name: f\ntrigger: {type: manual}\n"
        "steps:\n- {name: a, type: transform, input: {d: 2026-01-02}}\n"
    )
    assert yaml_flow.to_document()["steps"][0]["input"] == {"d": "2026-01-02"}


def test_server_fields_are_ignored_for_round_trips() -> None:
    """Keys the API adds (id, version, enabled, …) are accepted so GET → PUT works."""
    doc = flow_with(t("a", x=1)) | {"id": "abc", "version": 3, "enabled": True}
    assert parse_flow(doc).name == "f"


def test_all_errors_are_collected_in_one_exception() -> None:
    """Several problems in one document come back together, each with its own path."""
    errs = errors_of(
        {"name": "", "trigger": {"type": "bogus"}, "steps": [{"name": "1x", "type": "nope"}]}
    )
    paths = {p for p, _ in errs}
    assert {"name", "trigger.type", "steps[0].name", "steps[0].type"} <= paths


def test_name_length_limits() -> None:
    """The flow name is free text of 1–200 characters."""
    assert parse_flow(flow_with() | {"name": "Order alert — EU (v2)"}).name.startswith("Order")
    assert has(errors_of(flow_with() | {"name": "x" * 201}), "name", "longer than 200")
    assert has(errors_of(flow_with() | {"name": "  "}), "name", "required")


def test_unknown_top_level_and_step_keys() -> None:
    """Unknown keys are errors at their path, including keys of another step type."""
    errs = errors_of(flow_with(t("a") | {"code": "x", "colour": 1}) | {"extra": 1})
    assert has(errs, "extra", "unknown key")
    assert has(errs, "steps[0].code", "unknown key for a transform step")
    assert has(errs, "steps[0].colour", "unknown key")


def test_unknown_step_type() -> None:
    """An unknown type names the allowed types."""
    assert has(errors_of(flow_with({"name": "a", "type": "email"})), "steps[0].type", "email")


def test_step_name_rules() -> None:
    """Names must match the identifier regex and must not be reserved."""
    errs = errors_of(flow_with(t("bad-name"), t("loop"), t("secrets"), {"type": "transform"}))
    assert has(errs, "steps[0].name", "[A-Za-z_]")
    assert has(errs, "steps[1].name", "reserved")
    assert has(errs, "steps[2].name", "reserved")
    assert has(errs, "steps[3].name", "required")


def test_duplicate_names_across_nesting() -> None:
    """A name reused inside a branch arm or loop is a duplicate of the top-level one."""
    errs = errors_of(
        flow_with(
            t("a"),
            {
                "name": "b",
                "type": "branch",
                "when": {"any": [{"left": 1, "op": "exists"}]},
                "then": [t("a")],
            },
            {"name": "l", "type": "loop", "items": [1], "steps": [t("b")]},
        )
    )
    assert has(errs, "steps[1].then[0].name", 'duplicate step name "a" (first used at steps[0])')
    assert has(errs, "steps[2].steps[0].name", 'duplicate step name "b"')


def test_reference_to_unknown_step_in_nested_path() -> None:
    """The reference example's error: steps[3].then[0].input.url refers to unknown "pars"."""
    branch = {
        "name": "route",
        "type": "branch",
        "when": {"all": [{"left": 1, "op": "eq", "right": 1}]},
        "then": [
            {"name": "notify", "type": "http", "input": {"url": "{{pars.url}}", "method": "GET"}}
        ],
    }
    errs = errors_of(flow_with(t("a"), t("b"), t("c"), branch))
    assert ("steps[3].then[0].input.url", 'template refers to unknown step "pars"') in errs


def test_reference_to_later_step_and_self() -> None:
    """A step may only reference earlier steps, never itself or later ones."""
    errs = errors_of(flow_with(t("a", x="{{b.v}}"), t("b", y="{{b.v}}")))
    assert has(errs, "steps[0].input.x", 'step "b", which runs later')
    assert has(errs, "steps[1].input.y", "its own output")


def test_reference_to_other_branch_arm() -> None:
    """Steps in one arm cannot see steps in the other arm; steps after the branch can."""
    branch = {
        "name": "br",
        "type": "branch",
        "when": {"all": [{"left": "{{trigger.body}}", "op": "exists"}]},
        "then": [t("yes", v="{{br.branch}}")],
        "else": [t("no", v="{{yes}}")],
    }
    errs = errors_of(flow_with(branch, t("after", a="{{yes}}", b="{{no}}")))
    assert errs == [
        (
            "steps[0].else[0].input.v",
            'template refers to step "yes" in the other arm of branch "br"',
        )
    ]


def test_loop_scoping() -> None:
    """loop.* only inside loop steps; inner steps are not visible after the loop."""
    loop = {
        "name": "each",
        "type": "loop",
        "items": "{{trigger.body.items}}",
        "steps": [t("inner", v="{{loop.item}}", i="{{loop.index}}", e="{{each}}")],
    }
    errs = errors_of(flow_with(loop, t("after", a="{{inner}}", l="{{loop.item}}")))
    assert has(errs, "steps[0].steps[0].input.e", 'enclosing loop "each"')
    assert has(errs, "steps[1].input.a", 'inside loop "each"')
    assert has(errs, "steps[1].input.l", "only available inside a loop")
    loop["steps"] = [t("inner", v="{{loop.item}}")]
    ok = parse_flow(flow_with(loop, t("after", a="{{each[0].inner.v}}")))
    assert ok.steps[0].iteration_names == ("inner",)


def test_reserved_root_keys_are_checked() -> None:
    """trigger/run/loop only have their documented keys; secrets need a name."""
    loop = {"name": "l", "type": "loop", "items": [1], "steps": [t("i", x="{{loop.value}}")]}
    errs = errors_of(
        flow_with(t("a", x="{{trigger.payload}}", y="{{run.name}}", z="{{secrets}}"), loop)
    )
    assert has(errs, "steps[0].input.x", "trigger has no 'payload'")
    assert has(errs, "steps[0].input.y", "run has no 'name'")
    assert has(errs, "steps[0].input.z", "one at a time")
    assert has(errs, "steps[1].steps[0].input.x", "loop has no 'value'")


def test_template_expressions_are_rejected() -> None:
    """Anything inside {{ }} that is not a plain path is a validation error, never evaluated."""
    errs = errors_of(flow_with(t("a", x="{{__import__('os').system('id')}}", y="{{1+1}}", z="{{a")))
    assert has(errs, "steps[0].input.x", "expressions are not supported")
    assert has(errs, "steps[0].input.y", "expressions are not supported")
    assert has(errs, "steps[0].input.z", "unclosed")


def test_secrets_are_collected() -> None:
    """secret_names lists every secret the flow references, including the trigger secret."""
    flow = parse_flow(
        flow_with(
            t("a", k="{{secrets.API_KEY}}"),
            trigger={"type": "webhook", "secret": "{{secrets.HOOK}}"},
        )
    )
    assert flow.secret_names == {"API_KEY", "HOOK"}
    assert flow.trigger.secret_name == "HOOK"


def test_trigger_validation() -> None:
    """Schedules need a valid cron and time zone; webhook secrets are {{secrets.NAME}}."""
    errs = errors_of(
        flow_with(trigger={"type": "schedule", "cron": "61 * * * *", "timezone": "Mars/Base"})
    )
    assert has(errs, "trigger.cron", "invalid cron")
    assert has(errs, "trigger.timezone", "Mars/Base")
    assert has(errors_of(flow_with(trigger={"type": "schedule"})), "trigger.cron", "required")
    errs = errors_of(
        flow_with(trigger={"type": "webhook", "secret": "x{{trigger.body}}", "cron": "x"})
    )
    assert has(errs, "trigger.secret", "{{secrets.NAME}}")
    assert has(errs, "trigger.cron", "unknown key")
    flow = parse_flow(flow_with(trigger={"type": "schedule", "cron": "*/5 * * * *"}))
    assert flow.trigger.timezone == "UTC"
    assert parse_flow(flow_with(trigger={"type": "manual"})).trigger.type == "manual"


def test_branch_operator_errors() -> None:
    """Unknown ops, a right operand on unary ops, a missing one on binary ops, bad regexes."""
    when = {
        "all": [
            {"left": 1, "op": "between", "right": 2},
            {"left": 1, "op": "exists", "right": 2},
            {"left": 1, "op": "gt"},
            {"any": [{"left": "x", "op": "matches", "right": "("}]},
            {"left": 1, "op": "eq", "right": 1, "extra": 0},
        ]
    }
    errs = errors_of(flow_with({"name": "b", "type": "branch", "when": when}))
    assert has(errs, "steps[0].when.all[0].op", "unknown operator 'between'")
    assert has(errs, "steps[0].when.all[1].right", "takes no right operand")
    assert has(errs, "steps[0].when.all[2].right", "needs a right operand")
    assert has(errs, "steps[0].when.all[3].any[0].right", "invalid regular expression")
    assert has(errs, "steps[0].when.all[4].extra", "unknown key")
    assert has(errors_of(flow_with({"name": "b", "type": "branch"})), "steps[0].when", "required")
    errs = errors_of(flow_with({"name": "b", "type": "branch", "when": {"all": []}}))
    assert has(errs, "steps[0].when.all", "non-empty")


def test_code_step_checks() -> None:
    """Code must compile and define a top-level run (def or async def); it is never run."""
    errs = errors_of(
        flow_with(
            {"name": "a", "type": "code", "code": "def run(input):\n  return ("},
            {"name": "b", "type": "code", "code": "def helper():\n    pass\n"},
            {"name": "c", "type": "code", "code": "class X:\n    def run(self): pass\n"},
            {"name": "d", "type": "code"},
            {"name": "f", "type": "code", "code": "return 1\ndef run(i):\n    return i"},
        )
    )
    assert has(errs, "steps[4].code", "'return' outside function")
    assert has(errs, "steps[0].code", "does not compile")
    assert has(errs, "steps[1].code", "top-level function run")
    assert has(errs, "steps[2].code", "top-level function run")
    assert has(errs, "steps[3].code", "required")
    ok = parse_flow(
        flow_with(
            {
                "name": "e",
                "type": "code",
                "code": "raise SystemExit\nasync def run(i):\n    return i",
            }
        )
    )
    assert ok.steps[0].code is not None


def test_piece_input_checks() -> None:
    """http needs an http(s) url and a known method; delay seconds; respond a valid status."""
    errs = errors_of(
        flow_with(
            {
                "name": "h",
                "type": "http",
                "input": {"method": "FETCH", "url": "ftp://x", "json": 1, "body": "x", "verb": 1},
            },
            {"name": "h2", "type": "http", "input": {}},
            {"name": "d", "type": "delay", "input": {"seconds": -1}},
            {"name": "d2", "type": "delay"},
            {"name": "r", "type": "respond", "input": {"status": 99, "headers": "x"}},
            {"name": "x", "type": "transform", "input": "not a mapping"},
        )
    )
    assert has(errs, "steps[0].input.method", "must be one of")
    assert has(errs, "steps[0].input.url", "http:// or https://")
    assert has(errs, "steps[0].input.body", "either json or body")
    assert has(errs, "steps[0].input.verb", "unknown input")
    assert has(errs, "steps[1].input.url", "required")
    assert has(errs, "steps[2].input.seconds", "≥ 0")
    assert has(errs, "steps[3].input.seconds", "required")
    assert has(errs, "steps[4].input.status", "100–599")
    assert has(errs, "steps[4].input.headers", "object")
    assert has(errs, "steps[5].input", "must be an object")


def test_common_step_options() -> None:
    """retry, continue_on_failure and timeout_s are typed and bounded."""
    errs = errors_of(
        flow_with(
            t("a") | {"retry": {"attempts": 0, "backoff_s": -1, "jitter": 1}},
            t("b") | {"continue_on_failure": "yes", "timeout_s": 0},
            t("c") | {"retry": 3},
        )
    )
    assert has(errs, "steps[0].retry.attempts", "1–10")
    assert has(errs, "steps[0].retry.backoff_s", "0–300")
    assert has(errs, "steps[0].retry.jitter", "unknown key")
    assert has(errs, "steps[1].continue_on_failure", "true or false")
    assert has(errs, "steps[1].timeout_s", "seconds")
    assert has(errs, "steps[2].retry", "attempts")
    flow = parse_flow(
        flow_with(t("a") | {"retry": {"attempts": 3, "backoff_s": 0.5}, "timeout_s": 2})
    )
    assert flow.steps[0].retry.attempts == 3
    assert flow.steps[0].timeout_s == 2.0


def test_loop_requires_items_and_steps() -> None:
    """A loop needs items (a list or a template) and steps."""
    errs = errors_of(
        flow_with({"name": "l", "type": "loop", "items": 5}, {"name": "m", "type": "loop"})
    )
    assert has(errs, "steps[0].items", "list")
    assert has(errs, "steps[0].steps", "required")
    assert has(errs, "steps[1].items", "required")


def test_flow_invalid_shape() -> None:
    """FlowInvalid carries details [{path, message}] and a summary message."""
    with pytest.raises(FlowInvalid) as info:
        parse_flow(flow_with(t("a", x="{{nope}}"), t("a")))
    exc = info.value
    assert exc.code == "FLOW_INVALID"
    assert all(set(d) == {"path", "message"} for d in exc.details)
    assert "and 1 more" in exc.message
