"""Issue 10, findings 9 and 10: what anonymous sync callers see; secret names; reused keys.

A failed sync run answers ``{"error": {"code": <run status>, "message"}, "run_id"}`` naming
the step only — the step's error (tracebacks, internal URLs) stays in the run record behind
the API key. Secret names end at ``\\Z`` (no trailing newline), and an ``Idempotency-Key``
reused for a different body is a 422 that says so.
"""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import TestClient

from tests.api.conftest import make_client

__all__ = ["make_client"]

Client = TestClient[Any, Any]
KEY = "sync-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
INTERNAL = "http://127.0.0.1:9/internal/admin?token=internal-token-1"


async def test_sync_failure_hides_step_error_but_run_keeps_it(make_client: Any) -> None:
    """500 body: status code, step name, run id; no URL, no token, no step message."""
    client: Client = await make_client(AP_API_KEY=KEY)
    doc = {
        "name": "leaky",
        "trigger": {"type": "webhook"},
        "steps": [{"name": "call", "type": "http", "input": {"url": INTERNAL}}],
    }
    resp = await client.post("/api/v1/flows", json=doc, headers=AUTH)
    fid = (await resp.json())["id"]
    resp = await client.post(f"/api/v1/webhooks/{fid}/sync", json={})
    assert resp.status == 500
    text = await resp.text()
    body = await resp.json()
    assert set(body) == {"error", "run_id"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == "FAILED" and "'call'" in body["error"]["message"]
    for leak in ("127.0.0.1", "internal", "token", "SSRF", "Traceback", "conveyor/"):
        assert leak not in text, leak
    assert (await client.get(f"/api/v1/flow-runs/{body['run_id']}")).status == 401
    run = await (await client.get(f"/api/v1/flow-runs/{body['run_id']}", headers=AUTH)).json()
    assert run["status"] == "FAILED" and "127.0.0.1" in run["error"]["message"]


async def test_secret_name_with_trailing_newline_is_refused(make_client: Any) -> None:
    """PUT /api/v1/secrets/NAME%0A is a 400, not a secret named "NAME\\n"."""
    client: Client = await make_client(AP_CONTAINER_TYPE="APP")
    for name in ("TOKEN%0A", "TOKEN%0D%0A", "TOK%00EN"):
        resp = await client.put(f"/api/v1/secrets/{name}", json={"value": "v"})
        assert resp.status == 400, name
    assert (await client.put("/api/v1/secrets/TOKEN", json={"value": "v"})).status == 201
    names = [s["name"] for s in (await (await client.get("/api/v1/secrets")).json())["data"]]
    assert names == ["TOKEN"]


async def test_idempotency_key_reused_with_another_body_is_422(make_client: Any) -> None:
    """Same key + same body replays the first answer; same key + other body is a 422."""
    client: Client = await make_client(AP_CONTAINER_TYPE="APP")
    doc = {
        "name": "idem",
        "trigger": {"type": "webhook"},
        "steps": [{"name": "t", "type": "transform", "input": {"b": "{{trigger.body}}"}}],
    }
    fid = (await (await client.post("/api/v1/flows", json=doc)).json())["id"]
    url = f"/api/v1/webhooks/{fid}"
    headers = {"Idempotency-Key": "order-77"}
    first = await client.post(url, json={"a": 1, "b": [1.5, "x"]}, headers=headers)
    assert first.status == 202
    run_id = (await first.json())["run_id"]
    same = await client.post(url, data='{"b": [1.5, "x"], "a": 1}', headers={
        **headers, "Content-Type": "application/json"})  # fmt: skip
    assert same.status == 202 and (await same.json())["run_id"] == run_id
    other = await client.post(url, json={"a": 2}, headers=headers)
    assert other.status == 422
    body = await other.json()
    assert body["error"]["code"] == "IDEMPOTENCY_KEY_REUSED" and body["run_id"] == run_id
    assert "Idempotency-Key" in body["error"]["message"]
