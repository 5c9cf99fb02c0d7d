"""A webhook runs a flow end to end on a real worker: sync replies, async runs, run detail."""

from __future__ import annotations

import uuid
from typing import Any

import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from conveyor.queue import Consumer, Job, QueueConfig
from conveyor.store.db import Database
from tests.polling import eventually

ORDER = {
    "name": "order-alert",
    "trigger": {"type": "webhook"},
    "steps": [
        {
            "name": "parse",
            "type": "transform",
            "input": {"total": "{{trigger.body.amount}}", "email": "{{trigger.body.email}}"},
        },
        {
            "name": "score",
            "type": "code",
            "input": {"total": "{{parse.total}}"},
            "code": (
                "def run(input):\n    print('scoring')\n    return {'big': input['total'] > 100}\n"
            ),
        },
        {
            "name": "route",
            "type": "branch",
            "when": {"all": [{"left": "{{score.big}}", "op": "is_true"}]},
            "then": [{"name": "vip", "type": "transform", "input": {"tier": "gold"}}],
            "else": [{"name": "std", "type": "transform", "input": {"tier": "std"}}],
        },
        {
            "name": "reply",
            "type": "respond",
            "input": {
                "status": 201,
                "headers": {"x-tier": "yes"},
                "body": {"big": "{{score.big}}"},
            },
        },
    ],
}


async def _worker_client(make_client: Any) -> TestClient[Any, Any]:
    client: TestClient[Any, Any] = await make_client(
        AP_CONTAINER_TYPE="WORKER_AND_APP", AP_WORKER_CONCURRENCY="4"
    )
    return client


async def test_sync_webhook_answers_with_respond_step(make_client: Any) -> None:
    """The respond step's status, headers and body reach the caller; the run is recorded."""
    client = await _worker_client(make_client)
    fid = (await (await client.post("/api/v1/flows", json=ORDER)).json())["id"]
    resp = await client.post(
        f"/api/v1/webhooks/{fid}/sync", json={"amount": 250, "email": "a@example.com"}
    )
    assert resp.status == 201, await resp.text()
    assert await resp.json() == {"big": True}
    assert resp.headers["x-tier"] == "yes"
    run_id = resp.headers["x-run-id"]
    detail = await _wait_status(client, run_id, "SUCCEEDED")
    names = [s["name"] for s in detail["steps"]]
    assert names == ["parse", "score", "route", "vip", "reply"]
    vip = next(s for s in detail["steps"] if s["name"] == "vip")
    assert vip["parent"] == "route"
    score = next(s for s in detail["steps"] if s["name"] == "score")
    assert "scoring" in score["logs"] and score["output"] == {"big": True}


async def test_sync_webhook_without_respond_returns_last_output(make_client: Any) -> None:
    """No respond step: 200 with the last step's output."""
    client = await _worker_client(make_client)
    flow = {
        "name": "plain",
        "trigger": {"type": "webhook"},
        "steps": [{"name": "t", "type": "transform", "input": {"echo": "{{trigger.body.x}}"}}],
    }
    fid = (await (await client.post("/api/v1/flows", json=flow)).json())["id"]
    resp = await client.post(f"/api/v1/webhooks/{fid}/sync", json={"x": [1, 2]})
    assert resp.status == 200
    assert await resp.json() == {"echo": [1, 2]}


async def test_respond_step_headers_are_safe(make_client: Any) -> None:
    """A respond step's Content-Type is honoured; framing and CR/LF headers are dropped."""
    client = await _worker_client(make_client)
    flow = {
        "name": "hdrs",
        "trigger": {"type": "webhook"},
        "steps": [
            {
                "name": "r",
                "type": "respond",
                "input": {
                    "status": 200,
                    "body": {"a": 1},
                    "headers": {
                        "Content-Type": "application/vnd.api+json",
                        "Content-Length": "1",
                        "X-Evil": "a\r\nSet-Cookie: x=1",
                        "X-Ok": "yes",
                    },
                },
            }
        ],
    }
    fid = (await (await client.post("/api/v1/flows", json=flow)).json())["id"]
    resp = await client.post(f"/api/v1/webhooks/{fid}/sync", json={})
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "application/vnd.api+json"
    assert resp.headers["X-Ok"] == "yes" and "X-Evil" not in resp.headers
    assert "Set-Cookie" not in resp.headers
    assert await resp.json(content_type=None) == {"a": 1}


async def test_failed_run_answers_500_with_step_error(make_client: Any) -> None:
    """A code step that raises: 500 with the run status and step, never the step's error."""
    client = await _worker_client(make_client)
    flow = {
        "name": "boom",
        "trigger": {"type": "webhook"},
        "steps": [
            {
                "name": "c",
                "type": "code",
                "input": {},
                "code": "def run(input):\n    raise ValueError('bad total')\n",
            }
        ],
    }
    fid = (await (await client.post("/api/v1/flows", json=flow)).json())["id"]
    resp = await client.post(f"/api/v1/webhooks/{fid}/sync", json={})
    assert resp.status == 500
    body = await resp.json()
    assert body["error"]["code"] == "FAILED" and "'c'" in body["error"]["message"]
    assert "bad total" not in body["error"]["message"] and body["run_id"]
    assert "conveyor/" not in body["error"]["message"]


async def test_sync_timeout_408_run_goes_on(make_client: Any) -> None:
    """Past AP_WEBHOOK_TIMEOUT_SECONDS the caller gets 408 with the run id."""
    client: TestClient[Any, Any] = await make_client(
        AP_CONTAINER_TYPE="WORKER_AND_APP", AP_WEBHOOK_TIMEOUT_SECONDS="1"
    )
    flow = {
        "name": "slow",
        "trigger": {"type": "webhook"},
        "steps": [
            {"name": "wait", "type": "delay", "input": {"seconds": 2}},
            {"name": "t", "type": "transform", "input": {"done": True}},
        ],
    }
    fid = (await (await client.post("/api/v1/flows", json=flow)).json())["id"]
    resp = await client.post(f"/api/v1/webhooks/{fid}/sync", json={})
    assert resp.status == 408
    body = await resp.json()
    assert body["error"]["code"] == "WEBHOOK_TIMEOUT" and body["run_id"]
    await _wait_status(client, body["run_id"], "SUCCEEDED")


async def test_async_runs_listed_with_filters(make_client: Any) -> None:
    """Async webhooks run to SUCCEEDED; the list filters by flow and status and pages."""
    client = await _worker_client(make_client)
    flow = {
        "name": "bg",
        "trigger": {"type": "webhook"},
        "steps": [{"name": "t", "type": "transform", "input": {"n": "{{trigger.body.n}}"}}],
    }
    fid = (await (await client.post("/api/v1/flows", json=flow)).json())["id"]
    ids = []
    for n in range(5):
        r = await client.post(f"/api/v1/webhooks/{fid}", json={"n": n})
        ids.append((await r.json())["run_id"])

    async def all_succeeded() -> dict[str, Any] | None:
        done = await (await client.get(f"/api/v1/flow-runs?flow_id={fid}&status=SUCCEEDED")).json()
        return done if len(done["data"]) == 5 else None

    done = await eventually(all_succeeded, timeout_s=10, interval_s=0.05, what="5 runs SUCCEEDED")
    page = await (
        await client.get(f"/api/v1/flow-runs?flow_id={fid}&status=SUCCEEDED&limit=2")
    ).json()
    assert [r["id"] for r in done["data"]] == list(reversed(ids))
    assert len(page["data"]) == 2 and page["next_cursor"]
    assert (await client.get("/api/v1/flow-runs?status=NOPE")).status == 400


async def _wait_runs_queue_idle(client: TestClient[Any, Any]) -> None:
    """Wait until the runs queue holds nothing waiting or in flight (its jobs acknowledged)."""

    async def idle() -> bool:
        data = (await (await client.get("/api/v1/queues")).json())["data"]
        runs_q = next(q for q in data if q["queue"] == "runs")
        return runs_q["waiting"] == 0 and runs_q["active"] == 0

    await eventually(idle, timeout_s=10, interval_s=0.05, what="runs queue idle")


async def _wait_status(client: TestClient[Any, Any], run_id: str, *want: str) -> dict[str, Any]:
    async def reached() -> dict[str, Any] | None:
        run: dict[str, Any] = await (await client.get(f"/api/v1/flow-runs/{run_id}")).json()
        return run if run["status"] in want else None

    return await eventually(reached, timeout_s=10, interval_s=0.05, what=f"run {want}")


async def test_retry_from_failed_step_keeps_earlier_steps(make_client: Any) -> None:
    """FROM_FAILED_STEP re-runs from the failed step; ON_LATEST_VERSION uses the new version."""
    client = await _worker_client(make_client)
    await client.put("/api/v1/secrets/FLAG", json={"value": "bad"})
    flow = {
        "name": "flaky",
        "trigger": {"type": "webhook"},
        "steps": [
            {"name": "first", "type": "transform", "input": {"a": 1}},
            {
                "name": "check",
                "type": "code",
                "input": {"flag": "{{secrets.FLAG}}"},
                "code": "def run(input):\n    assert input['flag'] == 'ok', 'flag'\n    return 1\n",
            },
        ],
    }
    fid = (await (await client.post("/api/v1/flows", json=flow)).json())["id"]
    rid = (await (await client.post(f"/api/v1/webhooks/{fid}", json={})).json())["run_id"]
    failed = await _wait_status(client, rid, "FAILED")
    assert failed["error"]["step"] == "check"
    first_started = failed["steps"][0]["started_at"]
    await client.put("/api/v1/secrets/FLAG", json={"value": "ok"})
    resp = await client.post(
        f"/api/v1/flow-runs/{rid}/retry", json={"strategy": "FROM_FAILED_STEP"}
    )
    assert resp.status == 202
    done = await _wait_status(client, rid, "SUCCEEDED")
    assert [s["name"] for s in done["steps"]] == ["first", "check"]
    assert done["steps"][0]["started_at"] == first_started and done["attempt"] >= 2
    # A running/finished-state conflict and a bad strategy are client errors.
    bad = await client.post(f"/api/v1/flow-runs/{rid}/retry", json={"strategy": "NOPE"})
    assert bad.status == 400
    v2 = {**flow, "steps": [{"name": "only", "type": "transform", "input": {"v": 2}}]}
    assert (await client.put(f"/api/v1/flows/{fid}", json=v2)).status == 200
    resp = await client.post(
        f"/api/v1/flow-runs/{rid}/retry", json={"strategy": "ON_LATEST_VERSION"}
    )
    assert resp.status == 202
    latest = await _wait_status(client, rid, "SUCCEEDED")
    assert latest["flow_version"] == 2 and [s["name"] for s in latest["steps"]] == ["only"]


async def test_cancel_queued_run(make_client: Any) -> None:
    """A canceled run stays CANCELED; canceling a finished run is 409."""
    client: TestClient[Any, Any] = await make_client(AP_CONTAINER_TYPE="APP")
    flow = {
        "name": "c",
        "trigger": {"type": "webhook"},
        "steps": [{"name": "t", "type": "transform", "input": {}}],
    }
    fid = (await (await client.post("/api/v1/flows", json=flow)).json())["id"]
    rid = (await (await client.post(f"/api/v1/webhooks/{fid}", json={})).json())["run_id"]
    resp = await client.post(f"/api/v1/flow-runs/{rid}/cancel")
    assert resp.status == 200 and (await resp.json())["status"] == "CANCELED"
    worker = await _worker_client(make_client)
    await _wait_runs_queue_idle(worker)
    run = await (await worker.get(f"/api/v1/flow-runs/{rid}")).json()
    assert run["status"] == "CANCELED" and run["steps"] == []
    again = await client.post(f"/api/v1/flow-runs/{rid}/cancel")
    assert again.status == 200
    rid2 = (await (await worker.post(f"/api/v1/webhooks/{fid}", json={})).json())["run_id"]
    await _wait_status(worker, rid2, "SUCCEEDED")
    assert (await worker.post(f"/api/v1/flow-runs/{rid2}/cancel")).status == 409


async def test_cancel_running_run_stops_before_next_step(make_client: Any) -> None:
    """Canceling a running run: the step in flight ends, no later step runs, CANCELED stays."""
    client = await _worker_client(make_client)
    flow = {
        "name": "long",
        "trigger": {"type": "webhook"},
        "steps": [
            {
                "name": "slow",
                "type": "code",
                "input": {},
                "code": "import time\ndef run(input):\n    time.sleep(1.0)\n    return 1\n",
            },
            {"name": "after", "type": "transform", "input": {"x": 1}},
        ],
    }
    fid = (await (await client.post("/api/v1/flows", json=flow)).json())["id"]
    rid = (await (await client.post(f"/api/v1/webhooks/{fid}", json={})).json())["run_id"]
    await _wait_status(client, rid, "RUNNING")
    assert (await client.post(f"/api/v1/flow-runs/{rid}/cancel")).status == 200
    await _wait_runs_queue_idle(client)
    run = await (await client.get(f"/api/v1/flow-runs/{rid}")).json()
    assert run["status"] == "CANCELED"
    assert "after" not in [s["name"] for s in run["steps"]]


async def test_retrying_a_dead_job_runs_its_run_again(
    make_client: Any, db: Database, redis: aioredis.Redis
) -> None:
    """A dead-lettered job retried from the queue admin puts its INTERNAL_ERROR run back."""
    app_only: TestClient[Any, Any] = await make_client(AP_CONTAINER_TYPE="APP")
    flow = {
        "name": "dies",
        "trigger": {"type": "webhook"},
        "steps": [{"name": "t", "type": "transform", "input": {"ok": True}}],
    }
    fid = (await (await app_only.post("/api/v1/flows", json=flow)).json())["id"]
    rid = (await (await app_only.post(f"/api/v1/webhooks/{fid}", json={})).json())["run_id"]

    async def explode(job: Job) -> None:
        raise RuntimeError("handler exploded")

    cfg = QueueConfig(max_deliveries=1)
    await Consumer(redis, explode, cfg, queues=("runs",)).drain()
    async with db.writer() as conn:  # what the worker's on_dead does
        await conn.execute(
            "UPDATE runs SET status = 'INTERNAL_ERROR' WHERE id = $1", uuid.UUID(rid)
        )
    worker = await _worker_client(make_client)
    resp = await worker.post(f"/api/v1/queues/runs/jobs/{rid}/retry")
    assert resp.status == 200, await resp.text()
    done = await _wait_status(worker, rid, "SUCCEEDED")
    assert [s["name"] for s in done["steps"]] == ["t"]
