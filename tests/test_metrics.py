"""Prometheus metrics: the conveyor_* names on /metrics in every role, route labels, observations,
multiprocess mode, and the alert rules file."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from conveyor import metrics
from conveyor.metrics import RULES, evaluate_scaling
from tests.api.conftest import make_client  # noqa: F401  (fixture)
from tests.polling import eventually

ROOT = Path(__file__).parents[1]
FLOW = {
    "name": "metered",
    "trigger": {"type": "webhook"},
    "steps": [{"name": "t", "type": "transform", "input": {"x": "{{trigger.body.x}}"}}],
}
NAMES = (
    "conveyor_queue_waiting_jobs",
    "conveyor_queue_active_jobs",
    "conveyor_queue_delayed_jobs",
    "conveyor_queue_dead_jobs",
    "conveyor_queue_oldest_wait_seconds",
    "conveyor_job_wait_seconds",
    "conveyor_flow_run_duration_seconds",
    "conveyor_step_duration_seconds",
    "conveyor_http_request_duration_seconds",
    "conveyor_flow_runs",
    "conveyor_http_requests",
    "conveyor_webhooks_rejected",
    "conveyor_worker_busy_slots",
    "conveyor_worker_concurrency",
    "conveyor_db_pool_size",
    "conveyor_db_pool_in_use",
    "conveyor_db_connections_active",
    "conveyor_db_max_connections",
)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def families(text: str) -> set[str]:
    return {f.name for f in text_string_to_metric_families(text)}


async def _scrape(client: Any) -> str:
    resp = await client.get("/metrics")
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
    text: str = await resp.text()
    return text


async def test_metrics_expose_every_design_name(make_client: Any) -> None:  # noqa: F811
    """/metrics carries every §7 name plus the process collectors, queue gauges per queue."""
    client = await make_client(AP_CONTAINER_TYPE="APP")
    fid = (await (await client.post("/api/v1/flows", json=FLOW)).json())["id"]
    for i in range(2):
        assert (await client.post(f"/api/v1/webhooks/{fid}", json={"x": i})).status == 202
    text = await _scrape(client)
    assert set(NAMES) <= families(text)
    assert "process_resident_memory_bytes" in text
    values = samples(text)
    assert values[("conveyor_queue_waiting_jobs", (("queue", "runs"),))] == 2
    assert values[("conveyor_queue_waiting_jobs", (("queue", "sync"),))] == 0
    assert values[("conveyor_db_max_connections", ())] >= 1
    assert values[("conveyor_db_connections_active", ())] >= 1


async def test_http_metrics_label_routes_by_template(make_client: Any) -> None:  # noqa: F811
    """Requests are labelled with the route template, never the raw URL; rejections counted."""
    client = await make_client(AP_CONTAINER_TYPE="APP")
    run_id = "0190f0f0-0000-7000-8000-000000000000"
    key = ("conveyor_webhooks_rejected_total", (("reason", "flow_not_found"),))
    before = samples(await _scrape(client)).get(key, 0.0)
    assert (await client.get(f"/api/v1/flow-runs/{run_id}")).status == 404
    assert (await client.post(f"/api/v1/webhooks/{run_id}", json={})).status == 404
    text = await _scrape(client)
    assert run_id not in text
    values = samples(text)
    labels = (("method", "GET"), ("route", "/api/v1/flow-runs/{id}"), ("status", "404"))
    assert values[("conveyor_http_requests_total", labels)] >= 1
    timed = (("method", "GET"), ("route", "/api/v1/flow-runs/{id}"))
    assert values[("conveyor_http_request_duration_seconds_count", timed)] >= 1
    assert values[key] == before + 1


async def test_worker_role_observes_runs_and_steps(make_client: Any) -> None:  # noqa: F811
    """A run executed by the worker counts in flow_runs_total and times its steps and wait."""
    client = await make_client(AP_CONTAINER_TYPE="WORKER_AND_APP")
    ok = ("conveyor_flow_runs_total", (("status", "SUCCEEDED"),))
    step = ("conveyor_step_duration_seconds_count", (("type", "transform"),))
    wait = ("conveyor_job_wait_seconds_count", ())
    before = samples(await _scrape(client))
    fid = (await (await client.post("/api/v1/flows", json=FLOW)).json())["id"]
    assert (await client.post(f"/api/v1/webhooks/{fid}/sync", json={"x": 1})).status == 200

    async def counted() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
        after = samples(await _scrape(client))
        return after if after.get(ok, 0) > before.get(ok, 0) else None

    after = await eventually(counted, timeout_s=5, interval_s=0.05, what="run counted")
    assert after[ok] == before.get(ok, 0) + 1
    assert after[step] >= before.get(step, 0) + 1 and after[wait] >= before.get(wait, 0) + 1
    assert after[("conveyor_worker_concurrency", ())] >= 1


async def test_worker_only_role_serves_metrics(make_client: Any) -> None:  # noqa: F811
    """AP_CONTAINER_TYPE=WORKER still answers /metrics (and no API or board)."""
    client = await make_client(AP_CONTAINER_TYPE="WORKER")
    assert set(NAMES) <= families(await _scrape(client))
    assert (await client.get("/api/v1/queues")).status == 404
    assert (await client.get("/admin/queues")).status == 404


_CHILD = textwrap.dedent(
    """
    import sys
    from conveyor import metrics
    metrics.observe_run("FAILED", None)
    metrics.WORKER_CONCURRENCY.set(int(sys.argv[1]))
    metrics.QUEUE_WAITING.labels("runs").set(7)
    """
)
_READER = textwrap.dedent(
    """
    from prometheus_client import generate_latest
    from conveyor import metrics
    print(generate_latest(metrics.registry()).decode())
    """
)


def test_multiprocess_mode_merges_every_process(tmp_path: Path) -> None:
    """With PROMETHEUS_MULTIPROC_DIR set, one scrape sums counters and capacity of all processes."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for slots in ("2", "3"):
        subprocess.run([sys.executable, "-c", _CHILD, slots], env=env, check=True, cwd=ROOT)
    out = subprocess.run(
        [sys.executable, "-c", _READER],
        env=env,
        check=True,
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout
    values = samples(out)
    assert values[("conveyor_flow_runs_total", (("status", "FAILED"),))] == 2
    assert values[("conveyor_queue_waiting_jobs", (("queue", "runs"),))] == 7
    assert values[("conveyor_worker_concurrency", ())] == 5


def test_scaling_rules_and_alert_file_agree() -> None:
    """alerts.yml has one alert per scaling rule, each naming the rule and its threshold."""
    doc = yaml.safe_load((ROOT / "configs" / "prometheus" / "alerts.yml").read_text())
    rules = [r for g in doc["groups"] for r in g["rules"]]
    by_rule = {r["labels"]["rule"]: r for r in rules}
    assert set(by_rule) == {r.rule for r in RULES}
    for r in RULES:
        alert = by_rule[r.rule]
        assert float(alert["annotations"]["threshold"]) == r.threshold
        assert alert["annotations"]["summary"].endswith(": " + r.recommendation)
        assert "conveyor_" in alert["expr"] and " > " in alert["expr"]


def test_evaluate_scaling_messages() -> None:
    """Breached rules say value > threshold and what to do; unknown values never breach."""
    out = {r["rule"]: r for r in evaluate_scaling({"waiting_jobs": 340, "api_p95_latency_ms": 20})}
    assert out["waiting_jobs"]["message"] == "Waiting jobs 340 > 100: add workers"
    assert out["api_p95_latency_ms"]["breached"] is False
    assert out["worker_cpu_percent"]["value"] is None and not out["worker_cpu_percent"]["breached"]


def test_tallies_fold_to_what_direct_observations_leave() -> None:
    """A histogram or counter recorded through its tally exposes, once the registry is
    read, byte for byte what observe()/inc() on the metric would have; one tally per child;
    a scrape of the default registry folds on its own."""
    assert metrics.TALLIED  # single-process test run
    direct_reg, tallied_reg = CollectorRegistry(), CollectorRegistry()
    buckets = (0.005, 0.01, 0.025, 0.1, 1.0)
    made = []
    for reg in (direct_reg, tallied_reg):
        made.append(
            (
                Histogram("t_seconds", "h", ["route"], buckets=buckets, registry=reg),
                Counter("t_requests", "c", ["route"], registry=reg),
            )
        )
    (h_direct, c_direct), (h_tallied, c_tallied) = made
    values = [0.0, 0.005, 0.0051, 0.01, 0.1, 0.33, 1.0, 7.5, 1e-9, 0.024999, 0.1 + 0.2]
    h_direct.labels("/a").observe(0.002)  # a child with values before its tally exists
    h_tallied.labels("/a").observe(0.002)
    timer = metrics.tally(h_tallied.labels("/a"))
    counter = metrics.tally(c_tallied.labels("/a"))
    assert metrics.tally(h_tallied.labels("/a")) is timer
    for v in values:
        h_direct.labels("/a").observe(v)
        c_direct.labels("/a").inc()
        timer.observe(v)
        counter.inc()
    c_direct.labels("/a").inc(2.5)
    counter.inc(2.5)
    with pytest.raises(ValueError):
        counter.inc(-1)

    def body(reg: CollectorRegistry) -> list[str]:
        return [
            line
            for line in generate_latest(reg).decode().splitlines()
            if "_created" not in line  # the two registries were made a moment apart
        ]

    metrics.fold()
    assert body(tallied_reg) == body(direct_reg)

    # The process's own metrics: a scrape folds (no explicit fold() before reading).
    step = ("conveyor_step_duration_seconds_count", (("type", "tally-test"),))
    before = samples(generate_latest(metrics.REGISTRY).decode()).get(step, 0.0)
    metrics.observe_step("tally-test", 12)
    metrics.observe_step("tally-test", 3000)
    after = samples(generate_latest(metrics.REGISTRY).decode())
    assert after[step] == before + 2
    le = (("le", "0.05"), ("type", "tally-test"))
    assert after[("conveyor_step_duration_seconds_bucket", le)] >= 1
