"""Queue admin, worker registry and scaling advice over HTTP, against real Redis and PostgreSQL."""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from conveyor.heartbeat import Heartbeat
from conveyor.queue import Consumer, Job, Producer, QueueConfig

FLOW = {
    "name": "admin-echo",
    "trigger": {"type": "webhook"},
    "steps": [{"name": "t", "type": "transform", "input": {"x": "{{trigger.body.x}}"}}],
}


async def _flow(client: TestClient[Any, Any], doc: dict[str, Any] = FLOW) -> str:
    resp = await client.post("/api/v1/flows", json=doc)
    assert resp.status == 201, await resp.text()
    flow_id: str = (await resp.json())["id"]
    return flow_id


async def _fire(client: TestClient[Any, Any], flow_id: str, n: int) -> list[str]:
    ids = []
    for i in range(n):
        resp = await client.post(f"/api/v1/webhooks/{flow_id}", json={"x": i})
        assert resp.status == 202
        ids.append(resp.headers["x-run-id"])
    return ids


async def _fail(job: Job) -> None:
    raise RuntimeError("handler exploded")


async def _dead(redis: aioredis.Redis, job_id: str) -> None:
    cfg = QueueConfig(max_deliveries=1)
    await Producer(redis, cfg).enqueue("runs", {"run_id": job_id}, job_id=job_id)
    await Consumer(redis, _fail, cfg, queues=("runs",)).drain()


async def test_queues_count_waiting_jobs_after_webhooks(client: TestClient[Any, Any]) -> None:
    """GET /api/v1/queues reports both queues; async webhooks show up as waiting on runs."""
    fid = await _flow(client)
    await _fire(client, fid, 3)
    body = await (await client.get("/api/v1/queues")).json()
    by_name = {q["queue"]: q for q in body["data"]}
    assert set(by_name) == {"sync", "runs"}
    assert by_name["runs"]["waiting"] == 3 and by_name["sync"]["waiting"] == 0
    one = await (await client.get("/api/v1/queues/runs")).json()
    assert one["waiting"] == 3 and isinstance(one["history"], list)


async def test_jobs_listed_by_state_with_cursor_paging(client: TestClient[Any, Any]) -> None:
    """Waiting jobs come oldest first, two per page, the cursor leads to the rest."""
    fid = await _flow(client)
    ids = await _fire(client, fid, 3)
    first = await (await client.get("/api/v1/queues/runs/jobs?state=waiting&limit=2")).json()
    assert [j["id"] for j in first["data"]] == ids[:2] and first["next_cursor"]
    assert first["data"][0]["payload"]["run_id"] == ids[0]
    resp = await client.get(
        "/api/v1/queues/runs/jobs", params={"state": "waiting", "cursor": first["next_cursor"]}
    )
    second = await resp.json()
    assert [j["id"] for j in second["data"]] == ids[2:] and second["next_cursor"] is None
    for state in ("active", "delayed", "failed", "completed"):
        resp = await client.get(f"/api/v1/queues/runs/jobs?state={state}")
        assert resp.status == 200 and (await resp.json())["data"] == []


async def test_unknown_queue_is_404_and_bad_arguments_400(client: TestClient[Any, Any]) -> None:
    """An unknown queue is a 404 JSON error; a bad state, limit, cursor or body is a 400."""
    for method, path in (
        ("GET", "/api/v1/queues/nope"),
        ("GET", "/api/v1/queues/nope/jobs"),
        ("POST", "/api/v1/queues/nope/pause"),
        ("POST", "/api/v1/queues/nope/jobs/x/retry"),
        ("DELETE", "/api/v1/queues/nope/jobs/x"),
    ):
        resp = await client.request(method, path)
        assert resp.status == 404, path
        assert (await resp.json())["error"]["code"] == "QUEUE_NOT_FOUND"
    for query in ("state=bogus", "limit=0", "limit=x", "cursor=zz"):
        resp = await client.get(f"/api/v1/queues/runs/jobs?{query}")
        assert resp.status == 400, query
        assert (await resp.json())["error"]["code"] == "BAD_REQUEST"
    for body in ({"state": "active"}, {}, {"state": "waiting", "older_than_s": "x"}):
        resp = await client.post("/api/v1/queues/runs/clean", json=body)
        assert resp.status == 400, body
    resp = await client.post(
        "/api/v1/queues/runs/clean", data=b"{", headers={"Content-Type": "application/json"}
    )
    assert resp.status == 400


async def test_pause_and_resume_flag_the_queue(client: TestClient[Any, Any]) -> None:
    """POST pause/resume flips the queue's paused flag that stats report."""
    resp = await client.post("/api/v1/queues/runs/pause")
    assert resp.status == 200 and (await resp.json()) == {"queue": "runs", "paused": True}
    assert (await (await client.get("/api/v1/queues/runs")).json())["paused"] is True
    await client.post("/api/v1/queues/runs/resume")
    assert (await (await client.get("/api/v1/queues/runs")).json())["paused"] is False


async def test_clean_removes_jobs_older_than_the_cutoff(client: TestClient[Any, Any]) -> None:
    """clean spares jobs younger than older_than_s and removes the rest."""
    fid = await _flow(client)
    await _fire(client, fid, 2)
    kept = await client.post(
        "/api/v1/queues/runs/clean", json={"state": "waiting", "older_than_s": 3600}
    )
    assert (await kept.json())["removed"] == 0
    resp = await client.post(
        "/api/v1/queues/runs/clean", json={"state": "waiting", "older_than_s": 0}
    )
    assert resp.status == 200 and (await resp.json())["removed"] == 2
    assert (await (await client.get("/api/v1/queues/runs")).json())["waiting"] == 0


async def test_retry_and_delete_dead_jobs(
    client: TestClient[Any, Any], redis: aioredis.Redis
) -> None:
    """A dead-lettered job is listed as failed, retried back to waiting, deleted; unknown → 404."""
    await _dead(redis, "job-a")
    await _dead(redis, "job-b")
    failed = await (await client.get("/api/v1/queues/runs/jobs?state=failed")).json()
    assert {j["id"] for j in failed["data"]} == {"job-a", "job-b"}
    assert "handler exploded" in failed["data"][0]["error"]
    resp = await client.post("/api/v1/queues/runs/jobs/job-a/retry")
    assert resp.status == 200 and (await resp.json())["state"] == "waiting"
    assert (await client.post("/api/v1/queues/runs/jobs/job-a/retry")).status == 404
    waiting = await (await client.get("/api/v1/queues/runs/jobs?state=waiting")).json()
    assert [j["id"] for j in waiting["data"]] == ["job-a"]
    resp = await client.delete("/api/v1/queues/runs/jobs/job-b")
    assert resp.status == 200 and (await resp.json())["deleted_from"] == "dead"
    resp = await client.delete("/api/v1/queues/runs/jobs/job-b")
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "JOB_NOT_FOUND"


async def test_retry_all_puts_every_dead_job_back(
    client: TestClient[Any, Any], redis: aioredis.Redis
) -> None:
    """POST retry-all empties the dead letters into the waiting list."""
    for name in ("d1", "d2", "d3"):
        await _dead(redis, name)
    resp = await client.post("/api/v1/queues/runs/retry-all")
    assert (await resp.json())["retried"] == 3
    stats = await (await client.get("/api/v1/queues/runs")).json()
    assert (stats["dead"], stats["waiting"]) == (0, 3)


async def test_workers_list_the_live_worker_process(make_client: Any) -> None:
    """A WORKER_AND_APP process registers itself with the registry's fields."""
    client = await make_client(AP_CONTAINER_TYPE="WORKER_AND_APP", AP_WORKER_CONCURRENCY="3")
    body = await (await client.get("/api/v1/workers")).json()
    assert len(body["data"]) == 1
    worker = body["data"][0]
    for field in (
        "id",
        "host",
        "pid",
        "role",
        "concurrency",
        "busy",
        "cpu_percent",
        "rss_bytes",
        "last_seen",
    ):
        assert field in worker, field
    assert worker["role"] == "WORKER_AND_APP" and worker["concurrency"] == 3
    assert worker["rss_bytes"] > 1_000_000 and worker["lost"] is False


async def test_app_role_has_no_workers_and_lost_ones_are_filtered(
    client: TestClient[Any, Any], redis: aioredis.Redis
) -> None:
    """An APP process registers nothing; a stale heartbeat is hidden unless include_lost."""
    assert (await (await client.get("/api/v1/workers")).json())["data"] == []
    beat = Heartbeat(redis, worker_id="old", role="WORKER", concurrency=1, busy=lambda: 0)
    snap = await beat.beat()
    await redis.hset(b"conveyor:{workers}:worker:old", "last_seen", str(snap["last_seen"] - 60))
    assert (await (await client.get("/api/v1/workers")).json())["data"] == []
    body = await (await client.get("/api/v1/workers?include_lost=true")).json()
    assert [(w["id"], w["lost"]) for w in body["data"]] == [("old", True)]


async def test_scaling_advice_flags_a_backlog(
    client: TestClient[Any, Any], redis: aioredis.Redis
) -> None:
    """Over 100 waiting jobs breaches the waiting-jobs rule with "add workers"."""
    producer = Producer(redis, QueueConfig())
    await asyncio.gather(*(producer.enqueue("runs", {"i": i}, job_id=f"j{i}") for i in range(120)))
    body = await (await client.get("/api/v1/scaling")).json()
    rules = {r["rule"]: r for r in body["data"]}
    assert set(rules) == {
        "waiting_jobs",
        "average_wait_seconds",
        "worker_cpu_percent",
        "worker_memory_percent",
        "api_p95_latency_ms",
        "api_error_rate_percent",
        "db_connections_percent",
    }
    waiting = rules["waiting_jobs"]
    assert waiting["value"] == 120 and waiting["threshold"] == 100 and waiting["breached"]
    assert waiting["recommendation"] == "add workers"
    assert waiting["message"] == "Waiting jobs 120 > 100: add workers"
    assert rules["db_connections_percent"]["breached"] is False
    assert 0 < rules["db_connections_percent"]["value"] < 80
    for rule in body["data"]:
        assert set(rule) >= {"rule", "value", "threshold", "breached", "recommendation"}


async def test_admin_routes_require_the_api_key(make_client: Any) -> None:
    """With AP_API_KEY set the admin routes answer 401 without the bearer token."""
    client = await make_client(AP_CONTAINER_TYPE="APP", AP_API_KEY="k" * 32)
    assert (await client.get("/api/v1/queues")).status == 401
    resp = await client.get("/api/v1/queues", headers={"Authorization": "Bearer " + "k" * 32})
    assert resp.status == 200
