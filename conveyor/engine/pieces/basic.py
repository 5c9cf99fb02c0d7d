"""The two pieces that need nothing but the rendered input: transform and respond."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from conveyor.engine.context import RunEnv
from conveyor.engine.errors import StepFailed
from conveyor.engine.flow import Step


async def transform(env: RunEnv, step: Step, input: Any) -> tuple[Any, str]:
    """Output is the rendered input itself."""
    return input, ""


async def respond(env: RunEnv, step: Step, input: Any) -> tuple[Any, str]:
    """Hand ``{status, headers, body}`` to a waiting sync caller at once; later steps go on."""
    status = input.get("status", 200)
    if isinstance(status, str) and status.strip().isdigit():
        status = int(status)
    if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599:
        raise StepFailed(f"respond status must be an HTTP status 100–599, got {status!r:.60}")
    raw_headers = input.get("headers") or {}
    if not isinstance(raw_headers, Mapping):
        raise StepFailed("respond headers must be an object")
    headers = {str(k): v if isinstance(v, str) else str(v) for k, v in raw_headers.items()}
    body = input.get("body")
    if env.on_respond is not None:
        await env.on_respond(status, headers, body)
    return {"status": status, "headers": headers, "body": body}, ""
