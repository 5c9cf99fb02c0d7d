"""The board in real headless Chromium (Playwright) against a real server, Redis and PostgreSQL.

Skipped when ``/usr/bin/chromium`` or Playwright is missing. Screenshots of every page go to
``tests/artifacts/``; with ``CONVEYOR_UPDATE_DOCS_SCREENSHOT=1`` the overview is also written to
``docs/board-overview.png`` (the README's picture).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from conveyor.board import views
from conveyor.queue import keys as k
from tests.board.conftest import ECHO, FLAKY, create_flow, fire, set_secret, wait_status

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ROOT = Path(__file__).parents[2]
ARTIFACTS = ROOT / "tests" / "artifacts"

if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} not installed: browser tests skipped", allow_module_level=True)
try:
    from playwright.async_api import Browser, Page, async_playwright, expect
except ImportError:  # pragma: no cover - depends on the environment
    pytest.skip("playwright not installed: browser tests skipped", allow_module_level=True)


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    """One headless Chromium for the module (never downloads a browser)."""
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield chromium
        finally:
            await chromium.close()


@pytest.fixture
async def page(browser: Browser, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Page]:
    """A fresh page; the board polls every 400 ms so live updates show quickly."""
    monkeypatch.setattr(views, "REFRESH_MS", 400)
    context = await browser.new_context(viewport={"width": 1100, "height": 800})
    tab = await context.new_page()
    tab.set_default_timeout(15_000)
    try:
        yield tab
    finally:
        await context.close()


async def shot(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"board-{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    return path


def base(client: Any) -> str:
    return str(client.make_url("")).rstrip("/")


async def test_queue_counts_change_live_and_pause_resume(make_client: Any, page: Page) -> None:
    """Pause a queue, fire webhooks, watch the card count them live, resume and see it drain."""
    client = await make_client(AP_CONTAINER_TYPE="WORKER_AND_APP", AP_WORKER_CONCURRENCY="4")
    fid = await create_flow(client, ECHO)
    await page.goto(base(client) + "/admin/queues/runs")
    await page.get_by_role("button", name="Pause queue").click()
    await expect(page.locator("#paused-badge")).to_have_text("paused")
    await expect(page.get_by_role("alert")).to_contain_text("Queue runs paused")
    await page.goto(base(client) + "/admin/queues")
    waiting = page.locator('[data-queue="runs"] [data-stat="waiting"]')
    await expect(waiting).to_have_text("0")
    # A pause reaches consumers within pause_poll_s, but one already blocked in XREADGROUP
    # (block_ms = 1 s) may still take an entry: give that read time to end first.
    await asyncio.sleep(1.5)
    await fire(client, fid, 3)
    await expect(waiting).to_have_text("3")  # live refresh, no reload
    await expect(page.locator('[data-queue="runs"] [data-stat="paused"]')).to_be_visible()
    await shot(page, "overview-paused")
    await page.goto(base(client) + "/admin/queues/runs")
    await expect(page.locator('[data-state="waiting"] .count')).to_have_text("3")
    await page.locator("details summary").first.click()
    await expect(page.locator("details[open] pre").last).to_contain_text("run_id")
    await shot(page, "queue")
    await page.get_by_role("button", name="Resume queue").click()
    await expect(page.get_by_role("alert")).to_contain_text("Queue runs resumed")
    await page.goto(base(client) + "/admin/queues")
    await expect(waiting).to_have_text("0")
    await page.goto(base(client) + "/admin/queues/runs?state=completed")
    await expect(page.locator('[data-state="completed"] .count')).to_have_text("3")


async def test_failed_run_shows_error_and_retry_succeeds(make_client: Any, page: Page) -> None:
    """Open a failed run from the runs list, read its error, fix the secret, retry: SUCCEEDED."""
    client = await make_client(AP_CONTAINER_TYPE="WORKER_AND_APP")
    await set_secret(client, "MODE", "broken-mode")
    fid = await create_flow(client, FLAKY)
    run_id = (await fire(client, fid))[0]
    await wait_status(client, run_id, "FAILED")
    await page.goto(base(client) + "/admin/runs")
    await page.get_by_label("Status").select_option("FAILED")
    await page.get_by_role("button", name="Filter").click()
    row = page.locator(f'tr[data-run="{run_id}"]')
    await expect(row).to_contain_text("upstream refused the order")
    await shot(page, "runs")
    await row.get_by_role("link").click()
    await expect(page.locator("#run-status")).to_have_text("FAILED")
    await expect(page.locator("#run-error")).to_contain_text(
        "ValueError: upstream refused the order"
    )
    await expect(page.locator('[data-step="check"] .badge')).to_have_text("FAILED")
    await shot(page, "run-failed")
    await set_secret(client, "MODE", "healthy-mode")
    await expect(page.locator("#live-status")).to_contain_text("Updated")  # polled at least once
    await page.get_by_role("button", name="Retry from failed step").click()
    await expect(page).to_have_url(base(client) + f"/admin/runs/{run_id}")
    await expect(page.get_by_role("alert").first).to_contain_text("Run retried")
    await expect(page.locator("#run-status")).to_have_text("SUCCEEDED")
    await expect(page.locator('[data-step="check"] .badge')).to_have_text("SUCCEEDED")
    await expect(page.locator("#run-error")).to_have_count(0)
    await shot(page, "run-succeeded")


async def test_hostile_flow_name_renders_inert(make_client: Any, page: Page) -> None:
    """A flow named <script>alert(1)</script> shows as text on every page, and no dialog opens."""
    client = await make_client(AP_CONTAINER_TYPE="WORKER_AND_APP")
    name = "<script>alert(1)</script>"
    fid = await create_flow(client, {**ECHO, "name": name})
    run_id = (await fire(client, fid))[0]
    await wait_status(client, run_id, "SUCCEEDED")
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    await page.goto(base(client) + "/admin/flows")
    await expect(page.locator(".flow-name")).to_have_text(name)
    copy = page.get_by_role("button", name=f"Copy webhook URL of {name}")
    await copy.click()
    await expect(copy).to_have_text("Copied")
    await shot(page, "flows")
    for path in ("/admin/runs", f"/admin/runs/{run_id}", "/admin/flows"):
        await page.goto(base(client) + path)
        await page.wait_for_timeout(600)  # at least one live refresh swapped its regions
        scripts = await page.evaluate(
            "Array.from(document.scripts).filter(s => s.textContent.includes('alert')).length"
        )
        assert scripts == 0, path
    await expect(page.locator(f'tr[data-run="{run_id}"]')).to_have_count(0)
    assert dialogs == []


async def test_workers_page_keyboard_labels_and_phone_width(make_client: Any, page: Page) -> None:
    """Workers page lists the live worker; labelled controls, Tab skip link, no 375-px scroll."""
    client = await make_client(AP_CONTAINER_TYPE="WORKER_AND_APP", AP_WORKER_CONCURRENCY="2")
    fid = await create_flow(client, ECHO)
    await fire(client, fid, 1)
    await page.goto(base(client) + "/admin/workers")
    row = page.locator("tr[data-worker]")
    await expect(row).to_have_count(1)
    await expect(row).to_contain_text("WORKER_AND_APP")
    await expect(row.locator(".badge")).to_have_text("live")
    await shot(page, "workers")
    await page.keyboard.press("Tab")
    focused = await page.evaluate("document.activeElement.textContent")
    assert focused == "Skip to content"
    await page.set_viewport_size({"width": 375, "height": 740})
    for path in (
        "/admin/queues",
        "/admin/queues/runs",
        "/admin/runs",
        "/admin/flows",
        "/admin/workers",
    ):
        await page.goto(base(client) + path)
        unlabeled = await page.evaluate(
            """Array.from(document.querySelectorAll('input:not([type=hidden]), select, button'))
               .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
                             && !el.textContent.trim()).length"""
        )
        assert unlabeled == 0, path
        width = await page.evaluate("document.documentElement.scrollWidth")
        assert width <= 375, (path, width)
        await shot(page, "phone-" + (path.strip("/").replace("/", "-") or "root"))


async def test_overview_screenshot(make_client: Any, page: Page, redis: aioredis.Redis) -> None:
    """The overview with 15 minutes of history, a dead job and advice (the README picture)."""
    client = await make_client(AP_CONTAINER_TYPE="WORKER_AND_APP", AP_WORKER_CONCURRENCY="4")
    fid = await create_flow(client, ECHO)
    await fire(client, fid, 5)
    await client.post("/api/v1/queues/runs/pause")
    await asyncio.sleep(1.5)  # let a consumer's blocking read end (see the pause test)
    await fire(client, fid, 120)  # a backlog over the threshold: "add workers"
    now = int(time.time())
    for queue, scale in (("sync", 4), ("runs", 1)):
        points = []
        for i in range(90):
            t = now - 890 + i * 10
            wave = (i % 30) / 30
            points.append(
                {
                    "t": t,
                    "waiting": int(scale * 40 * wave) if queue == "sync" else i + 30,
                    "active": 4,
                    "delayed": 0,
                    "dead": 0,
                    "throughput_1m": int(scale * 600 * (0.6 + 0.4 * wave)),
                    "oldest_wait_s": 0.2,
                    "avg_wait_s": 0.05,
                }
            )
        # The sampler's list is newest first.
        await redis.lpush(k.history(queue), *[orjson.dumps(p) for p in points])
    await page.goto(base(client) + "/admin/queues")
    await expect(page.locator(".banner-warn").first).to_contain_text("add workers")
    await expect(page.locator('[data-queue="runs"] [data-stat="waiting"]')).to_have_text("120")
    await expect(page.locator(".advice")).to_contain_text("1 live")
    path = await shot(page, "overview")
    if os.environ.get("CONVEYOR_UPDATE_DOCS_SCREENSHOT") == "1":
        await page.screenshot(path=str(ROOT / "docs" / "board-overview.png"), full_page=False)
    assert path.stat().st_size > 10_000
