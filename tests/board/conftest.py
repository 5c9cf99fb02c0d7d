"""Board fixtures: the API conftest's real servers plus helpers that drive flows and runs."""

from __future__ import annotations

import re
from typing import Any

from aiohttp.test_utils import TestClient

from tests.api.conftest import make_client, make_settings
from tests.polling import eventually

__all__ = ["make_client", "make_settings"]

Client = TestClient[Any, Any]

#: A flow whose code step fails until the secret MODE is "healthy-mode".
FLAKY = {
    "name": "flaky",
    "trigger": {"type": "webhook"},
    "steps": [
        {"name": "prepare", "type": "transform", "input": {"n": "{{trigger.body.n}}"}},
        {
            "name": "check",
            "type": "code",
            "input": {"mode": "{{secrets.MODE}}", "n": "{{prepare.n}}"},
            "code": (
                "def run(input):\n"
                "    if input['mode'] != 'healthy-mode':\n"
                "        raise ValueError('upstream refused the order')\n"
                "    return {'n': input['n'], 'ok': True}\n"
            ),
        },
    ],
}

ECHO = {
    "name": "echo",
    "trigger": {"type": "webhook"},
    "steps": [{"name": "t", "type": "transform", "input": {"x": "{{trigger.body.x}}"}}],
}

_CSRF = re.compile(r'name="csrf-token" content="([0-9a-f]+)"')


async def create_flow(client: Client, doc: dict[str, Any]) -> str:
    resp = await client.post("/api/v1/flows", json=doc)
    assert resp.status == 201, await resp.text()
    flow_id: str = (await resp.json())["id"]
    return flow_id


async def set_secret(client: Client, name: str, value: str) -> None:
    resp = await client.put(f"/api/v1/secrets/{name}", json={"value": value})
    assert resp.status in (200, 201, 204), await resp.text()


async def fire(client: Client, flow_id: str, n: int = 1) -> list[str]:
    ids = []
    for i in range(n):
        resp = await client.post(f"/api/v1/webhooks/{flow_id}", json={"x": i, "n": i})
        assert resp.status == 202, await resp.text()
        ids.append(resp.headers["x-run-id"])
    return ids


async def wait_status(
    client: Client, run_id: str, *statuses: str, timeout_s: float = 15
) -> dict[str, Any]:
    """Poll the API until the run reaches one of ``statuses``."""
    run: dict[str, Any] = {}

    async def reached() -> dict[str, Any] | None:
        run.update(await (await client.get(f"/api/v1/flow-runs/{run_id}")).json())
        return dict(run) if run.get("status") in statuses else None

    try:
        return await eventually(reached, timeout_s=timeout_s, interval_s=0.05)
    except AssertionError:
        raise AssertionError(
            f"run {run_id} stuck in {run.get('status')}, wanted {statuses}"
        ) from None


async def csrf(client: Client, path: str = "/admin/queues") -> str:
    """Open a board page (which sets the nonce cookie) and return its form token."""
    resp = await client.get(path)
    assert resp.status == 200, await resp.text()
    match = _CSRF.search(await resp.text())
    assert match, "no CSRF token on the page"
    return match.group(1)


async def act(client: Client, path: str, token: str, **fields: str) -> tuple[int, str]:
    """POST a board action; returns the status and the Location (no redirect followed)."""
    resp = await client.post(path, data={"csrf_token": token, **fields}, allow_redirects=False)
    return resp.status, resp.headers.get("Location", "")
