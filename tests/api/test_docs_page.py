"""``/api/docs``: the page, its assets and document over HTTP, then in real headless Chromium.

The browser part is skipped when ``/usr/bin/chromium`` or Playwright is missing (and fails
instead under ``CONVEYOR_CI=1``, where .ci/run installs both).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from aiohttp.test_utils import TestClient

from tests.api.conftest import AppFactory

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
KEY = "docs-k3y"


@pytest.fixture
async def keyed(make_client: AppFactory) -> TestClient[Any, Any]:
    """An APP-role server with an API key."""
    client: TestClient[Any, Any] = await make_client(AP_CONTAINER_TYPE="APP", AP_API_KEY=KEY)
    return client


async def test_page_and_assets_are_public_api_is_not(keyed: TestClient[Any, Any]) -> None:
    """The page, its document and assets need no key; the API still does."""
    page = await keyed.get("/api/docs")
    assert page.status == 200
    html = await page.text()
    assert "<script>" not in html and "http" not in html.replace("http-equiv", "")
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    for asset in ("swagger-ui.css", "swagger-ui-bundle.js", "init.js"):
        resp = await keyed.get(f"/api/docs/assets/{asset}")
        assert resp.status == 200, asset
        assert len(await resp.read()) > 100
    assert "validatorUrl: null" in await (await keyed.get("/api/docs/assets/init.js")).text()
    missing = await keyed.get("/api/docs/assets/..%2Fsetup.py")
    assert missing.status == 404 and (await missing.json())["error"]["code"] == "NOT_FOUND"
    assert (await keyed.get("/api/docs/assets/index.html")).status == 404
    spec = await (await keyed.get("/api/docs/openapi.json")).json()
    assert spec["openapi"] == "3.0.3"
    scheme = spec["components"]["securitySchemes"]["bearer"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    assert (await keyed.get("/api/v1/flows")).status == 401
    assert (await keyed.get("/api/v1/openapi.json")).status == 401


async def test_docs_routes_in_the_api_document(keyed: TestClient[Any, Any]) -> None:
    """The docs routes are listed, without the bearer requirement the API has."""
    spec = await (await keyed.get("/api/docs/openapi.json")).json()
    for path in ("/api/docs", "/api/docs/openapi.json", "/api/docs/assets/{name}"):
        assert "security" not in spec["paths"][path]["get"], path
    assert spec["paths"]["/api/v1/flow-runs"]["get"]["security"] == [{"bearer": []}]


def _browser_or_skip() -> Any:
    reason = None
    if not Path(CHROMIUM).exists():
        reason = f"{CHROMIUM} not installed"
    try:
        from playwright.async_api import async_playwright  # noqa: PLC0415
    except ImportError:  # pragma: no cover - depends on the environment
        reason = "playwright not installed"
    if reason:
        if os.environ.get("CONVEYOR_CI") == "1":
            pytest.fail(f"{reason}: .ci/run must install it")
        pytest.skip(f"{reason}: browser test skipped")
    return async_playwright


@pytest.fixture
async def chromium() -> AsyncIterator[Any]:
    """Headless Chromium from the system (never downloads a browser)."""
    async_playwright = _browser_or_skip()
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield browser
        finally:
            await browser.close()


async def test_page_lists_operations_and_stays_on_the_machine(
    keyed: TestClient[Any, Any], chromium: Any
) -> None:
    """Chromium renders every operation; Authorize + Try it out calls the API with the key;
    every request the page makes goes to 127.0.0.1."""
    from playwright.async_api import expect  # noqa: PLC0415

    base = str(keyed.make_url("")).rstrip("/")
    spec = await (await keyed.get("/api/docs/openapi.json")).json()
    n_ops = sum(len(ops) for ops in spec["paths"].values())
    context = await chromium.new_context(viewport={"width": 1200, "height": 900})
    page = await context.new_page()
    page.set_default_timeout(20_000)
    requests: list[Any] = []
    page.on("request", lambda req: requests.append(req))  # noqa: PLW0108 - playwright needs a Python function
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        await page.goto(base + "/api/docs")
        await expect(page.locator(".opblock")).to_have_count(n_ops)
        await expect(page.locator("#operations-flows-get_api_v1_flows")).to_be_visible()
        # The API key, entered once with Authorize, goes with "Try it out".
        await page.locator("button.authorize").first.click()
        await page.locator(".auth-container input").fill(KEY)
        await page.locator(".auth-btn-wrapper button.authorize").click()
        await page.locator(".auth-btn-wrapper button.btn-done").click()
        op = page.locator("#operations-flows-get_api_v1_flows")
        await op.locator(".opblock-summary").click()
        await op.locator("button.try-out__btn").click()
        await op.locator("button.execute").click()
        status = op.locator(".live-responses-table tbody td.response-col_status").first
        await expect(status).to_have_text("200")
    finally:
        await context.close()
    assert errors == []
    urls = [r.url for r in requests]
    assert any(u.endswith("/api/docs/openapi.json") for u in urls)
    api_calls = [r for r in requests if urlsplit(r.url).path == "/api/v1/flows"]
    assert api_calls, urls
    assert all(r.headers.get("authorization") == f"Bearer {KEY}" for r in api_calls)
    off_machine = [u for u in urls if urlsplit(u).hostname != "127.0.0.1"]
    assert off_machine == [], off_machine


async def _try_it_out(page: Any, op_id: str, params: dict[str, str] | None = None) -> Any:
    """Open an operation, press Try it out, fill path parameters, Execute; the operation."""
    op = page.locator(f"#operations-{op_id}")
    await op.locator(".opblock-summary").click()
    await op.locator("button.try-out__btn").click()
    for name, value in (params or {}).items():
        await op.locator(f'tr[data-param-name="{name}"] input').fill(value)
    await op.locator("button.execute").click()
    return op


async def test_try_it_out_creates_a_flow_that_answers(
    make_client: AppFactory, chromium: Any
) -> None:
    """From the page alone: Authorize, create the example flow with its example body (201),
    then call the flow's sync webhook with its example body: 200 and the respond step's
    answer. Requests off 127.0.0.1 are aborted and fail the test."""
    from playwright.async_api import expect  # noqa: PLC0415

    server: TestClient[Any, Any] = await make_client(
        AP_CONTAINER_TYPE="WORKER_AND_APP", AP_WORKER_CONCURRENCY="2", AP_API_KEY=KEY
    )
    base = str(server.make_url("")).rstrip("/")
    context = await chromium.new_context(viewport={"width": 1200, "height": 900})
    page = await context.new_page()
    page.set_default_timeout(30_000)
    off_machine: list[str] = []
    requests: list[Any] = []
    page.on("request", lambda req: requests.append(req))  # noqa: PLW0108 - playwright needs a Python function

    async def only_loopback(route: Any) -> None:
        if urlsplit(route.request.url).hostname == "127.0.0.1":
            await route.continue_()
        else:
            off_machine.append(route.request.url)
            await route.abort()

    await page.route("**/*", only_loopback)
    try:
        await page.goto(base + "/api/docs")
        await page.locator("button.authorize").first.click()
        await page.locator(".auth-container input").fill(KEY)
        await page.locator(".auth-btn-wrapper button.authorize").click()
        await page.locator(".auth-btn-wrapper button.btn-done").click()

        create = await _try_it_out(page, "flows-post_api_v1_flows")
        status = create.locator(".live-responses-table tbody td.response-col_status").first
        await expect(status).to_have_text("201")
        listing = await server.get(
            "/api/v1/flows",
            params={"name": "hello-docs"},
            headers={"Authorization": f"Bearer {KEY}"},
        )
        (flow,) = (await listing.json())["data"]
        await expect(create.locator(".live-responses-table .microlight").first).to_contain_text(
            flow["id"]
        )

        hook = await _try_it_out(
            page, "webhooks-post_api_v1_webhooks_flow_id_sync", {"flow_id": flow["id"]}
        )
        status = hook.locator(".live-responses-table tbody td.response-col_status").first
        await expect(status).to_have_text("200")
        await expect(hook.locator(".live-responses-table .microlight").first).to_contain_text(
            "Hello, Ada!"
        )
    finally:
        await context.close()
    assert off_machine == []
    assert all(urlsplit(r.url).hostname == "127.0.0.1" for r in requests)
    created = [
        r for r in requests if r.method == "POST" and urlsplit(r.url).path == "/api/v1/flows"
    ]
    assert [r.headers.get("authorization") for r in created] == [f"Bearer {KEY}"]
    hooks = [r for r in requests if urlsplit(r.url).path.endswith("/sync")]
    assert len(hooks) == 1 and "authorization" not in hooks[0].headers  # public: no key sent
    assert hooks[0].post_data_json == {"name": "Ada"}
