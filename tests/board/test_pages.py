"""Board pages and their live JSON twins, rendered by a real server on real Redis/PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
import html
import json
import os
import re
import shlex
import shutil
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from conveyor.board import views
from conveyor.board.present import curl_example
from conveyor.board.views import webhook_secret_name
from conveyor.heartbeat import Heartbeat
from conveyor.queue import Producer, QueueConfig
from tests.argv_spy import spy_path
from tests.board.conftest import (
    ECHO,
    FLAKY,
    act,
    create_flow,
    csrf,
    fire,
    set_secret,
    wait_status,
)

STATIC = Path(__file__).parents[2] / "conveyor" / "board" / "static"


def base(client: Any) -> str:
    return str(client.make_url("")).rstrip("/")


async def test_overview_shows_a_card_per_queue_with_counts(make_client: Any) -> None:
    """Overview: one card per queue with its waiting count, sparklines and scaling banners."""
    client = await make_client(AP_CONTAINER_TYPE="APP")
    fid = await create_flow(client, ECHO)
    await fire(client, fid, 2)
    resp = await client.get("/admin/queues")
    assert resp.status == 200 and resp.content_type == "text/html"
    page = await resp.text()
    assert 'data-queue="sync"' in page and 'data-queue="runs"' in page
    runs_card = page.split('data-queue="runs"')[1]
    assert '<dd data-stat="waiting">2</dd>' in runs_card
    assert page.count('<svg class="spark') == 4 and "<polyline" in page
    # The queue rules hold here; the others read the shared machine (CPU, the server's
    # connection count) and may legitimately fire while a test suite loads it.
    assert 'class="banner' in page
    assert 'data-rule="waiting_jobs"' not in page
    assert 'data-rule="average_wait_seconds"' not in page
    assert "/admin/static/board.css?v=" in page and "/admin/static/board.js?v=" in page


async def test_overview_live_json_has_regions_and_data(make_client: Any) -> None:
    """/admin/api/queues returns the overview's regions as HTML plus the raw stats."""
    client = await make_client(AP_CONTAINER_TYPE="APP")
    fid = await create_flow(client, ECHO)
    await fire(client, fid, 1)
    body = await (await client.get("/admin/api/queues")).json()
    assert set(body["regions"]) == {"cards", "advice"}
    assert 'data-stat="waiting">1<' in body["regions"]["cards"]
    runs = next(q for q in body["data"]["queues"] if q["queue"] == "runs")
    assert runs["waiting"] == 1 and len(body["data"]["scaling"]) == 7


async def test_overview_banner_when_backlog_over_threshold(
    make_client: Any, redis: aioredis.Redis
) -> None:
    """More than 100 waiting jobs puts "add workers" advice on the overview."""
    client = await make_client(AP_CONTAINER_TYPE="APP")
    producer = Producer(redis, QueueConfig())
    for i in range(101):
        await producer.enqueue("runs", {"i": i}, job_id=f"j{i}")
    page = await (await client.get("/admin/queues")).text()
    assert "Waiting jobs 101 &gt; 100: add workers" in page


async def test_queue_page_lists_jobs_per_state_tab(make_client: Any) -> None:
    """Queue page: tabs with counts, the waiting jobs with payloads, every state renders."""
    client = await make_client(AP_CONTAINER_TYPE="APP")
    fid = await create_flow(client, ECHO)
    ids = await fire(client, fid, 3)
    page = await (await client.get("/admin/queues/runs")).text()
    assert 'aria-current="page" data-state="waiting">waiting <span class="count">3</span>' in page
    for run_id in ids:
        assert f'id="job-{run_id}"' in page
    assert "&#34;run_id&#34;" in page or "&quot;run_id&quot;" in page
    for state in ("active", "delayed", "failed", "completed"):
        resp = await client.get(f"/admin/queues/runs?state={state}")
        assert resp.status == 200 and f"No {state} jobs" in await resp.text()
    live = await (await client.get("/admin/api/queues/runs?state=waiting")).json()
    assert set(live["regions"]) == {"queue_head", "jobs"} and len(live["data"]["jobs"]) == 3
    head = live["regions"]["queue_head"]
    assert (
        'name="next" value="/admin/queues/runs?state=waiting"' in head and "/admin/api" not in head
    )


async def test_queue_page_errors_are_html(make_client: Any) -> None:
    """An unknown queue is a 404 page, a bad state a 400 page; the live twin answers JSON."""
    client = await make_client(AP_CONTAINER_TYPE="APP")
    resp = await client.get("/admin/queues/nope")
    assert resp.status == 404 and resp.content_type == "text/html"
    assert "no queue" in await resp.text()
    resp = await client.get("/admin/queues/runs?state=bogus")
    assert resp.status == 400 and resp.content_type == "text/html"
    resp = await client.get("/admin/api/queues/nope")
    assert resp.status == 404 and (await resp.json())["error"]["message"].startswith("no queue")
    resp = await client.get("/admin/runs/not-a-uuid")
    assert resp.status == 404
    resp = await client.get("/admin/runs/0190f0f0-0000-7000-8000-000000000000")
    assert resp.status == 404 and "not found" in await resp.text()


async def test_board_errors_are_the_apis(make_client: Any) -> None:
    """The board maps domain errors through the API's one table: same status, code and
    message on its live twin as the API gives for the same missing run or job."""
    client = await make_client(AP_CONTAINER_TYPE="APP")
    unknown = "0190f0f0-0000-7000-8000-000000000000"
    api = await client.get(f"/api/v1/flow-runs/{unknown}")
    board = await client.get(f"/admin/api/runs/{unknown}")
    assert api.status == board.status == 404
    assert (await board.json())["error"] == (await api.json())["error"]
    assert "Content-Security-Policy" in board.headers
    page = await client.get(f"/admin/runs/{unknown}")
    assert page.content_type == "text/html" and "404 · Not found" in await page.text()
    api_job = await client.post("/api/v1/queues/runs/jobs/zzz/retry")
    message = (await api_job.json())["error"]["message"]
    token = await csrf(client, "/admin/queues/runs?state=failed")
    _, location = await act(client, "/admin/queues/runs/jobs/zzz/retry", token)
    assert message in html.unescape(await (await client.get(location)).text())


async def test_runs_list_filters_by_flow_and_status(make_client: Any) -> None:
    """Runs page: newest first with flow names; filtering by flow and by status narrows it."""
    client = await make_client(AP_CONTAINER_TYPE="WORKER_AND_APP", AP_WORKER_CONCURRENCY="4")
    await set_secret(client, "MODE", "broken-mode")
    echo = await create_flow(client, ECHO)
    flaky = await create_flow(client, FLAKY)
    ok_id = (await fire(client, echo))[0]
    bad_id = (await fire(client, flaky))[0]
    await wait_status(client, ok_id, "SUCCEEDED")
    await wait_status(client, bad_id, "FAILED")
    page = await (await client.get("/admin/runs")).text()
    assert ok_id in page and bad_id in page and ">flaky <" in page
    assert "upstream refused the order" in page
    page = await (await client.get(f"/admin/runs?flow_id={echo}")).text()
    assert ok_id in page and bad_id not in page
    page = await (await client.get("/admin/runs?status=FAILED")).text()
    assert bad_id in page and ok_id not in page
    assert (await client.get("/admin/runs?flow_id=zzz")).status == 400
    assert (await client.get("/admin/runs?status=NOPE")).status == 400
    live = await (await client.get("/admin/api/runs?status=FAILED")).json()
    assert [r["id"] for r in live["data"]["runs"]] == [bad_id]


async def test_run_detail_shows_timeline_and_error(make_client: Any) -> None:
    """Run page: the failed step's error, every step with status and bar, secrets redacted."""
    client = await make_client(AP_CONTAINER_TYPE="WORKER_AND_APP")
    await set_secret(client, "MODE", "broken-mode")
    flaky = await create_flow(client, FLAKY)
    run_id = (await fire(client, flaky))[0]
    await wait_status(client, run_id, "FAILED")
    page = await (await client.get(f"/admin/runs/{run_id}")).text()
    assert 'id="run-status">FAILED<' in page
    assert "Error in step <code>check</code>" in page
    assert "upstream refused the order" in page
    assert 'data-step="prepare"' in page and 'data-step="check"' in page
    assert page.count('<svg class="bar"') == 2
    assert "Retry from failed step" in page and "Retry on latest version" in page
    assert "Cancel run" not in page
    assert "broken-mode" not in page
    # The failed step is open, with its error, input and output each under a copy button,
    # and the retry from there; the step that succeeded is closed and has no retry.
    check = page.split('data-step="check"')[1]
    assert '<details id="step-1" open>' in check and "Retry from here" in check
    assert "Retry from here" not in page.split('data-step="check"')[0]
    for block in ("error", "input", "output"):
        assert f'data-copy-target="step-1-{block}"' in check and f'id="step-1-{block}"' in check
    payload = page.split('<pre id="run-payload">')[1].split("</pre>")[0]
    assert json.loads(html.unescape(payload)) == {"x": 0, "n": 0} and "\n  " in payload
    live = await (await client.get(f"/admin/api/runs/{run_id}")).json()
    assert live["data"]["run"]["status"] == "FAILED" and set(live["regions"]) == {"run"}


async def test_flows_page_shows_urls_recent_runs_and_escapes_names(make_client: Any) -> None:
    """Flows page: version, webhook URLs with copy buttons, last runs; a hostile name is text."""
    client = await make_client(AP_CONTAINER_TYPE="APP")
    evil = {**ECHO, "name": "<script>alert(1)</script>"}
    fid = await create_flow(client, evil)
    await fire(client, fid, 2)
    page = await (await client.get("/admin/flows")).text()
    assert "<script>alert(1)</script>" not in page
    assert (
        html.escape("<script>alert(1)</script>") in page
        or "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    )
    assert (
        f"/api/v1/webhooks/{fid}</code>" in page and f"/api/v1/webhooks/{fid}/sync</code>" in page
    )
    copies = re.findall(r'class="copy" id="copy-[^"]+" data-copy-target="', page)
    assert len(copies) == 4  # 2 URLs, 2 curl examples
    assert page.count('class="dot dot-busy"') == 2 and "v1 · webhook" in page
    assert "Disable <span" in page
    runs_page = await (await client.get("/admin/runs")).text()
    assert "<script>alert(1)</script>" not in runs_page


async def test_workers_page_shows_live_and_lost_workers(
    make_client: Any, redis: aioredis.Redis
) -> None:
    """Workers page: the process's own worker as live, a silent one as lost."""
    client = await make_client(AP_CONTAINER_TYPE="WORKER_AND_APP", AP_WORKER_CONCURRENCY="2")
    ghost = Heartbeat(redis, worker_id="ghost-worker", role="WORKER", concurrency=8, busy=lambda: 3)
    snap = await ghost.beat()
    await redis.hset(
        b"conveyor:{workers}:worker:ghost-worker", "last_seen", str(snap["last_seen"] - 40)
    )
    page = await (await client.get("/admin/workers")).text()
    rows = page.split("<tr data-worker=")[1:]
    assert len(rows) == 2
    lost = next(r for r in rows if "ghost-worker" in r)
    live = next(r for r in rows if "ghost-worker" not in r)
    assert 'class="lost"' in lost and 'badge-bad">lost<' in lost and "3 / 8" in lost
    assert 'badge-ok">live<' in live and "0 / 2" in live and "WORKER_AND_APP" in live
    body = await (await client.get("/admin/api/workers")).json()
    assert {w["id"]: w["lost"] for w in body["data"]["workers"]}["ghost-worker"] is True
    overview = await (await client.get("/admin/queues")).text()
    assert "1 live" in overview and "1 lost" in overview


async def test_security_headers_and_static_assets(make_client: Any) -> None:
    """Pages carry a strict CSP and no-store; assets are served locally and total under 50 KB."""
    client = await make_client(AP_CONTAINER_TYPE="APP")
    resp = await client.get("/admin/queues")
    csp = resp.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe" not in csp
    assert resp.headers["X-Frame-Options"] == "DENY" and resp.headers["Cache-Control"] == "no-store"
    page = await resp.text()
    assert "http://" not in page.split("<body")[0] and "https://" not in page
    total = 0
    for name in ("board.css", "board.js"):
        asset = await client.get(f"/admin/static/{name}")
        assert asset.status == 200
        total += len(await asset.read())
    assert total == sum(p.stat().st_size for p in STATIC.iterdir()) and total < 50 * 1024
    assert (await client.get("/admin", allow_redirects=False)).headers[
        "Location"
    ] == "/admin/queues"


async def test_board_disabled_is_404(make_client: Any) -> None:
    """AP_QUEUE_UI_ENABLED=false: /admin/queues is a 404 while the API still works."""
    client = await make_client(AP_CONTAINER_TYPE="APP", AP_QUEUE_UI_ENABLED="false")
    assert (await client.get("/admin/queues")).status == 404
    assert (await client.get("/admin/static/board.css")).status == 404
    assert (await client.get("/api/v1/queues")).status == 200


async def test_basic_auth_when_credentials_are_set(make_client: Any) -> None:
    """With AP_QUEUE_UI_USERNAME/PASSWORD the board needs them; wrong ones get 401."""
    client = await make_client(
        AP_CONTAINER_TYPE="APP", AP_QUEUE_UI_USERNAME="ops", AP_QUEUE_UI_PASSWORD="s3cret pass"
    )
    resp = await client.get("/admin/queues")
    assert resp.status == 401 and resp.headers["WWW-Authenticate"].startswith("Basic ")
    bad = {"Authorization": "Basic " + base64.b64encode(b"ops:wrong").decode()}
    assert (await client.get("/admin/queues", headers=bad)).status == 401
    assert (await client.get("/admin/api/queues")).status == 401
    good = {"Authorization": "Basic " + base64.b64encode(b"ops:s3cret pass").decode()}
    assert (await client.get("/admin/queues", headers=good)).status == 200
    assert (await client.get("/admin/static/board.js", headers=good)).status == 200
    assert (await client.post("/admin/queues/runs/pause")).status == 401


SIGNED = {
    "name": "signed",
    "trigger": {"type": "webhook", "secret": "{{secrets.HOOK}}"},
    "steps": [{"name": "t", "type": "transform", "input": {"hello": "{{trigger.body.hello}}"}}],
}


def _pre(page: str, pre_id: str) -> str:
    return html.unescape(page.split(f'<pre id="{pre_id}">')[1].split("</pre>", maxsplit=1)[0])


async def _sh(script: str, path: str | None = None, **env: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "sh",
        "-c",
        script + " -o /dev/null -w '%{http_code}'",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={"PATH": path or os.environ["PATH"], **env},
    )
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode()


async def test_flows_page_curl_examples_run_as_shown(make_client: Any, tmp_path: Path) -> None:
    """The curl examples work when pasted into a shell: unsigned, and signed with $SECRET
    holding the secret's value (which the page never shows, and the snippet never puts on a
    command line)."""
    if shutil.which("curl") is None or shutil.which("python3") is None:
        assert os.environ.get("CONVEYOR_CI") != "1", "curl and python3 are needed"
        pytest.skip("curl or python3 missing")
    client = await make_client(AP_CONTAINER_TYPE="APP")
    await set_secret(client, "HOOK", "hook-secret-value-7f3a")
    plain = await create_flow(client, ECHO)
    signed = await create_flow(client, SIGNED)
    page = await (await client.get("/admin/flows")).text()
    assert "hook-secret-value-7f3a" not in page
    assert "made with the secret <code>HOOK</code>" in page
    plain_curl = _pre(page, f"curl-{plain}-async")
    assert plain_curl.startswith(f"curl -sS -X POST {base(client)}/api/v1/webhooks/{plain} ")
    signed_curl = _pre(page, f"curl-{signed}-async")
    assert "X-Conveyor-Signature: t=$t,v1=$mac" in signed_curl and '"$SECRET"' in signed_curl
    assert _pre(page, f"curl-{signed}-sync").count(f"/api/v1/webhooks/{signed}/sync ") == 1
    assert await _sh(plain_curl) == (0, "202")
    path, log = spy_path(tmp_path)
    assert await _sh(signed_curl, path, SECRET="hook-secret-value-7f3a") == (0, "202")
    argv = log.read_text()
    assert "curl " in argv and "python3 " in argv, argv
    assert "hook-secret-value-7f3a" not in argv, argv
    assert await _sh(signed_curl, SECRET="wrong") == (0, "401")
    runs = await (await client.get(f"/api/v1/flow-runs?flow_id={signed}")).json()
    assert len(runs["data"]) == 1


async def test_webhook_urls_use_the_frontend_url_when_set(make_client: Any) -> None:
    """With AP_FRONTEND_URL the flows page shows the URLs senders use, not the request's."""
    client = await make_client(
        AP_CONTAINER_TYPE="APP", AP_FRONTEND_URL="https://hooks.example.test/"
    )
    fid = await create_flow(client, ECHO)
    page = await (await client.get("/admin/flows")).text()
    assert f'<code id="url-{fid}">https://hooks.example.test/api/v1/webhooks/{fid}</code>' in page
    assert f">https://hooks.example.test/api/v1/webhooks/{fid}/sync</code>" in page
    assert base(client) not in page
    assert f"curl -sS -X POST https://hooks.example.test/api/v1/webhooks/{fid} " in (
        _pre(page, f"curl-{fid}-async")
    )


async def test_runs_search_by_id(make_client: Any) -> None:
    """An existing run's id opens its page; an unknown one is a 404 notice, a malformed one a
    400 notice above the list (escaped), never a 500."""
    client = await make_client(AP_CONTAINER_TYPE="APP")
    fid = await create_flow(client, ECHO)
    run_id = (await fire(client, fid))[0]
    resp = await client.get(f"/admin/runs?run=%20{run_id.upper()}%20", allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == f"/admin/runs/{run_id}"
    unknown = "0190f0f0-0000-7000-8000-000000000000"
    resp = await client.get(f"/admin/runs?run={unknown}")
    page = await resp.text()
    assert resp.status == 404 and f"No run has the id {unknown}." in page
    assert f'data-run="{run_id}"' in page  # the list is still there
    resp = await client.get("/admin/runs", params={"run": "<b>1234</b>"})
    page = await resp.text()
    assert resp.status == 400 and "is not a run id" in page
    assert "<b>1234</b>" not in page and "&lt;b&gt;1234&lt;/b&gt;" in page
    assert 'value="&lt;b&gt;1234&lt;/b&gt;"' in page  # the box keeps what was typed
    live = await client.get("/admin/api/runs", params={"run": run_id})
    assert live.status == 200 and [r["id"] for r in (await live.json())["data"]["runs"]] == [run_id]


async def test_runs_filters_survive_pagination(make_client: Any) -> None:
    """Older-runs links keep the flow, status and page size; the live twin gets them too."""
    client = await make_client(AP_CONTAINER_TYPE="APP")
    echo = await create_flow(client, ECHO)
    other = await create_flow(client, {**ECHO, "name": "other"})
    ours = await fire(client, echo, 3)
    await fire(client, other, 2)
    url = f"/admin/runs?flow_id={echo}&status=QUEUED&limit=2"
    seen: list[str] = []
    while url:
        page = await (await client.get(url)).text()
        assert f'data-live="/admin/api/runs?flow_id={echo}&amp;status=QUEUED&amp;limit=2' in page
        rows = re.findall(r'<tr data-run="([^"]+)"', page)
        assert 1 <= len(rows) <= 2
        seen += rows
        assert f'<option value="{echo}" selected>' in page
        more = re.search(r'<a class="more" href="([^"]+)"', page)
        url = html.unescape(more.group(1)) if more else ""
        if url:
            assert f"flow_id={echo}" in url and "status=QUEUED" in url and "limit=2" in url
    assert sorted(seen) == sorted(ours)


def test_curl_example_quotes_what_it_shows() -> None:
    """The URL is one shell word whatever it holds; an odd secret reference names no text."""
    url = "http://127.0.0.1:1/api/v1/webhooks/x'$(id)`id`"
    words = shlex.split(curl_example(url, None).replace("\\\n", " "))
    assert words[:4] == ["curl", "-sS", "-X", "POST"] and words[4] == url
    flow = {"id": "f", "trigger": {"type": "webhook", "secret": "{{secrets.HOOK}}"}}
    assert webhook_secret_name(flow) == "HOOK"
    flow["trigger"]["secret"] = "{{secrets['a\nb']}}"
    assert webhook_secret_name(flow) in ("of the trigger", None)
    assert webhook_secret_name({"id": "f", "trigger": {"type": "webhook"}}) is None


async def test_forwarded_host_is_used_only_when_allowed(make_client: Any) -> None:
    """X-Forwarded-Host shapes the webhook URLs (board and API) only when it passes the
    board's Host allow-list; anything else gives the request's own host."""
    client = await make_client(
        AP_CONTAINER_TYPE="APP", AP_QUEUE_UI_ALLOWED_HOSTS="hooks.example.test"
    )
    fid = await create_flow(client, ECHO)
    own = f"http://{client.make_url('').host}:{client.make_url('').port}/api/v1/webhooks/{fid}"
    cases = [
        (
            {"X-Forwarded-Host": "hooks.example.test", "X-Forwarded-Proto": "https"},
            f"https://hooks.example.test/api/v1/webhooks/{fid}",
        ),
        ({"X-Forwarded-Host": "localhost:8443"}, f"http://localhost:8443/api/v1/webhooks/{fid}"),
        ({"X-Forwarded-Host": "evil.example"}, own),
        ({"X-Forwarded-Host": "a'$(id)`id`\"b"}, own),
        ({"X-Forwarded-Host": "127.0.0.1'$(id)"}, own),
        ({"X-Forwarded-Host": "evil.example, hooks.example.test"}, own),
        ({"X-Forwarded-Proto": "javascript"}, own),
    ]
    for headers, url in cases:
        page = await (await client.get("/admin/flows", headers=headers)).text()
        assert f'<code id="url-{fid}">{html.escape(url)}</code>' in page, headers
        assert "evil" not in page and "$(id)" not in page, headers
        api = await (await client.get(f"/api/v1/flows/{fid}", headers=headers)).json()
        assert api["webhook_url"] == url, headers


async def test_runs_filter_keeps_a_flow_beyond_the_choices(make_client: Any) -> None:
    """With more flows than the filter offers (200), filtering by an older one keeps it
    selected (it is fetched and added) and its runs show its name, not an id."""
    client = await make_client(AP_CONTAINER_TYPE="APP")
    old = await create_flow(client, {**ECHO, "name": "oldest-flow"})
    run_id = (await fire(client, old))[0]
    newer = [
        await create_flow(client, {**ECHO, "name": f"f{i}"}) for i in range(views.FLOW_CHOICES + 1)
    ]
    for path in (f"/admin/runs?flow_id={old}", "/admin/runs"):
        page = await (await client.get(path)).text()
        row = page[page.index(f'<tr data-run="{run_id}"') :]
        assert re.search(r'<td data-label="Flow"><span>oldest-flow <span', row), path
    page = await (await client.get(f"/admin/runs?flow_id={old}")).text()
    assert re.findall(r'<option value="([^"]*)" selected>', page) == [old]
    assert f'<option value="{old}" selected>oldest-flow</option>' in page
    assert f'<option value="{newer[0]}">' not in page  # beyond the choices, no run shown
    assert f'<option value="{newer[-1]}">f{views.FLOW_CHOICES}</option>' in page
    live = await (await client.get(f"/admin/api/runs?flow_id={old}")).json()
    assert "oldest-flow" in live["regions"]["runs"]


async def test_big_run_page_is_bounded(make_client: Any) -> None:
    """A run of 301 steps with a 70-KB item: the page shows the first and last 100 steps with
    a note, cuts each block at 64 KiB with a link to the API's full record, and, the run being
    finished, does not poll; its live JSON carries no trigger, steps or output twice."""
    client = await make_client(AP_CONTAINER_TYPE="WORKER_AND_APP")
    doc = {
        "name": "loopy",
        "trigger": {"type": "webhook"},
        "steps": [
            {
                "name": "each",
                "type": "loop",
                "items": "{{trigger.body.items}}",
                "steps": [{"name": "t", "type": "transform", "input": {"v": "{{loop.item}}"}}],
            }
        ],
    }
    fid = await create_flow(client, doc)
    items = ["y" * 70_000] + ["i"] * 299
    resp = await client.post(f"/api/v1/webhooks/{fid}", json={"items": items})
    run_id = resp.headers["x-run-id"]
    run = await wait_status(client, run_id, "SUCCEEDED", "FAILED", timeout_s=60)
    assert run["status"] == "SUCCEEDED" and len(run["steps"]) == 301
    resp = await client.get(f"/admin/runs/{run_id}")
    page = await resp.text()
    assert resp.status == 200
    assert page.count('<li class="step depth-') == views.MAX_STEPS == 200
    assert "(200 of 301 shown)" in page
    assert "101 steps not shown (the page shows the first and the last 100)" in page
    full = f'href="/api/v1/flow-runs/{run_id}">GET /api/v1/flow-runs/{run_id}</a>'
    assert 'id="run-payload-cut"' in page and page.count(full) >= 3
    assert "Cut at 64.0 KB of" in page
    payload = page.split('<pre id="run-payload">')[1].split("</pre>")[0]
    assert len(html.unescape(payload).encode()) <= 64 * 1024
    assert 'data-refresh-ms="0"' in page and views.STOPPED_NOTE in page
    assert len(page.encode()) < 1_000_000, len(page.encode())
    live = await (await client.get(f"/admin/api/runs/{run_id}")).json()
    assert live["final"] is True and set(live["regions"]) == {"run"}
    assert set(live["data"]["run"]) == {
        "id",
        "flow_id",
        "flow_version",
        "status",
        "attempt",
        "created_at",
        "started_at",
        "finished_at",
        "duration_ms",
    }
    assert live["hashes"]["run"] in page  # the page's data-hash: the first poll swaps nothing
    # The full record is the API's.
    assert len(await (await client.get(f"/api/v1/flow-runs/{run_id}")).read()) > 140_000
