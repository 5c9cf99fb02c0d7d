"""Prometheus semantics of the shipped queries, checked by promtool over several scrape targets.

Every APP and WORKER process exports the queue-wide ``conveyor_queue_*`` gauges, and only
worker processes measure CPU and memory (APP processes export 0). The alert rules
(configs/prometheus/alerts.yml, unit-tested by alerts.test.yml), the KEDA query of the Helm
chart and the Grafana dashboard must count a backlog once however many pods report it, and
average CPU/memory over worker processes only. The last test scrapes a real APP and a real
PM2 WORKER and runs the rules' aggregations over what they export.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.helm_support import CHART, CONFIGS, PROMETHEUS, promtool_binary
from tests.polling import eventually
from tests.processes import conveyor_env, free_port, start_conveyor, stop_conveyor

ALERTS = PROMETHEUS / "alerts.yml"
ALERT_TESTS = PROMETHEUS / "alerts.test.yml"
DASHBOARD = CONFIGS / "grafana" / "conveyor-dashboard.json"
#: The targets of a split deployment that every rule test scrapes.
TARGETS = {"app-0:8080", "worker-0:9090", "worker-1:9090"}
#: What aggregates a queue-wide gauge, and what keeps only worker processes' series.
QUEUE_WIDE = "max by (queue) ("
WORKERS_ONLY = "and on (job, instance) (conveyor_worker_concurrency > 0)"


@pytest.fixture(scope="module")
def promtool() -> Path:
    """promtool (Debian's prometheus package; .ci/run provides it)."""
    return promtool_binary()


def run_promtool(promtool: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(promtool), *args], check=False, capture_output=True, text=True, timeout=120, cwd=cwd
    )


def alerts() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def duration_s(text: str) -> int:
    """A Prometheus duration of one unit (``5m``, ``30s``, ``1h``) in seconds."""
    match = re.fullmatch(r"(\d+)([smh])", text)
    assert match, text
    return int(match.group(1)) * {"s": 1, "m": 60, "h": 3600}[match.group(2)]


def shipped_queries() -> dict[str, str]:
    """Every PromQL expression we ship, by where it is: alerts, KEDA, dashboard."""
    out = {f"alert {r['alert']}": r["expr"] for r in alerts()}
    keda = yaml.safe_load((CHART / "values.yaml").read_text())["keda"]
    out["keda waitingJobs"] = keda["waitingJobs"]["query"]
    out["keda averageWait"] = keda["averageWait"]["query"]
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            out[f"dashboard {panel['title']} / {target['legendFormat']}"] = target["expr"]
    return out


# --------------------------------------------------------------------------- static
def test_alert_rules_pass_promtool_check(promtool: Path) -> None:
    """promtool check rules accepts alerts.yml (syntax, templates, durations)."""
    proc = run_promtool(promtool, "check", "rules", ALERTS.name, cwd=PROMETHEUS)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in proc.stdout


def test_queue_gauges_and_worker_gauges_aggregate_right() -> None:
    """Every shipped query takes queue gauges per queue with max, CPU/memory of workers only."""
    bad = {}
    for where, expr in shipped_queries().items():
        flat = " ".join(expr.split())
        for match in re.finditer(r"conveyor_queue_[a-z_]+", flat):
            if not flat[: match.start()].endswith(QUEUE_WIDE):
                bad[where] = f"{match.group(0)} outside {QUEUE_WIDE!r}"
        for match in re.finditer(r"conveyor_worker_(cpu|memory)_percent", flat):
            if not flat[match.end() :].startswith(" " + WORKERS_ONLY):
                bad[where] = f"{match.group(0)} not followed by {WORKERS_ONLY!r}"
    assert bad == {}


def test_every_alert_has_firing_and_quiet_unit_tests() -> None:
    """alerts.test.yml makes each alert fire and stay quiet (after its `for`), over 3 targets."""
    tests = yaml.safe_load(ALERT_TESTS.read_text())
    assert tests["rule_files"] == [ALERTS.name]
    fires: set[str] = set()
    quiet: set[str] = set()
    hold = {r["alert"]: duration_s(r.get("for", "0s")) for r in alerts()}
    for case in tests["tests"]:
        instances = {
            m.group(1)
            for s in case["input_series"]
            if (m := re.search(r'instance="([^"]+)"', s["series"]))
        }
        assert instances == TARGETS, (case["name"], instances)
        for check in case["alert_rule_test"]:
            name = check["alertname"]
            if check["exp_alerts"]:
                fires.add(name)
            elif duration_s(check["eval_time"]) > hold[name]:
                quiet.add(name)  # quiet although the alert's `for` has passed
    assert fires == quiet == set(hold), (set(hold) - fires, set(hold) - quiet)


# --------------------------------------------------------------------------- promtool
def test_alert_unit_tests_pass(promtool: Path) -> None:
    """`promtool test rules alerts.test.yml`: every alert fires and stays quiet as expected."""
    proc = run_promtool(promtool, "test", "rules", ALERT_TESTS.name, cwd=PROMETHEUS)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def _series(name: str, instance: str, values: str, **labels: str) -> dict[str, str]:
    pairs = {"job": "conveyor", "instance": instance, **labels}
    body = ",".join(f"{k}={json.dumps(v)}" for k, v in pairs.items())
    return {"series": f"{name}{{{body}}}", "values": values}


def _cluster_series() -> list[dict[str, str]]:
    """One APP pod and two PM2 WORKER pods, all reading the same queue."""
    out = []
    queue = {"runs": (150, 8, 3, 2, 40), "sync": (10, 1, 0, 0, 4)}
    for instance in sorted(TARGETS):
        stale = 2 if instance == "worker-1:9090" else 0  # read a moment earlier
        for q, (waiting, active, delayed, dead, oldest) in queue.items():
            for name, value in (
                ("waiting_jobs", waiting - stale),
                ("active_jobs", active),
                ("delayed_jobs", delayed),
                ("dead_jobs", dead),
                ("oldest_wait_seconds", oldest),
            ):
                out.append(_series(f"conveyor_queue_{name}", instance, f"{value}x20", queue=q))
    cpu = {"worker-0:9090": (90, 88), "worker-1:9090": (86, 92), "app-0:8080": (0, 0)}
    memory = {"worker-0:9090": (85, 87), "worker-1:9090": (84, 90), "app-0:8080": (0, 0)}
    for instance in TARGETS:
        slots = 0 if instance.startswith("app") else 16
        out.append(_series("conveyor_worker_concurrency", instance, f"{slots}x20"))
        for pid, c, m in zip(("7", "8"), cpu[instance], memory[instance], strict=True):
            out.append(_series("conveyor_worker_cpu_percent", instance, f"{c}x20", pid=pid))
            out.append(_series("conveyor_worker_memory_percent", instance, f"{m}x20", pid=pid))
        waits = {"worker-0:9090": (2400, 60), "worker-1:9090": (1500, 30)}.get(instance, (0, 0))
        out.append(_series("conveyor_job_wait_seconds_sum", instance, f"0+{waits[0]}x20"))
        out.append(_series("conveyor_job_wait_seconds_count", instance, f"0+{waits[1]}x20"))
        probes = f"0+{300 if instance.startswith('worker') else 100}x20"
        readyz = {"route": "/readyz", "method": "GET", "status": "200"}
        out.append(_series("conveyor_http_requests_total", instance, probes, **readyz))
    webhook = {"route": "/api/v1/webhooks/{flow_id}", "method": "POST"}
    out.append(
        _series("conveyor_http_requests_total", "app-0:8080", "0+98x20", status="200", **webhook)
    )
    out.append(
        _series("conveyor_http_requests_total", "app-0:8080", "0+2x20", status="500", **webhook)
    )
    return out


#: Query -> what it must give over :func:`_cluster_series` (labels -> value); a (low, high)
#: value is checked as low < value < high.
EXPECTED: dict[str, dict[str, Any]] = {
    "keda waitingJobs": {"{}": 160},
    "keda averageWait": {"{}": (43.3, 43.4)},  # 3900 s of waits over 90 jobs
    "dashboard Waiting jobs / {{queue}}": {'{queue="runs"}': 150, '{queue="sync"}': 10},
    "dashboard Waiting jobs / total": {"{}": 160},
    "dashboard Job wait / oldest waiting ({{queue}})": {'{queue="runs"}': 40, '{queue="sync"}': 4},
    "dashboard Job wait / average wait": {"{}": (43.3, 43.4)},
    "dashboard Active, delayed and dead jobs / active {{queue}}": {
        '{queue="runs"}': 8,
        '{queue="sync"}': 1,
    },
    "dashboard Active, delayed and dead jobs / delayed {{queue}}": {
        '{queue="runs"}': 3,
        '{queue="sync"}': 0,
    },
    "dashboard Active, delayed and dead jobs / dead {{queue}}": {
        '{queue="runs"}': 2,
        '{queue="sync"}': 0,
    },
    "dashboard Worker CPU and memory / CPU % (avg)": {"{}": 89},
    "dashboard Worker CPU and memory / memory % (avg)": {"{}": 86.5},
    "dashboard Worker slots / available": {"{}": 32},
    "dashboard API error rate / 5xx share": {"{}": (0.0199, 0.0201)},  # probes left out
}


def test_keda_and_dashboard_queries_over_three_targets(promtool: Path, tmp_path: Path) -> None:
    """The KEDA query and dashboard panels count a backlog once and average workers only."""
    queries = shipped_queries()
    assert set(EXPECTED) <= set(queries), set(EXPECTED) - set(queries)
    expr_tests = []
    for where, expected in EXPECTED.items():
        expr = " ".join(queries[where].split())
        for labels, value in expected.items():
            if isinstance(value, tuple):
                low, high = value
                # A ratio of extrapolated rates is not exact: bracket it (1 = inside).
                bracket = f"(({expr}) > bool {low}) * (({expr}) < bool {high})"
                expr_tests.append({"expr": bracket, "eval_time": "15m",
                                   "exp_samples": [{"labels": labels, "value": 1}]})  # fmt: skip
        exact = {k: v for k, v in expected.items() if not isinstance(v, tuple)}
        if exact:
            samples = [{"labels": k, "value": v} for k, v in exact.items()]
            expr_tests.append({"expr": expr, "eval_time": "15m", "exp_samples": samples})
    suite = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            {"interval": "1m", "input_series": _cluster_series(), "promql_expr_test": expr_tests}
        ],
    }
    (tmp_path / "queries.test.yml").write_text(yaml.safe_dump(suite, sort_keys=False))
    proc = run_promtool(promtool, "test", "rules", "queries.test.yml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------------------- real processes
@pytest.fixture
async def scraped(
    redis: Any, redis_url: str, postgres_url: str
) -> AsyncIterator[dict[str, list[tuple[str, dict[str, str], float]]]]:
    """/metrics of a real APP and a real WORKER (PM2, 2 processes): instance -> samples."""
    app_port, worker_port = free_port(), free_port()
    app_env = conveyor_env(postgres_url, redis_url, AP_CONTAINER_TYPE="APP", AP_PORT=str(app_port))
    worker_env = conveyor_env(
        postgres_url, redis_url,
        AP_CONTAINER_TYPE="WORKER", AP_METRICS_PORT=str(worker_port),
        AP_PM2_ENABLED="true", AP_PM2_INSTANCES="2", AP_WORKER_CONCURRENCY="3",
    )  # fmt: skip
    procs = [await start_conveyor(app_env, app_port)]
    try:
        procs.append(await start_conveyor(worker_env, worker_port))
        out: dict[str, list[tuple[str, dict[str, str], float]]] = {}
        async with aiohttp.ClientSession() as http:
            for instance, port in (("app", app_port), ("worker", worker_port)):

                async def scrape(
                    instance: str = instance, port: int = port
                ) -> list[tuple[str, dict[str, str], float]] | None:
                    async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                        text = await resp.text()
                    samples = [
                        (s.name, dict(s.labels), s.value)
                        for family in text_string_to_metric_families(text)
                        for s in family.samples
                        if s.name.startswith("conveyor_")
                        and not s.name.endswith("_created")
                        and math.isfinite(s.value)
                    ]
                    memory = [v for n, _, v in samples if n == "conveyor_worker_memory_percent"]
                    ready = instance == "app" or (len(memory) == 2 and all(memory))
                    return samples if ready else None

                out[instance] = await eventually(
                    scrape, interval_s=0.1, what=f"{instance} metrics (both PM2 children beat)"
                )
        yield out
    finally:
        for proc in reversed(procs):
            await stop_conveyor(proc)


async def test_real_app_and_worker_export_what_the_rules_assume(
    scraped: dict[str, list[tuple[str, dict[str, str], float]]], promtool: Path, tmp_path: Path
) -> None:
    """Scraped from real processes: the APP reports 0 CPU/memory and no run slots, both report
    the queue gauges, and the rules' aggregations keep the worker processes only."""

    def values(instance: str, name: str) -> list[float]:
        return [v for n, _, v in scraped[instance] if n == name]

    assert values("app", "conveyor_worker_concurrency") == [0]
    # 3 slots per process, summed over the processes that have reported so far
    assert values("worker", "conveyor_worker_concurrency") in ([3], [6])
    assert values("app", "conveyor_worker_memory_percent") == [0]
    memory = values("worker", "conveyor_worker_memory_percent")
    assert len(memory) == 2 and all(m > 0 for m in memory), memory
    for name in ("conveyor_queue_waiting_jobs", "conveyor_queue_dead_jobs"):
        assert len(values("app", name)) == len(values("worker", name)) == 2  # sync, runs

    series = [
        _series(name, instance, f"{value}x10", **labels)
        for instance, samples in scraped.items()
        for name, labels, value in samples
    ]
    rules = {r["alert"]: r["expr"] for r in alerts()}
    memory_side = " ".join(rules["ConveyorWorkerMemoryHigh"].split()).rsplit(" > ", 1)[0]
    waiting_side = " ".join(rules["ConveyorWaitingJobsHigh"].split()).rsplit(" > ", 1)[0]
    kept = memory_side.replace("avg(", "count(", 1)
    waiting = sum(values("worker", "conveyor_queue_waiting_jobs"))
    expr_tests = [
        # every process's series exist: the worker's two and the APP's zero
        {"expr": "count(conveyor_worker_memory_percent)", "eval_time": "5m",
         "exp_samples": [{"labels": "{}", "value": 3}]},
        # the rule keeps exactly the worker's two processes
        {"expr": kept, "eval_time": "5m", "exp_samples": [{"labels": "{}", "value": 2}]},
        {"expr": waiting_side, "eval_time": "5m",
         "exp_samples": [{"labels": "{}", "value": waiting}]},
    ]  # fmt: skip
    suite = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": series, "promql_expr_test": expr_tests}],
    }
    (tmp_path / "scraped.test.yml").write_text(yaml.safe_dump(suite, sort_keys=False))
    proc = run_promtool(promtool, "test", "rules", "scraped.test.yml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
