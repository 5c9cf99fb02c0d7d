"""The board in real headless Chromium (Playwright) against a real server, Redis and PostgreSQL.

Skipped when ``/usr/bin/chromium`` or Playwright is missing (failed instead with
``CONVEYOR_CI=1``). Screenshots of every page go to ``tests/artifacts/``; with
``CONVEYOR_UPDATE_DOCS_SCREENSHOT=1`` the overview is also written to
``docs/board-overview.png`` (the README's picture). Every test's page fails it if a request
leaves 127.0.0.1 or the Content-Security-Policy refuses anything.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

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


def _missing(what: str) -> None:
    """Skip the module, or with ``CONVEYOR_CI=1`` fail it: CI must run the browser tests."""
    if os.environ.get("CONVEYOR_CI") == "1":
        raise RuntimeError(f"{what} not installed, and CONVEYOR_CI=1 needs the browser tests")
    pytest.skip(f"{what} not installed: browser tests skipped", allow_module_level=True)


if not Path(CHROMIUM).exists():
    _missing(CHROMIUM)
try:
    from playwright.async_api import Browser, Dialog, Locator, Page, Route, async_playwright, expect
except ImportError:  # pragma: no cover - depends on the environment
    _missing("playwright")


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
    """A fresh page that may use the clipboard; the board polls every 400 ms so live updates
    show quickly. Every request must stay on 127.0.0.1 (no CDN, no font, no beacon): any
    other is blocked and fails the test."""
    monkeypatch.setattr(views, "REFRESH_MS", 400)
    context = await browser.new_context(
        viewport={"width": 1100, "height": 800}, permissions=["clipboard-read", "clipboard-write"]
    )
    off_machine: list[str] = []

    async def only_loopback(route: Route) -> None:
        url = route.request.url
        if urlsplit(url).hostname == "127.0.0.1" or url.startswith(("data:", "blob:")):
            await route.continue_()
        else:
            off_machine.append(url)
            await route.abort()

    await context.route("**/*", only_loopback)
    tab = await context.new_page()
    tab.set_default_timeout(15_000)
    # A third-party asset in a template would be refused by the CSP before it is requested:
    # Chromium reports that on the console.
    refused: list[str] = []
    tab.on(
        "console",
        lambda msg: refused.append(msg.text) if "Content Security Policy" in msg.text else None,
    )
    try:
        yield tab
    finally:
        await context.close()
    assert off_machine == [], f"requests left the machine: {off_machine}"
    assert refused == [], f"the CSP refused: {refused}"


async def copied(button: Locator) -> None:
    """Press a copy button and wait until it says the text is on the clipboard."""
    await button.click()
    await expect(button).to_have_text("Copied")


async def clipboard(page: Page) -> str:
    text: str = await page.evaluate("navigator.clipboard.readText()")
    return text


async def next_refresh(page: Page) -> None:
    """Wait until the live refresh has answered again (its status line names the second)."""
    status = page.locator("#live-status")
    await expect(status).to_contain_text("Updated")
    await expect(status).not_to_have_text(await status.text_content() or "")


async def fits_a_phone(page: Page, path: str) -> None:
    """At 375 px nothing scrolls sideways (tables and code scroll inside their own box)."""
    width = await page.evaluate("document.documentElement.scrollWidth")
    assert width <= 375, (path, width)


async def shot(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"board-{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    return path


def base(client: Any) -> str:
    return str(client.make_url("")).rstrip("/")


async def test_queue_counts_change_live_and_pause_resume(make_client: Any, page: Page) -> None:
    """Pause a queue, fire webhooks, watch the card count them live, resume and see it drain.

    The worker starts only once the queue is paused (a consumer reads the pause flags before
    its first read), so none of the three runs can slip past the pause.
    """
    client = await make_client(AP_CONTAINER_TYPE="APP")
    fid = await create_flow(client, ECHO)
    await page.goto(base(client) + "/admin/queues/runs")
    await page.get_by_role("button", name="Pause queue").click()
    await expect(page.locator("#paused-badge")).to_have_text("paused")
    await expect(page.get_by_role("alert")).to_contain_text("Queue runs paused")
    await make_client(AP_CONTAINER_TYPE="WORKER", AP_WORKER_CONCURRENCY="4")
    await page.goto(base(client) + "/admin/queues")
    waiting = page.locator('[data-queue="runs"] [data-stat="waiting"]')
    await expect(waiting).to_have_text("0")
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
    """Open a failed run from the runs list, copy its payload and the failed step's input and
    error, fix the secret, press "Retry from here" on the failed step: SUCCEEDED."""
    client = await make_client(AP_CONTAINER_TYPE="WORKER_AND_APP")
    await set_secret(client, "MODE", "broken-mode")
    fid = await create_flow(client, FLAKY)
    run_id = (await fire(client, fid))[0]
    await wait_status(client, run_id, "FAILED")
    await page.goto(base(client) + "/admin/runs")
    await page.get_by_label("Status").select_option("FAILED")
    await page.get_by_role("button", name="Filter").click()
    await expect(page).to_have_url(base(client) + "/admin/runs?flow_id=&status=FAILED")
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

    copy = page.get_by_role("button", name="Copy the payload")
    await copy.click()
    await expect(copy).to_have_text("Copied")
    assert orjson.loads(await clipboard(page)) == {"x": 0, "n": 0}
    check = page.locator('[data-step="check"]')
    await expect(check.locator("details")).to_have_attribute("open", "")  # the failed step
    await copied(check.get_by_role("button", name="Copy the input of step check"))
    assert orjson.loads(await clipboard(page)) == {"mode": "***", "n": 0}  # secret redacted
    await copied(check.get_by_role("button", name="Copy the error of step check"))
    assert "ValueError: upstream refused the order" in await clipboard(page)
    # A finished run changes only through an action (which reloads the page): no polling.
    await expect(page.locator("#live-status")).to_have_text(views.STOPPED_NOTE)
    await page.set_viewport_size({"width": 375, "height": 740})
    await fits_a_phone(page, "run page")
    await shot(page, "phone-run")
    await page.set_viewport_size({"width": 1100, "height": 800})

    await set_secret(client, "MODE", "healthy-mode")
    await check.get_by_role("button", name="Retry from here").click()
    await expect(page).to_have_url(base(client) + f"/admin/runs/{run_id}")
    await expect(page.get_by_role("alert").first).to_contain_text("Run retried (FROM_FAILED_STEP")
    await expect(page.locator("#run-status")).to_have_text("SUCCEEDED")
    await expect(page.locator('[data-step="check"] .badge')).to_have_text("SUCCEEDED")
    await expect(page.locator("#run-error")).to_have_count(0)
    await expect(page.get_by_role("button", name="Retry from here")).to_have_count(0)
    run = await wait_status(client, run_id, "SUCCEEDED")
    assert run["attempt"] == 2 and run["steps"][-1]["output"] == {"n": 0, "ok": True}
    await shot(page, "run-succeeded")


#: A run that pauses after its first step (the delay outlasts the test): it stays live.
PAUSING = {
    "name": "pausing",
    "trigger": {"type": "webhook"},
    "steps": [
        {"name": "prepare", "type": "transform", "input": {"x": "{{trigger.body.x}}"}},
        {"name": "wait", "type": "delay", "input": {"seconds": 600}},
    ],
}


async def live_requests(page: Page) -> int:
    count: int = await page.evaluate(
        "performance.getEntriesByType('resource')"
        ".filter(e => e.name.includes('/admin/api/')).length"
    )
    return count


async def test_run_page_stays_live_while_the_operator_clicks_in_it(
    make_client: Any, page: Page
) -> None:
    """The run page keeps refreshing after a click on a step's summary or a Copy button (both
    take the focus): the opened step stays open, the focus comes back to the same element.
    Nothing changed: no swap, a selection survives (also the first poll). Once the run is
    finished the page stops polling."""
    client = await make_client(AP_CONTAINER_TYPE="WORKER_AND_APP")
    fid = await create_flow(client, PAUSING)
    run_id = (await fire(client, fid))[0]
    await wait_status(client, run_id, "PAUSED")
    await page.goto(base(client) + f"/admin/runs/{run_id}")
    # Before the first poll: watch the region and select the payload.
    before = await page.evaluate(
        """() => { window.swaps = 0; new MutationObserver(() => window.swaps++).observe(
             document.querySelector('[data-region="run"]'), {childList: true});
             const r = document.createRange();
             r.selectNodeContents(document.getElementById('run-payload'));
             getSelection().removeAllRanges(); getSelection().addRange(r);
             return document.getElementById('live-status').textContent; }"""
    )
    assert "Updated" not in before, "the first poll came before the observer"
    await expect(page.locator("#live-status")).to_contain_text("Updated")
    await next_refresh(page)
    assert await page.evaluate("window.swaps") == 0
    assert '"x": 0' in await page.evaluate("getSelection().toString()")

    prepare = page.locator('[data-step="prepare"] details')
    await prepare.locator("summary").click()  # the summary now holds the focus
    await expect(prepare).to_have_attribute("open", "")
    assert await page.evaluate("document.activeElement.id") == "step-0-summary"
    await next_refresh(page)
    assert await page.evaluate("window.swaps") == 0  # opened by hand: still nothing to swap
    resp = await client.post(f"/api/v1/flow-runs/{run_id}/cancel")
    assert resp.status == 200, await resp.text()
    await expect(page.locator("#run-status")).to_have_text("CANCELED")
    assert await page.evaluate("window.swaps") >= 1
    await expect(prepare).to_have_attribute("open", "")
    assert await page.evaluate("document.activeElement.id") == "step-0-summary"
    await expect(page.locator("#live-status")).to_have_text(views.STOPPED_NOTE)
    # Stopped for good: no request in the next five intervals (absence needs a wait).
    polled = await live_requests(page)
    await page.wait_for_timeout(5 * views.REFRESH_MS)
    assert await live_requests(page) == polled

    run_id = (await fire(client, fid))[0]
    await wait_status(client, run_id, "PAUSED")
    await page.goto(base(client) + f"/admin/runs/{run_id}")
    await copied(page.get_by_role("button", name="Copy the payload"))
    assert await page.evaluate("document.activeElement.id") == "copy-run-payload"
    resp = await client.post(f"/api/v1/flow-runs/{run_id}/cancel")
    assert resp.status == 200, await resp.text()
    await expect(page.locator("#run-status")).to_have_text("CANCELED")
    assert await page.evaluate("document.activeElement.id") == "copy-run-payload"


async def test_runs_search_and_filters(make_client: Any, page: Page) -> None:
    """Search by run id opens the run; a malformed id is a notice; flow and status filters
    narrow the rows and stay selected through "Older runs" and the live refresh."""
    client = await make_client(AP_CONTAINER_TYPE="APP")
    echo = await create_flow(client, ECHO)
    other = await create_flow(client, {**ECHO, "name": "other"})
    echo_runs = await fire(client, echo, 3)
    other_run = (await fire(client, other))[0]
    await page.goto(base(client) + "/admin/runs")
    await expect(page.locator("tr[data-run]")).to_have_count(4)
    await page.get_by_label("Run id").fill(other_run)
    await page.get_by_role("button", name="Open run").click()
    await expect(page).to_have_url(base(client) + f"/admin/runs/{other_run}")
    await expect(page.locator("#run-status")).to_have_text("QUEUED")
    await copied(page.get_by_role("button", name="Copy the run id"))
    assert await clipboard(page) == other_run
    await page.goto(base(client) + "/admin/runs")
    await page.get_by_label("Run id").fill("not-a-run")
    await page.get_by_role("button", name="Open run").click()
    await expect(page.locator("#search-notice")).to_contain_text("“not-a-run” is not a run id")
    await expect(page.get_by_label("Run id")).to_have_value("not-a-run")
    await page.goto(base(client) + "/admin/runs?limit=2")
    await page.get_by_label("Flow").select_option(label="echo")
    await page.get_by_label("Status").select_option("QUEUED")
    await page.get_by_role("button", name="Filter").click()
    # The page before had two rows too (limit=2): wait for the filtered one.
    filtered = f"{base(client)}/admin/runs?flow_id={echo}&status=QUEUED&limit=2"
    await expect(page).to_have_url(filtered)
    rows = page.locator("tr[data-run]")
    await expect(rows).to_have_count(2)
    first = await rows.evaluate_all("rs => rs.map(r => r.dataset.run)")
    await expect(page.locator("#live-status")).to_contain_text("Updated")
    await expect(rows).to_have_count(2)  # the live refresh kept the filter
    await page.get_by_role("link", name="Older runs").click()
    await expect(page).to_have_url(re.compile(r"cursor="))
    await expect(page.get_by_label("Flow")).to_have_value(echo)
    await expect(page.get_by_label("Status")).to_have_value("QUEUED")
    await expect(rows).to_have_count(1)
    last = await rows.evaluate_all("rs => rs.map(r => r.dataset.run)")
    assert sorted(first + last) == sorted(echo_runs)
    await page.set_viewport_size({"width": 375, "height": 740})
    await fits_a_phone(page, "runs page")


async def test_flows_page_copies_urls_and_curl(make_client: Any, page: Page) -> None:
    """The flows page's copy buttons put the webhook URLs and the curl example on the
    clipboard, exactly as shown."""
    client = await make_client(AP_CONTAINER_TYPE="APP")
    fid = await create_flow(client, ECHO)
    await page.goto(base(client) + "/admin/flows")
    url = f"{base(client)}/api/v1/webhooks/{fid}"
    sync = page.get_by_role("button", name="Copy sync webhook URL of echo")
    await sync.click()
    await expect(sync).to_have_text("Copied")
    assert await clipboard(page) == url + "/sync"
    await page.get_by_text("curl example").click()
    await copied(page.get_by_role("button", name="Copy the curl example of echo"))
    curl = await clipboard(page)
    assert curl.startswith(f"curl -sS -X POST {url} ")
    assert curl == await page.locator(f"#curl-{fid}-async").text_content()
    await page.set_viewport_size({"width": 375, "height": 740})
    await fits_a_phone(page, "flows page with the curl example open")
    await shot(page, "phone-flows-curl")

    # Where the Clipboard API refuses (a plain-http origin other than localhost), the button
    # falls back to execCommand("copy"), and when even that fails it selects the text.
    await page.add_init_script(
        "navigator.clipboard.writeText = () => Promise.reject(new Error('refused'))"
    )
    await page.reload()
    webhook = page.get_by_role("button", name="Copy webhook URL of echo")
    await webhook.click()
    await expect(webhook).to_have_text("Copied")
    assert await clipboard(page) == url
    await page.add_init_script("document.execCommand = () => false")
    await page.reload()
    await webhook.click()
    await expect(webhook).to_have_text("Press Ctrl+C")
    assert await page.evaluate("window.getSelection().toString()") == url


async def test_hostile_flow_name_renders_inert(make_client: Any, page: Page) -> None:
    """A flow named <script>alert(1)</script> shows as text on every page, and no dialog opens."""
    client = await make_client(AP_CONTAINER_TYPE="WORKER_AND_APP")
    name = "<script>alert(1)</script>"
    fid = await create_flow(client, {**ECHO, "name": name})
    run_id = (await fire(client, fid))[0]
    await wait_status(client, run_id, "SUCCEEDED")
    dialogs: list[str] = []

    async def on_dialog(dialog: Dialog) -> None:
        dialogs.append(dialog.message)
        await dialog.dismiss()

    page.on("dialog", on_dialog)
    await page.goto(base(client) + "/admin/flows")
    await expect(page.locator(".flow-name")).to_have_text(name)
    copy = page.get_by_role("button", name=f"Copy webhook URL of {name}")
    await copy.click()
    await expect(copy).to_have_text("Copied")
    await shot(page, "flows")
    for path in ("/admin/runs", f"/admin/runs/{run_id}", "/admin/flows"):
        await page.goto(base(client) + path)
        # At least one live refresh has swapped its regions in (a finished run's page does
        # not poll: its regions are the page's own).
        await expect(page.locator("#live-status")).to_contain_text(
            re.compile(f"Updated|{views.STOPPED_NOTE}")
        )
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
    run_id = (await fire(client, fid, 1))[0]
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
        "/admin/runs?run=not-a-run",
        f"/admin/runs/{run_id}",
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
        await fits_a_phone(page, path)
        await shot(page, "phone-" + (path.strip("/").replace("/", "-") or "root"))


async def test_overview_screenshot(make_client: Any, page: Page, redis: aioredis.Redis) -> None:
    """The overview with 15 minutes of history, a dead job and advice (the README picture)."""
    client = await make_client(AP_CONTAINER_TYPE="APP")
    fid = await create_flow(client, ECHO)
    await client.post("/api/v1/queues/runs/pause")
    await fire(client, fid, 120)  # a backlog over the threshold: "add workers"
    # The worker starts paused (see the pause test): the backlog stays at 120.
    await make_client(AP_CONTAINER_TYPE="WORKER", AP_WORKER_CONCURRENCY="4")
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


async def test_long_snake_case_names_fit_a_phone(make_client: Any, page: Page) -> None:
    """Step names of 60 and 300 characters without a space (snake_case), flow names of 60 and
    200 (the longest allowed), wrap on the run, runs and flows pages at 375 px, every step
    and section open: nothing scrolls sideways."""
    client = await make_client(AP_CONTAINER_TYPE="WORKER_AND_APP")
    await page.set_viewport_size({"width": 375, "height": 740})
    for length in (60, 300):
        flow_name = ("order_sync_shopify_to_netsuite_" * 10)[: min(length, 200)]
        step = ("fetch_the_customer_record_" * 12)[:length]
        doc = {
            "name": flow_name,
            "trigger": {"type": "webhook"},
            "steps": [
                {"name": step + "_a", "type": "transform", "input": {"v": "{{trigger.body}}"}},
                {
                    "name": step,
                    "type": "code",
                    "input": {},
                    "code": "def run(input):\n    raise ValueError('nope')\n",
                },
            ],
        }
        fid = await create_flow(client, doc)
        run_id = (await fire(client, fid))[0]
        await wait_status(client, run_id, "FAILED")
        for path in (f"/admin/runs/{run_id}", "/admin/runs", "/admin/flows"):
            await page.goto(base(client) + path)
            await page.evaluate("document.querySelectorAll('details').forEach(d => d.open = true)")
            await fits_a_phone(page, f"{path} with {length}-character names")
            where = "run" if run_id in path else path.rsplit("/", 1)[1]
            await shot(page, f"phone-long-names-{where}-{length}")
