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
    assert spec["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
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
        await expect(page.locator("#operations-default-get_api_v1_flows")).to_be_visible()
        # The API key, entered once with Authorize, goes with "Try it out".
        await page.locator("button.authorize").first.click()
        await page.locator(".auth-container input").fill(KEY)
        await page.locator(".auth-btn-wrapper button.authorize").click()
        await page.locator(".auth-btn-wrapper button.btn-done").click()
        op = page.locator("#operations-default-get_api_v1_flows")
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
