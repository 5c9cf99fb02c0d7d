"""Prometheus metrics and the scaling rules evaluated over them.

Metric names are the contract: ``conveyor_queue_*`` gauges are refreshed from the queue's own
stats when ``/metrics`` is scraped (at most every :data:`REFRESH_EVERY_S`), per-process gauges
(busy slots, pool sizes) every few seconds by :mod:`conveyor.app`; histograms and counters are
observed where things happen — :func:`observe_run` and :func:`observe_step` by the worker, the
HTTP middleware for every request (and for webhook rejections, by status).

With ``PROMETHEUS_MULTIPROC_DIR`` set (PM2 mode sets it before forking), prometheus-client keeps
each process's values in files there and ``/metrics`` merges every process's through a
``MultiProcessCollector``; gauges declare how (``livesum`` for per-process capacity,
``mostrecent`` for values every process reads from the same source).

:func:`evaluate_scaling` holds the seed's thresholds; ``GET /api/v1/scaling``, the board's
banners and ``configs/prometheus/alerts.yml`` say the same thing.

This module is a leaf (it imports no other ``conveyor`` module): anything may record into it,
and the HTTP side (``/metrics`` in :mod:`conveyor.api.health`) hands it the readings.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import math
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as prom_mp
from prometheus_client import values as prom_values

log = structlog.get_logger(__name__)

#: Queue gauges are re-read from Redis at most this often, however often Prometheus scrapes.
REFRESH_EVERY_S = 2.0
#: Per-process gauges are written this often (in multiprocess mode another process may serve
#: the scrape, so each process keeps its own values fresh).
PROCESS_REFRESH_S = 5.0
#: The API latency and error-rate rules look at requests of this many recent seconds.
API_WINDOW_S = 60.0

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_RUN_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0)

# --------------------------------------------------------------------------- tallies
#: Whether the hot histograms and counters are tallied in plain numbers and set into their
#: metric objects when the registry is read. Single-process mode only: with
#: ``PROMETHEUS_MULTIPROC_DIR`` another process reads this one's values from its files, so
#: they are written as they happen.
TALLIED = prom_values.ValueClass is prom_values.MutexValue


class HistogramTally:
    """The observations of one histogram child, kept here and set into it by :func:`fold`.

    A child's ``observe()`` takes a lock for its sum and one for its bucket and walks the
    buckets in Python; here it is one ``bisect`` and two additions. The tally starts from
    the child's values and adds in the same order, so the folded values are exactly those
    ``observe()`` would have left. Every observation of a tallied child must come through
    its tally (:func:`tally` hands out one per child), from the event loop's thread.
    """

    __slots__ = ("bounds", "child", "counts", "sum")

    def __init__(self, child: Any) -> None:
        self.child = child
        self.bounds = tuple(child._upper_bounds)
        self.counts = [value.get() for value in child._buckets]
        self.sum = child._sum.get()

    def observe(self, amount: float) -> None:
        # The first bucket whose bound is >= amount (observe()'s "amount <= bound").
        self.counts[bisect.bisect_left(self.bounds, amount)] += 1
        self.sum += amount

    def fold(self) -> None:
        child = self.child
        child._sum.set(self.sum)
        for value, count in zip(child._buckets, self.counts, strict=True):
            value.set(count)


class CounterTally:
    """The increments of one counter child, set into it by :func:`fold` (see
    :class:`HistogramTally`)."""

    __slots__ = ("child", "value")

    def __init__(self, child: Any) -> None:
        self.child = child
        self.value = child._value.get()

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self.value += amount

    def fold(self) -> None:
        self.child._value.set(self.value)


#: Every tally, by its metric child (one each: two tallies of one child would overwrite
#: each other's counts).
_TALLIES: dict[int, HistogramTally | CounterTally] = {}


def tally(child: Any) -> Any:
    """What to record ``child``'s observations through: its tally when :data:`TALLIED`,
    else the child itself (both have its ``observe``/``inc``). A child of a histogram or a
    counter; the same tally for the same child every time."""
    if not TALLIED:
        return child
    found = _TALLIES.get(id(child))
    if found is None or found.child is not child:
        found = HistogramTally(child) if hasattr(child, "_upper_bounds") else CounterTally(child)
        _TALLIES[id(child)] = found
    return found


def fold() -> None:
    """Set every tally's values into its metric child (before anything reads them)."""
    for found in list(_TALLIES.values()):
        found.fold()


class _Folder:
    """A collector that yields nothing and folds the tallies: registered before the
    metrics below, so every read of the default registry (``/metrics``, tests'
    ``get_sample_value``) sees values folded just before."""

    def collect(self) -> Iterable[Any]:
        fold()
        return ()

    def describe(self) -> Iterable[Any]:
        return ()


REGISTRY.register(_Folder())


QUEUE_WAITING = Gauge(
    "conveyor_queue_waiting_jobs",
    "Jobs not yet delivered",
    ["queue"],
    multiprocess_mode="mostrecent",
)
QUEUE_ACTIVE = Gauge(
    "conveyor_queue_active_jobs", "Jobs being worked on", ["queue"], multiprocess_mode="mostrecent"
)
QUEUE_DELAYED = Gauge(
    "conveyor_queue_delayed_jobs",
    "Jobs in the delayed set",
    ["queue"],
    multiprocess_mode="mostrecent",
)
QUEUE_DEAD = Gauge(
    "conveyor_queue_dead_jobs", "Dead-lettered jobs kept", ["queue"], multiprocess_mode="mostrecent"
)
QUEUE_OLDEST_WAIT = Gauge(
    "conveyor_queue_oldest_wait_seconds",
    "Age of the oldest waiting job",
    ["queue"],
    multiprocess_mode="mostrecent",
)
JOB_WAIT = Histogram(
    "conveyor_job_wait_seconds", "Enqueue to start of execution", buckets=_RUN_BUCKETS
)
RUN_DURATION = Histogram(
    "conveyor_flow_run_duration_seconds", "Execution time of a flow run", buckets=_RUN_BUCKETS
)
STEP_DURATION = Histogram(
    "conveyor_step_duration_seconds", "Execution time of a step", ["type"], buckets=_RUN_BUCKETS
)
HTTP_DURATION = Histogram(
    "conveyor_http_request_duration_seconds",
    "HTTP request latency",
    ["route", "method"],
    buckets=_LATENCY_BUCKETS,
)
RUNS_TOTAL = Counter("conveyor_flow_runs", "Flow runs finished, by status", ["status"])
HTTP_TOTAL = Counter(
    "conveyor_http_requests", "HTTP requests answered", ["route", "method", "status"]
)
WEBHOOKS_REJECTED = Counter("conveyor_webhooks_rejected", "Webhooks refused, by reason", ["reason"])
BACKEND_ERRORS = Counter(
    "conveyor_backend_errors",
    "Failed Redis/PostgreSQL calls of background loops (retried with backoff)",
    ["backend", "op"],
)
WORKER_BUSY = Gauge("conveyor_worker_busy_slots", "Run slots in use", multiprocess_mode="livesum")
WORKER_CONCURRENCY = Gauge(
    "conveyor_worker_concurrency", "Run slots available", multiprocess_mode="livesum"
)
WORKER_CPU = Gauge(
    "conveyor_worker_cpu_percent",
    "CPU use of this worker process at its last heartbeat (100 = one core)",
    multiprocess_mode="liveall",
)
WORKER_MEMORY = Gauge(
    "conveyor_worker_memory_percent",
    "RSS of this worker process against its memory limit, at its last heartbeat",
    multiprocess_mode="liveall",
)
DB_POOL_SIZE = Gauge(
    "conveyor_db_pool_size", "Open connections in this process's pool", multiprocess_mode="livesum"
)
DB_POOL_IN_USE = Gauge(
    "conveyor_db_pool_in_use", "Pool connections checked out", multiprocess_mode="livesum"
)
DB_ACTIVE = Gauge(
    "conveyor_db_connections_active",
    "Connections open on the PostgreSQL server",
    multiprocess_mode="mostrecent",
)
DB_MAX = Gauge(
    "conveyor_db_max_connections", "PostgreSQL max_connections", multiprocess_mode="mostrecent"
)
SANDBOX_READY = Gauge(
    "conveyor_sandbox_ready",
    "1 while this worker's sandbox can start step processes (fork-server up, uids left)",
    multiprocess_mode="liveall",
)
SANDBOX_FREE_UIDS = Gauge(
    "conveyor_sandbox_free_uids",
    "Per-child uids left in this worker's sandbox pool (root only)",
    multiprocess_mode="liveall",
)
SANDBOX_EVENTS = Counter(
    "conveyor_sandbox_events",
    "Sandbox events: step timeouts, spawns refused for lack of capacity",
    ["event"],
)
_SANDBOX_SEEN: dict[str, int] = {}

#: Webhook answers counted as rejections, by status.
REJECT_REASONS = {
    401: "signature",
    404: "flow_not_found",
    413: "payload_too_large",
    429: "queue_full",
    503: "unavailable",
}
UNTIMED_PREFIXES = ("/metrics", "/healthz", "/readyz", "/admin/static/")
_TERMINAL_STATUSES = frozenset(
    {"SUCCEEDED", "FAILED", "TIMEOUT", "INTERNAL_ERROR", "CANCELED", "MEMORY_LIMIT_EXCEEDED"}
)


# --------------------------------------------------------------------------- observations
_JOB_WAIT = tally(JOB_WAIT)
_RUN_DURATION = tally(RUN_DURATION)


def job_started(enqueued_ms: int) -> float:
    """A worker starts a job whose stream entry was added at ``enqueued_ms``: observe its
    wait; returns the start time (``time.time()``) for :func:`observe_run`."""
    now = time.time()
    _JOB_WAIT.observe(max(0.0, now - enqueued_ms / 1000))
    return now


#: Labelled children (their tallies) looked up once per label value: ``labels()`` costs
#: more than the observation itself, and runs and steps are counted on every run (step
#: types and statuses are few; the caches are bounded all the same).
_RUN_COUNTERS: dict[str, Any] = {}
_STEP_TIMERS: dict[str, Any] = {}
_CHILD_CACHE_MAX = 1000


def _child(cache: dict[str, Any], metric: Any, label: str) -> Any:
    child = cache.get(label)
    if child is None:
        child = tally(metric.labels(label))
        if len(cache) < _CHILD_CACHE_MAX:
            cache[label] = child
    return child


def observe_run(status: str, started_s: float | None = None) -> None:
    """A run ended (or paused): count terminal statuses, time it from ``started_s``."""
    if status in _TERMINAL_STATUSES:
        _child(_RUN_COUNTERS, RUNS_TOTAL, status).inc()
    if started_s is not None:
        _RUN_DURATION.observe(max(0.0, time.time() - started_s))


def observe_step(step_type: str, duration_ms: float | None) -> None:
    """A step finished after ``duration_ms``."""
    if duration_ms is not None:
        _child(_STEP_TIMERS, STEP_DURATION, step_type).observe(max(0.0, float(duration_ms)) / 1000)


def webhook_rejected(reason: str) -> None:
    WEBHOOKS_REJECTED.labels(reason).inc()


@dataclass
class _Window:
    """Recent request timings of this process, for the API rules of the scaling advice."""

    samples: deque[tuple[float, float, bool]] = field(default_factory=lambda: deque(maxlen=20_000))

    def add(self, duration_s: float, error: bool) -> None:
        self.samples.append((time.monotonic(), duration_s, error))

    def summary(self, window_s: float = API_WINDOW_S) -> dict[str, float]:
        """``{requests, p95_ms, error_rate_percent}`` over the last ``window_s`` seconds."""
        cutoff = time.monotonic() - window_s
        recent = [(d, e) for t, d, e in self.samples if t >= cutoff]
        if not recent:
            return {"requests": 0, "p95_ms": 0.0, "error_rate_percent": 0.0}
        durations = sorted(d for d, _ in recent)
        p95 = durations[min(len(durations) - 1, math.ceil(0.95 * len(durations)) - 1)]
        errors = sum(1 for _, e in recent if e)
        return {
            "requests": len(recent),
            "p95_ms": round(p95 * 1000, 1),
            "error_rate_percent": round(100.0 * errors / len(recent), 2),
        }


API_WINDOW = _Window()


# --------------------------------------------------------------------------- refresh
@dataclass
class RefreshState:
    """When the queue gauges were last read (a scrape reads them at most every
    :data:`REFRESH_EVERY_S`), and the lock that keeps concurrent scrapes to one reading."""

    queues_at: float = 0.0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def due(self) -> bool:
        return time.monotonic() - self.queues_at >= REFRESH_EVERY_S


def set_queue_gauges(stats: Iterable[Any], db_active: int, db_max: int) -> None:
    """Set the queue gauges from ``QueueAdmin.all_stats()`` and the server-wide DB gauges."""
    for st in stats:
        QUEUE_WAITING.labels(st.queue).set(st.waiting)
        QUEUE_ACTIVE.labels(st.queue).set(st.active)
        QUEUE_DELAYED.labels(st.queue).set(st.delayed)
        QUEUE_DEAD.labels(st.queue).set(st.dead)
        QUEUE_OLDEST_WAIT.labels(st.queue).set(st.oldest_wait_s)
    DB_ACTIVE.set(db_active)
    DB_MAX.set(db_max)


def set_process_gauges(
    consumer: Any, sandbox: Mapping[str, Any] | None, pool: Mapping[str, int] | None
) -> None:
    """Set this process's gauges: worker slots, sandbox report, connection pool."""
    if consumer is not None:
        WORKER_BUSY.set(int(consumer.busy))
        WORKER_CONCURRENCY.set(int(consumer.concurrency))
    if sandbox:
        SANDBOX_READY.set(1 if sandbox.get("ok") else 0)
        SANDBOX_FREE_UIDS.set(int(sandbox.get("free_uids", 0)))
        for event, key in (("timeout", "timeouts"), ("capacity_exhausted", "capacity_exhausted")):
            total = int(sandbox.get(key, 0))
            if total > _SANDBOX_SEEN.get(event, 0):
                SANDBOX_EVENTS.labels(event).inc(total - _SANDBOX_SEEN.get(event, 0))
            _SANDBOX_SEEN[event] = total
    if pool is not None:
        DB_POOL_SIZE.set(pool["size"])
        DB_POOL_IN_USE.set(pool["in_use"])


def registry() -> CollectorRegistry:
    """What ``/metrics`` exposes: every process's values in multiprocess mode, else ours."""
    merged = CollectorRegistry()
    try:
        prom_mp.MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
    except ValueError:  # PROMETHEUS_MULTIPROC_DIR not set: single-process mode
        return REGISTRY
    return merged


#: ``Content-Type`` of :func:`exposition`.
CONTENT_TYPE = CONTENT_TYPE_LATEST


def exposition() -> bytes:
    """The text ``/metrics`` answers with."""
    return generate_latest(registry())


def mark_process_dead(pid: int) -> None:
    """For a supervisor: drop the ``live*`` gauge values of a child that exited."""
    with contextlib.suppress(ValueError, KeyError):
        prom_mp.mark_process_dead(pid)  # type: ignore[no-untyped-call]


# --------------------------------------------------------------------------- scaling rules
@dataclass(frozen=True, slots=True)
class Rule:
    """One scaling threshold of the seed."""

    rule: str
    label: str
    threshold: float
    unit: str
    recommendation: str


RULES: tuple[Rule, ...] = (
    Rule("waiting_jobs", "Waiting jobs", 100, "", "add workers"),
    Rule("average_wait_seconds", "Average wait", 30, " s", "add workers"),
    Rule("worker_cpu_percent", "Worker CPU", 80, " %", "add workers"),
    Rule("worker_memory_percent", "Worker memory", 80, " %", "add workers"),
    Rule("api_p95_latency_ms", "API p95 latency", 500, " ms", "add APP replicas"),
    Rule("api_error_rate_percent", "API error rate", 1, " %", "add APP replicas"),
    Rule(
        "db_connections_percent",
        "DB active connections",
        80,
        " % of max",
        "raise max_connections, AP_POSTGRES_POOL_SIZE or put PgBouncer in front",
    ),
)


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"


def evaluate_scaling(values: dict[str, float | None]) -> list[dict[str, Any]]:
    """Each rule with its current ``value`` (``None`` = nothing to measure), ``threshold``,
    ``breached`` and ``recommendation``, plus a one-line ``message`` for banners."""
    out = []
    for r in RULES:
        value = values.get(r.rule)
        breached = value is not None and value > r.threshold
        shown = "n/a" if value is None else _fmt(value) + r.unit
        op = ">" if breached else "≤"
        message = f"{r.label} {shown} {op} {_fmt(r.threshold)}{r.unit}"
        out.append(
            {
                "rule": r.rule,
                "value": value,
                "threshold": r.threshold,
                "breached": breached,
                "recommendation": r.recommendation if breached else "no action needed",
                "message": f"{message}: {r.recommendation}" if breached else message,
            }
        )
    return out


def scaling_inputs(
    queues: Sequence[Any],
    workers: Sequence[dict[str, Any]],
    api: dict[str, float],
    db: tuple[int, int] | None,
) -> dict[str, float | None]:
    """Rule values from queue stats, live workers' heartbeats, this process's request window
    and the database's connection counts."""
    live = [w for w in workers if not w.get("lost")]

    def avg(name: str) -> float | None:
        vals = [float(w[name]) for w in live if isinstance(w.get(name), int | float)]
        return round(sum(vals) / len(vals), 1) if vals else None

    return {
        "waiting_jobs": float(sum(q.waiting for q in queues)),
        "average_wait_seconds": round(max((q.avg_wait_s for q in queues), default=0.0), 2),
        "worker_cpu_percent": avg("cpu_percent"),
        "worker_memory_percent": avg("memory_percent"),
        "api_p95_latency_ms": api["p95_ms"] if api["requests"] else None,
        "api_error_rate_percent": api["error_rate_percent"] if api["requests"] else None,
        "db_connections_percent": round(100.0 * db[0] / db[1], 1) if db and db[1] else None,
    }
