"""Issue 10, finding 4: the board refuses DNS rebinding and honours ``AP_API_KEY``.

A page on ``http://evil.example:8080`` whose name resolves to 127.0.0.1 sends ``Host:
evil.example:8080`` and ``Origin: http://evil.example:8080``; the board answers only its own
names, refuses foreign origins on POST, and asks for credentials whenever the API key is set.
"""

from __future__ import annotations

import base64
from typing import Any

from aiohttp.test_utils import TestClient

from tests.api.conftest import make_client
from tests.board.conftest import csrf

__all__ = ["make_client"]

Client = TestClient[Any, Any]
KEY = "board-api-key-123"


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


async def test_foreign_host_is_refused(make_client: Any) -> None:
    """A rebinding page's Host gets 421 on pages, live JSON and actions; loopback names pass."""
    client: Client = await make_client(AP_CONTAINER_TYPE="APP")
    for path in ("/admin/queues", "/admin/api/runs", "/admin/runs"):
        resp = await client.get(path, headers={"Host": "evil.example:8080"})
        assert resp.status == 421, path
        assert "AP_FRONTEND_URL" in await resp.text()
    resp = await client.post("/admin/queues/runs/pause", headers={"Host": "evil.example"})
    assert resp.status == 421
    for host in ("127.0.0.1:8080", "localhost:8080", "[::1]:8080", "app.localhost"):
        assert (await client.get("/admin/queues", headers={"Host": host})).status == 200, host


async def test_configured_hosts_are_answered(make_client: Any) -> None:
    """AP_FRONTEND_URL's host and AP_QUEUE_UI_ALLOWED_HOSTS names/CIDRs are accepted."""
    client: Client = await make_client(
        AP_CONTAINER_TYPE="APP",
        AP_FRONTEND_URL="https://conveyor.example.com",
        AP_QUEUE_UI_ALLOWED_HOSTS="ops.example.net,10.1.0.0/16",
    )
    for host in ("conveyor.example.com", "ops.example.net:8443", "10.1.2.3:8080"):
        assert (await client.get("/admin/queues", headers={"Host": host})).status == 200, host
    for host in ("example.com", "evil.conveyor.example.com", "10.2.0.1", ""):
        assert (await client.get("/admin/queues", headers={"Host": host})).status == 421, host


async def test_network_bind_without_host_list_needs_credentials_only(make_client: Any) -> None:
    """On a non-loopback bind with no host list any Host is answered, but only with creds."""
    client: Client = await make_client(
        AP_CONTAINER_TYPE="APP",
        AP_HOST="0.0.0.0",
        AP_API_KEY=KEY,
        AP_QUEUE_UI_USERNAME="ops",
        AP_QUEUE_UI_PASSWORD="pw",
    )
    headers = {"Host": "conveyor.internal:8080"}
    assert (await client.get("/admin/queues", headers=headers)).status == 401
    ok = await client.get("/admin/queues", headers={**headers, **basic("ops", "pw")})
    assert ok.status == 200


async def test_cross_origin_post_is_refused(make_client: Any) -> None:
    """A POST whose Origin is another site (or null) is refused even with a valid token."""
    client: Client = await make_client(AP_CONTAINER_TYPE="APP")
    token = await csrf(client)
    own = f"http://{client.host}:{client.port}"
    for origin in ("http://evil.example:8080", "null", "http://localhost:1", "file://x"):
        resp = await client.post(
            "/admin/queues/runs/pause",
            data={"csrf_token": token},
            headers={"Origin": origin},
            allow_redirects=False,
        )
        assert resp.status == 403, origin
    resp = await client.post(
        "/admin/queues/runs/pause",
        data={"csrf_token": token},
        headers={"Origin": own},
        allow_redirects=False,
    )
    assert resp.status in (302, 303), await resp.text()


async def test_api_key_protects_the_board(make_client: Any) -> None:
    """With AP_API_KEY set the board needs it: basic password (any user) or bearer."""
    client: Client = await make_client(AP_CONTAINER_TYPE="APP", AP_API_KEY=KEY)
    for path in ("/admin/queues", "/admin/api/runs", "/admin/flows"):
        resp = await client.get(path)
        assert resp.status == 401, path
        assert resp.headers["WWW-Authenticate"].startswith("Basic")
    assert (await client.get("/admin/queues", headers=basic("x", "wrong"))).status == 401
    assert (await client.get("/admin/queues", headers=basic("", KEY))).status == 200
    assert (await client.get("/admin/queues", headers=basic("ops", KEY))).status == 200
    bearer = {"Authorization": f"Bearer {KEY}"}
    assert (await client.get("/admin/api/runs", headers=bearer)).status == 200
    wrong = {"Authorization": f"Bearer {KEY}x"}
    assert (await client.get("/admin/api/runs", headers=wrong)).status == 401
    post = await client.post("/admin/queues/runs/pause")
    assert post.status == 401


async def test_board_credentials_and_api_key_both_work(make_client: Any) -> None:
    """With board credentials and an API key, either opens the board; nothing else does."""
    client: Client = await make_client(
        AP_CONTAINER_TYPE="APP",
        AP_API_KEY=KEY,
        AP_QUEUE_UI_USERNAME="ops",
        AP_QUEUE_UI_PASSWORD="pw",
    )
    assert (await client.get("/admin/queues", headers=basic("ops", "pw"))).status == 200
    assert (await client.get("/admin/queues", headers=basic("ops", KEY))).status == 200
    assert (await client.get("/admin/queues", headers=basic("ops", "nope"))).status == 401
    assert (await client.get("/admin/queues", headers=basic("other", "pw"))).status == 401
    bad = {"Authorization": "Basic !!notbase64"}
    assert (await client.get("/admin/queues", headers=bad)).status == 401


XSS = '<script>alert("x")</script><img src=x onerror=alert(1)>'


async def test_board_escapes_hostile_names_and_payloads(make_client: Any) -> None:
    """A flow name, a webhook body, query and header full of HTML render escaped everywhere."""
    client: Client = await make_client(AP_CONTAINER_TYPE="APP")
    doc = {
        "name": XSS,
        "trigger": {"type": "webhook"},
        "steps": [{"name": "t", "type": "transform", "input": {"b": "{{trigger.body}}"}}],
    }
    resp = await client.post("/api/v1/flows", json=doc)
    assert resp.status == 201
    fid = (await resp.json())["id"]
    hook = await client.post(
        f"/api/v1/webhooks/{fid}", params={"q": XSS}, json={XSS: XSS}, headers={"X-Evil": XSS}
    )
    run_id = (await hook.json())["run_id"]
    for path in (
        "/admin/flows",
        "/admin/runs",
        f"/admin/runs/{run_id}",
        f"/admin/runs?status={XSS}",
    ):
        page = await (await client.get(path)).text()
        assert "<script>alert" not in page and "<img src=x" not in page, path
    page = await (await client.get(f"/admin/runs/{run_id}")).text()
    assert "&lt;script&gt;" in page or "&lt;img" in page
