"""The respond step: hand ``{status, headers, body}`` to a waiting sync caller at once."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from conveyor.engine.errors import StepFailed
from conveyor.engine.schema import ANY, STR, obj, step_schema
from conveyor.engine.spec import Checks, StepSpec, StepType, Walker, Where, is_template

if TYPE_CHECKING:
    from conveyor.engine.context import RunEnv
    from conveyor.engine.flow import Step


def check_input(v: Checks, inp: Mapping[str, Any], p: str) -> None:
    """A literal status is an HTTP status; literal headers are an object."""
    st = inp.get("status", 200)
    if not is_template(st) and (
        not isinstance(st, int) or isinstance(st, bool) or not 100 <= st <= 599
    ):
        v.err(f"{p}.status", "must be an HTTP status 100–599")
    h = inp.get("headers")
    if h is not None and not isinstance(h, Mapping) and not is_template(h):
        v.err(f"{p}.headers", "must be an object")


async def respond(env: RunEnv, step: Step, input: Any) -> tuple[Any, str]:
    """Hand ``{status, headers, body}`` to a waiting sync caller at once; later steps go on."""
    status = input.get("status", 200)
    if type(status) is not int or not 100 <= status <= 599:  # not a plain valid status
        if isinstance(status, str) and status.strip().isdigit():
            status = int(status)
        if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599:
            raise StepFailed(f"respond status must be an HTTP status 100–599, got {status!r:.60}")
    raw_headers = input.get("headers") or {}
    if type(raw_headers) is not dict and not isinstance(raw_headers, Mapping):
        raise StepFailed("respond headers must be an object")
    headers = (
        {str(k): v if isinstance(v, str) else str(v) for k, v in raw_headers.items()}
        if raw_headers
        else {}
    )
    body = input.get("body")
    if env.on_respond is not None:
        await env.on_respond(status, headers, body)
    return {"status": status, "headers": headers, "body": body}, ""


async def restore(
    run: Walker, step: Step, output: Any, scope: dict[str, Any], where: Where
) -> None:
    """The caller may still be waiting after a redelivery: answer again (a duplicate is
    ignored)."""
    if run.env.on_respond is not None:
        await run.env.on_respond(output["status"], output["headers"], output["body"])


SPEC: Final = StepSpec(
    StepType.RESPOND,
    input_keys=frozenset({"status", "headers", "body"}),
    check_input=check_input,
    piece=respond,
    restore=restore,
    schema=step_schema(
        "respond",
        "The sync webhook's answer, sent when the step runs. Output: {status, headers, body}.",
        {
            "input": obj(
                {
                    "status": {
                        "oneOf": [{"type": "integer", "minimum": 100, "maximum": 599}, STR],
                        "default": 200,
                    },
                    "headers": {"type": "object", "additionalProperties": {"type": "string"}},
                    "body": ANY,
                },
                additionalProperties=False,
            )
        },
    ),
)
