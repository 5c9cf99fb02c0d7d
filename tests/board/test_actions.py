"""Board actions: each a CSRF-checked POST that changes real queue/run/flow state and redirects."""

from __future__ import annotations

import urllib.parse
from typing import Any

import redis.asyncio as aioredis

from conveyor.queue import Consumer, Job, Producer, QueueConfig
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


async def _fail(job: Job) -> None:
    raise RuntimeError("worker blew up")


async def _dead(redis: aioredis.Redis, *job_ids: str) -> None:
    cfg = QueueConfig(max_deliveries=1)
    for job_id in job_ids:
        await Producer(redis, cfg).enqueue("runs", {"run_id": job_id}, job_id=job_id)
    await Consumer(redis, _fail, cfg, queues=("runs",)).drain()


async def _queue(client: Any, q: str = "runs") -> dict[str, Any]:
    stats: dict[str, Any] = await (await client.get(f"/api/v1/queues/{q}")).json()
    return stats


async def test_actions_refuse_a_missing_or_wrong_csrf_token(make_client: Any) -> None:
    """A POST without the token, with a forged one or without the cookie is 403, no change."""
    client = await make_client(AP_CONTAINER_TYPE="APP")
    resp = await client.post("/admin/queues/runs/pause", allow_redirects=False)
    assert resp.status == 403 and "CSRF" in await resp.text()
    token = await csrf(client)
    assert (await act(client, "/admin/queues/runs/pause", "0" * 64))[0] == 403
    client.session.cookie_jar.clear()
    assert (await act(client, "/admin/queues/runs/pause", token))[0] == 403
    assert (await _queue(client))["paused"] is False
    token = await csrf(client)
    resp = await client.post(
        "/admin/queues/runs/pause", headers={"X-CSRF-Token": token}, allow_redirects=False
    )
    assert resp.status == 303


async def test_pause_and_resume_from_the_board(make_client: Any) -> None:
    """Pause then resume redirect back with a flash message and flip the queue's flag."""
    client = await make_client(AP_CONTAINER_TYPE="APP")
    token = await csrf(client, "/admin/queues/runs")
    status, location = await act(
        client, "/admin/queues/runs/pause", token, next="/admin/queues/runs?state=waiting"
    )
    assert (status, location) == (303, "/admin/queues/runs?state=waiting")
    assert (await _queue(client))["paused"] is True
    page = await (await client.get(location)).text()
    assert "Queue runs paused" in page and 'id="paused-badge"' in page and "Resume queue" in page
    again = await (await client.get(location)).text()
    assert "Queue runs paused" not in again  # the flash shows once
    status, _ = await act(client, "/admin/queues/runs/resume", token)
    assert status == 303 and (await _queue(client))["paused"] is False


async def test_clean_from_the_board(make_client: Any) -> None:
    """Clean waiting jobs older than N seconds; an invalid state is an error flash."""
    client = await make_client(AP_CONTAINER_TYPE="APP")
    fid = await create_flow(client, ECHO)
    await fire(client, fid, 3)
    token = await csrf(client, "/admin/queues/runs")
    await act(client, "/admin/queues/runs/clean", token, state="waiting", older_than_s="3600")
    assert (await _queue(client))["waiting"] == 3
    status, location = await act(
        client, "/admin/queues/runs/clean", token, state="waiting", older_than_s="0"
    )
    assert status == 303 and (await _queue(client))["waiting"] == 0
    assert "Removed 3 waiting job(s)" in await (await client.get(location)).text()
    status, location = await act(client, "/admin/queues/runs/clean", token, state="active")
    page = await (await client.get(location)).text()
    assert "flash-error" in page and "state must be one of" in page


async def test_retry_and_delete_jobs_from_the_board(
    make_client: Any, redis: aioredis.Redis
) -> None:
    """Retry one failed job, retry all failed, delete a job; a gone job is an error flash."""
    client = await make_client(AP_CONTAINER_TYPE="APP")
    await _dead(redis, "a", "b", "c")
    page = await (await client.get("/admin/queues/runs?state=failed")).text()
    assert page.count("Retry job") == 3 and "worker blew up" in page
    token = await csrf(client, "/admin/queues/runs?state=failed")
    assert (await act(client, "/admin/queues/runs/jobs/a/retry", token))[0] == 303
    stats = await _queue(client)
    assert (stats["dead"], stats["waiting"]) == (2, 1)
    await act(client, "/admin/queues/runs/jobs/a/delete", token)
    assert (await _queue(client))["waiting"] == 0
    await act(client, "/admin/queues/runs/retry-all", token)
    stats = await _queue(client)
    assert (stats["dead"], stats["waiting"]) == (0, 2)
    _, location = await act(
        client, "/admin/queues/runs/jobs/zzz/retry", token, next="/admin/queues/runs?state=failed"
    )
    page = await (await client.get(location)).text()
    assert "flash-error" in page and "zzz" in page


async def test_retry_failed_run_from_failed_step(make_client: Any) -> None:
    """A failed run retried FROM_FAILED_STEP after the secret is fixed succeeds, keeping step 1."""
    client = await make_client(AP_CONTAINER_TYPE="WORKER_AND_APP")
    await set_secret(client, "MODE", "broken-mode")
    fid = await create_flow(client, FLAKY)
    run_id = (await fire(client, fid))[0]
    await wait_status(client, run_id, "FAILED")
    await set_secret(client, "MODE", "healthy-mode")
    token = await csrf(client, f"/admin/runs/{run_id}")
    status, location = await act(
        client,
        f"/admin/runs/{run_id}/retry",
        token,
        strategy="FROM_FAILED_STEP",
        next=f"/admin/runs/{run_id}",
    )
    assert status == 303 and location == f"/admin/runs/{run_id}"
    run = await wait_status(client, run_id, "SUCCEEDED")
    assert run["attempt"] == 2 and [s["name"] for s in run["steps"]] == ["prepare", "check"]
    page = await (await client.get(location)).text()
    assert 'id="run-status">SUCCEEDED<' in page
    status, location = await act(client, f"/admin/runs/{run_id}/cancel", token)
    page = await (await client.get(location)).text()
    assert "flash-error" in page and "already ended as SUCCEEDED" in page


async def test_retry_on_latest_version_after_fixing_the_flow(make_client: Any) -> None:
    """Retry ON_LATEST_VERSION runs the flow's new version (fixed with PUT)."""
    client = await make_client(AP_CONTAINER_TYPE="WORKER_AND_APP")
    await set_secret(client, "MODE", "broken-mode")
    fid = await create_flow(client, FLAKY)
    run_id = (await fire(client, fid))[0]
    await wait_status(client, run_id, "FAILED")
    fixed = {**FLAKY, "steps": [FLAKY["steps"][0]]}
    assert (await client.put(f"/api/v1/flows/{fid}", json=fixed)).status == 200
    token = await csrf(client, f"/admin/runs/{run_id}")
    await act(client, f"/admin/runs/{run_id}/retry", token, strategy="ON_LATEST_VERSION")
    run = await wait_status(client, run_id, "SUCCEEDED")
    assert run["flow_version"] == 2 and [s["name"] for s in run["steps"]] == ["prepare"]
    _, location = await act(client, f"/admin/runs/{run_id}/retry", token, strategy="BOGUS")
    assert "strategy must be one of" in await (await client.get(location)).text()


async def test_cancel_a_queued_run(make_client: Any) -> None:
    """A queued run (APP role: nobody consumes) is canceled from its page."""
    client = await make_client(AP_CONTAINER_TYPE="APP")
    fid = await create_flow(client, ECHO)
    run_id = (await fire(client, fid))[0]
    page = await (await client.get(f"/admin/runs/{run_id}")).text()
    assert "Cancel run" in page and "Retry from failed step" not in page
    token = await csrf(client, f"/admin/runs/{run_id}")
    status, location = await act(client, f"/admin/runs/{run_id}/cancel", token)
    assert status == 303
    run = await (await client.get(f"/api/v1/flow-runs/{run_id}")).json()
    assert run["status"] == "CANCELED"
    assert "Run canceled" in await (await client.get(location)).text()


async def test_enable_and_disable_a_flow(make_client: Any) -> None:
    """Disable makes the webhook 404; enable brings it back."""
    client = await make_client(AP_CONTAINER_TYPE="APP")
    fid = await create_flow(client, ECHO)
    token = await csrf(client, "/admin/flows")
    status, location = await act(client, f"/admin/flows/{fid}/disable", token)
    assert status == 303 and location == "/admin/queues"  # no next, no referrer
    assert (await client.post(f"/api/v1/webhooks/{fid}", json={})).status == 404
    page = await (await client.get("/admin/flows")).text()
    assert 'badge-bad">disabled<' in page and "Enable <span" in page
    await act(client, f"/admin/flows/{fid}/enable", token, next="/admin/flows")
    assert (await client.post(f"/api/v1/webhooks/{fid}", json={})).status == 202
    assert (await act(client, "/admin/flows/not-an-id/enable", token))[0] == 303


async def test_redirects_never_leave_the_board(make_client: Any) -> None:
    """A hostile next or Referer falls back to the overview (no open redirect)."""
    client = await make_client(AP_CONTAINER_TYPE="APP")
    token = await csrf(client)
    for target in ("https://evil.example/admin/", "//evil.example/admin/x", "/api/v1/flows"):
        _, location = await act(client, "/admin/queues/runs/resume", token, next=target)
        assert location == "/admin/queues", target
    resp = await client.post(
        "/admin/queues/runs/resume",
        data={"csrf_token": token},
        headers={"Referer": str(client.make_url("/admin/queues/runs?state=failed"))},
        allow_redirects=False,
    )
    assert resp.headers["Location"] == "/admin/queues/runs?state=failed"
    assert urllib.parse.urlsplit(resp.headers["Location"]).netloc == ""


async def test_hostile_next_runs_the_action_and_lands_on_the_board(make_client: Any) -> None:
    """A ``next`` with a control character (aiohttp refuses it in ``Location``: the connection
    used to drop after the action ran) or one that climbs out of ``/admin/`` with ``..``
    falls back to the overview; the action still runs and the answer is a 303."""
    client = await make_client(AP_CONTAINER_TYPE="APP")
    fid = await create_flow(client, ECHO)
    token = await csrf(client)
    for target in (
        "/admin/x\r\nSet-Cookie: a=b",
        "/admin/x\x00y",
        "/admin/x\x7fy",
        "/admin/x\x0by",
        "\t/admin/x",
        "/admin/../../evil",
        "/admin/../api/v1/flows",
        "/admin/..",
    ):
        await client.post(f"/api/v1/flows/{fid}/enable")
        status, location = await act(client, f"/admin/flows/{fid}/disable", token, next=target)
        assert (status, location) == (303, "/admin/queues"), target
        flow = await (await client.get(f"/api/v1/flows/{fid}")).json()
        assert flow["enabled"] is False, target
    # A harmless path is normalised and kept, with its query.
    status, location = await act(
        client, f"/admin/flows/{fid}/enable", token, next="/admin/flows/../runs?status=FAILED"
    )
    assert (status, location) == (303, "/admin/runs?status=FAILED")
