"""Flows API: create/list/read/update/delete, enable/disable, validation errors with paths."""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import TestClient

FLOW = {
    "name": "order-alert",
    "trigger": {"type": "webhook"},
    "steps": [
        {"name": "parse", "type": "transform", "input": {"total": "{{trigger.body.amount}}"}},
        {"name": "reply", "type": "respond", "input": {"status": 200, "body": "{{parse.total}}"}},
    ],
}


async def test_create_returns_flat_flow(client: TestClient[Any, Any]) -> None:
    """POST creates an enabled flow at version 1 with its webhook URLs."""
    resp = await client.post("/api/v1/flows", json=FLOW)
    assert resp.status == 201
    body = await resp.json()
    assert set(body) == {
        "id",
        "name",
        "version",
        "enabled",
        "trigger",
        "steps",
        "webhook_url",
        "sync_webhook_url",
        "created_at",
        "updated_at",
    }
    assert (body["name"], body["version"], body["enabled"]) == ("order-alert", 1, True)
    assert body["webhook_url"].endswith(f"/api/v1/webhooks/{body['id']}")
    assert body["sync_webhook_url"] == body["webhook_url"] + "/sync"
    proxied = await client.get(
        f"/api/v1/flows/{body['id']}",
        headers={"X-Forwarded-Proto": "https", "X-Forwarded-Host": "localhost:8443"},
    )
    assert (await proxied.json())["webhook_url"] == (
        f"https://localhost:8443/api/v1/webhooks/{body['id']}"
    )


async def test_yaml_update_makes_new_version(client: TestClient[Any, Any]) -> None:
    """PUT with YAML makes version 2; list pages newest first."""
    created = await (await client.post("/api/v1/flows", json=FLOW)).json()
    yaml_doc = (
        "name: order-alert\ntrigger: {type: webhook}\nsteps:\n"
        "  - {name: parse, type: transform, input: {x: 1}}\n"
    )
    resp = await client.put(
        f"/api/v1/flows/{created['id']}",
        data=yaml_doc,
        headers={"Content-Type": "application/yaml"},
    )
    assert resp.status == 200
    assert (await resp.json())["version"] == 2
    await client.post("/api/v1/flows", json={**FLOW, "name": "second"})
    page = await (await client.get("/api/v1/flows?limit=1")).json()
    assert [f["name"] for f in page["data"]] == ["second"] and page["next_cursor"]
    page2 = await (await client.get(f"/api/v1/flows?limit=1&cursor={page['next_cursor']}")).json()
    assert [f["name"] for f in page2["data"]] == ["order-alert"]


async def test_invalid_flow_is_422_with_paths(client: TestClient[Any, Any]) -> None:
    """A bad document answers 422 FLOW_INVALID naming each problem's path."""
    bad = {
        **FLOW,
        "steps": [
            {"name": "parse", "type": "transform", "input": {"x": "{{pars.total}}"}},
            {"name": "z", "type": "nope"},
        ],
    }
    resp = await client.post("/api/v1/flows", json=bad)
    assert resp.status == 422
    err = (await resp.json())["error"]
    assert err["code"] == "FLOW_INVALID"
    paths = {d["path"] for d in err["details"]}
    assert "steps[0].input.x" in paths and any(p.startswith("steps[1]") for p in paths)


async def test_duplicate_name_conflict_and_missing_flow(client: TestClient[Any, Any]) -> None:
    """A taken name is 409; unknown ids are 404 with a JSON error."""
    assert (await client.post("/api/v1/flows", json=FLOW)).status == 201
    dup = await client.post("/api/v1/flows", json=FLOW)
    assert dup.status == 409 and (await dup.json())["error"]["code"] == "CONFLICT"
    missing = await client.get("/api/v1/flows/00000000-0000-7000-8000-000000000000")
    assert missing.status == 404 and "error" in await missing.json()
    assert (await client.get("/api/v1/flows/not-a-uuid")).status == 404
    assert (
        await client.post(
            "/api/v1/flows", data=b"{not json", headers={"Content-Type": "application/json"}
        )
    ).status == 422


async def test_enable_disable_delete(client: TestClient[Any, Any]) -> None:
    """Disable/enable flip the flag; delete removes the flow."""
    fid = (await (await client.post("/api/v1/flows", json=FLOW)).json())["id"]
    assert (await (await client.post(f"/api/v1/flows/{fid}/disable")).json())["enabled"] is False
    assert (await (await client.post(f"/api/v1/flows/{fid}/enable")).json())["enabled"] is True
    assert (await client.delete(f"/api/v1/flows/{fid}")).status == 204
    assert (await client.get(f"/api/v1/flows/{fid}")).status == 404


async def test_api_key_enforced(make_client: Any) -> None:
    """With AP_API_KEY, /api/v1 needs the bearer token; webhooks and health do not."""
    c = await make_client(AP_CONTAINER_TYPE="APP", AP_API_KEY="k3y")
    assert (await c.get("/api/v1/flows")).status == 401
    ok = await c.get("/api/v1/flows", headers={"Authorization": "Bearer k3y"})
    assert ok.status == 200
    assert (await c.get("/healthz")).status == 200
    hook = await c.post("/api/v1/webhooks/00000000-0000-7000-8000-000000000000", json={})
    assert hook.status == 404


async def test_openapi_lists_every_route(client: TestClient[Any, Any]) -> None:
    """Every route in the router appears in /api/v1/openapi.json."""
    spec = await (await client.get("/api/v1/openapi.json")).json()
    for route in client.app.router.routes():
        info = route.resource.get_info()
        path = info.get("path") or info.get("formatter")
        if route.method == "HEAD" or not path or path.startswith("/admin") or path.endswith("/"):
            continue
        assert path in spec["paths"], path
        method = "post" if route.method == "*" else route.method.lower()
        assert method in spec["paths"][path]
    ids = [op["operationId"] for ops in spec["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids))
    # The documented API routes, spelled out here rather than derived from the router.
    design = {
        ("post", "/api/v1/webhooks/{flow_id}"),
        ("get", "/api/v1/webhooks/{flow_id}/sync"),
        ("post", "/api/v1/flows"),
        ("get", "/api/v1/flows"),
        ("get", "/api/v1/flows/{id}"),
        ("put", "/api/v1/flows/{id}"),
        ("delete", "/api/v1/flows/{id}"),
        ("post", "/api/v1/flows/{id}/enable"),
        ("post", "/api/v1/flows/{id}/disable"),
        ("post", "/api/v1/flows/{id}/run"),
        ("put", "/api/v1/secrets/{name}"),
        ("get", "/api/v1/secrets"),
        ("delete", "/api/v1/secrets/{name}"),
        ("get", "/api/v1/flow-runs"),
        ("get", "/api/v1/flow-runs/{id}"),
        ("post", "/api/v1/flow-runs/{id}/retry"),
        ("post", "/api/v1/flow-runs/{id}/cancel"),
        ("get", "/api/v1/queues"),
        ("get", "/api/v1/queues/{q}/jobs"),
        ("post", "/api/v1/queues/{q}/pause"),
        ("post", "/api/v1/queues/{q}/resume"),
        ("post", "/api/v1/queues/{q}/clean"),
        ("post", "/api/v1/queues/{q}/jobs/{id}/retry"),
        ("delete", "/api/v1/queues/{q}/jobs/{id}"),
        ("get", "/api/v1/workers"),
        ("get", "/api/v1/scaling"),
        ("get", "/healthz"),
        ("get", "/readyz"),
        ("get", "/metrics"),
        ("get", "/api/v1/openapi.json"),
    }
    missing = {(m, p) for m, p in design if m not in spec["paths"].get(p, {})}
    assert missing == set()
    assert spec["paths"]["/api/v1/flows"]["get"]["security"] == [{"bearer": []}]
    assert "security" not in spec["paths"]["/api/v1/webhooks/{flow_id}"]["post"]
