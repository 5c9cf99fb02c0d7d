"""Webhook benchmark: a real Conveyor process under HTTP load, against a bare aiohttp handler.

Run with no arguments (about 90 s in all). It starts ``python -m conveyor up`` as a subprocess
(``WORKER_AND_APP``, ``AP_WORKER_CONCURRENCY`` from ``--worker-concurrency``) on a loopback port,
with Redis from ``CONVEYOR_TEST_REDIS_URL`` (else 127.0.0.1:6379; DB 14, flushed) and a
throwaway PostgreSQL database created on ``CONVEYOR_TEST_POSTGRES_URL`` (else
postgresql://postgres@127.0.0.1:5432/test) and dropped at the end. In one run it measures

* **bare**: a bare aiohttp + uvloop POST handler (reads the body, answers a fixed 202 JSON) in a
  subprocess — the reference every other figure is compared with;
* **async ingest**: ``POST /api/v1/webhooks/{id}`` answered 202 (run row committed, job added);
  the ``runs`` queue is paused meanwhile so only ingest is measured;
* **sync** ``transform → respond`` and ``transform → code → branch → respond`` (the code step in
  the sandbox): closed-loop saturation (``--concurrency`` clients back to back) for the
  maximum runs/s, then open-loop at a fixed arrival rate (``--rate-small``/``--rate-4step``,
  default half the measured maximum) for p50/p95/p99 latency, counted from each request's
  *scheduled* send time so a slow server cannot hide its queueing (no coordinated omission);
* **drain**: the ``runs`` queue resumed, async runs finished per second for ``--drain-s``.

The load generator is one process, one uvloop loop, keep-alive HTTP/1.1 connections driven by a
minimal ``asyncio.Protocol`` client (a pre-encoded request, responses parsed only as far as the
status and the body length): several times cheaper per request than the aiohttp client, so the
generator saturates later than the servers it measures. Everything — servers, generator,
Redis, PostgreSQL — shares the machine, as it would on a 2-core box. Only loopback is used.

Prints a table and ``ratio: async ingest = P% of bare``; writes JSON to ``--json``
(default ``bench/results/webhooks.json``).
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
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson
import redis.asyncio as aioredis
import uvloop

REPO = Path(__file__).resolve().parent.parent
REDIS_DB = 14
#: Latency clock: uvloop's loop.time() has millisecond resolution only.
clock = time.perf_counter
PAYLOAD = orjson.dumps({"amount": 250, "email": "a@example.com", "items": [1, 2, 3]})

SMALL_FLOW = {
    "name": "bench-transform-respond",
    "trigger": {"type": "webhook"},
    "steps": [
        {"name": "parse", "type": "transform", "input": {"total": "{{trigger.body.amount}}"}},
        {"name": "reply", "type": "respond", "input": {"status": 200, "body": "{{parse}}"}},
    ],
}
FOUR_STEP_FLOW = {
    "name": "bench-four-step",
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
            "code": "def run(input):\n    return {'big': input['total'] > 100}\n",
        },
        {
            "name": "route",
            "type": "branch",
            "when": {"all": [{"left": "{{score.big}}", "op": "is_true"}]},
            "then": [],
            "else": [],
        },
        {"name": "reply", "type": "respond", "input": {"status": 200, "body": "{{score}}"}},
    ],
}
INGEST_FLOW = {
    "name": "bench-async-ingest",
    "trigger": {"type": "webhook"},
    "steps": [
        {"name": "parse", "type": "transform", "input": {"total": "{{trigger.body.amount}}"}}
    ],
}


# ----------------------------------------------------------------------------- HTTP client
class _Conn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; one request in flight at a time."""

    def __init__(self) -> None:
        self.transport: Any = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[int] | None = None
        self.closed = False
        #: The last response's header block, lower-cased (for callers that read a header).
        self.head = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # uvloop's transports are not asyncio.Transport subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection closed"))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buf[:end]).lower()
        start = end + 4
        pos = head.find(b"\r\ncontent-length:")
        if pos >= 0:
            stop = head.find(b"\r\n", pos + 2)
            length = int(head[pos + 17 : stop if stop >= 0 else None])
            total = start + length
            if len(self.buf) < total:
                return
        elif b"transfer-encoding: chunked" in head:
            tail = self.buf.find(b"0\r\n\r\n", start)
            if tail < 0:
                return
            total = tail + 5
        else:
            total = start
        status = int(self.buf[9:12])
        self.head = head
        del self.buf[:total]
        self.waiter = None
        waiter.set_result(status)

    async def request(self, data: bytes) -> int:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return await self.waiter


class Pool:
    """Up to ``limit`` connections to ``port``; requests beyond that wait in FIFO order."""

    def __init__(self, port: int, limit: int) -> None:
        self.port = port
        self.limit = limit
        self.idle: list[_Conn] = []
        self.open = 0
        self.waiting: list[asyncio.Future[_Conn]] = []

    async def acquire(self) -> _Conn:
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed:
                return conn
            self.open -= 1
        if self.open < self.limit:
            self.open += 1
            try:
                _, conn = await asyncio.get_running_loop().create_connection(
                    _Conn, "127.0.0.1", self.port
                )
            except BaseException:
                self.open -= 1
                raise
            sock = conn.transport.get_extra_info("socket") if conn.transport else None
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return conn
        fut: asyncio.Future[_Conn] = asyncio.get_running_loop().create_future()
        self.waiting.append(fut)
        return await fut

    def release(self, conn: _Conn) -> None:
        if conn.closed:
            self.open -= 1
            return
        while self.waiting:
            fut = self.waiting.pop(0)
            if not fut.done():
                fut.set_result(conn)
                return
        self.idle.append(conn)

    def discard(self, conn: _Conn) -> None:
        if conn.transport is not None:
            conn.transport.close()
        conn.closed = True
        self.release(conn)

    def close(self) -> None:
        for conn in self.idle:
            if conn.transport is not None:
                conn.transport.close()
        self.idle.clear()


def build_request(port: int, path: str, body: bytes = PAYLOAD) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


# ----------------------------------------------------------------------------- load phases
@dataclass
class Phase:
    """Figures of one measured phase (latencies in ms)."""

    name: str
    mode: str  # closed (N clients back to back) | open (fixed arrival rate)
    load: str
    duration_s: float = 0.0
    requests: int = 0
    ok: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    rps: float = 0.0
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    #: CPU µs per answered request by part of the system (:class:`CpuMeter`).
    cpu_us_per_ok: dict[str, float] = field(default_factory=dict)


def _finish(phase: Phase, lat: list[float], statuses: Counter[str], ok: set[int]) -> Phase:
    lat.sort()

    def pct(q: float) -> float:
        return round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1000, 2) if lat else 0.0

    phase.requests = sum(statuses.values())
    phase.statuses = dict(statuses)
    phase.ok = sum(n for s, n in statuses.items() if s.isdigit() and int(s) in ok)
    phase.rps = round(phase.ok / phase.duration_s, 1) if phase.duration_s else 0.0
    phase.p50_ms, phase.p95_ms, phase.p99_ms = pct(0.50), pct(0.95), pct(0.99)
    phase.max_ms = round(lat[-1] * 1000, 2) if lat else 0.0
    return phase


async def closed_loop(
    name: str,
    port: int,
    request: bytes,
    *,
    clients: int,
    duration_s: float,
    ok: set[int],
    samples: list[tuple[float, float, int]] | None = None,
    meter: CpuMeter | None = None,
) -> Phase:
    """``clients`` connections, each sending the next request as soon as one is answered.

    ``samples``, if given, gets ``(finish time, latency s, status)`` of every answer (on the
    :data:`clock`), for plots over time and progress lines; ``meter`` gets the phase's CPU."""
    pool = Pool(port, clients)
    lat: list[float] = []
    statuses: Counter[str] = Counter()
    stop_at = 0.0

    async def client() -> None:
        conn = await pool.acquire()
        while clock() < stop_at:
            t = clock()
            try:
                status = await conn.request(request)
            except (ConnectionError, OSError):
                statuses["error"] += 1
                pool.discard(conn)
                conn = await pool.acquire()
                continue
            done = clock()
            lat.append(done - t)
            statuses[str(status)] += 1
            if samples is not None:
                samples.append((done, done - t, status))
        pool.release(conn)

    stop_at = clock() + duration_s
    started = clock()
    if meter is not None:
        meter.start()
    await asyncio.gather(*(client() for _ in range(clients)))
    phase = Phase(name, "closed", f"{clients} clients", duration_s=clock() - started)
    pool.close()
    return _metered(_finish(phase, lat, statuses, ok), meter)


def _cpu_line(cpu: dict[str, float]) -> str:
    parts = [f"{k} {v:,.0f}" for k, v in cpu.items() if k != "total" and v >= 0.5]
    return "  ".join([*parts, f"= {cpu.get('total', 0):,.0f}"])


def _metered(phase: Phase, meter: CpuMeter | None) -> Phase:
    if meter is not None:
        phase.cpu_us_per_ok = meter.stop(phase.ok)
    return phase


async def open_loop(
    name: str,
    port: int,
    request: bytes,
    *,
    rate: float,
    duration_s: float,
    ok: set[int],
    max_conns: int = 1024,
    samples: list[tuple[float, float, int]] | None = None,
    meter: CpuMeter | None = None,
) -> Phase:
    """Requests sent at a fixed arrival rate, whatever the answers do; latency counted from
    each request's scheduled send time. Stragglers get ``duration_s`` more to finish.
    ``samples`` as for :func:`closed_loop`."""
    loop = asyncio.get_running_loop()
    pool = Pool(port, max_conns)
    lat: list[float] = []
    statuses: Counter[str] = Counter()
    tasks: set[asyncio.Task[None]] = set()

    async def one(at: float) -> None:
        conn = await pool.acquire()
        try:
            status = await conn.request(request)
        except (ConnectionError, OSError):
            statuses["error"] += 1
            pool.discard(conn)
            return
        pool.release(conn)
        done = clock()
        lat.append(done - at)
        statuses[str(status)] += 1
        if samples is not None:
            samples.append((done, done - at, status))

    n = int(rate * duration_s)
    if meter is not None:
        meter.start()
    t0 = clock() + 0.01
    i = 0
    while i < n:
        now = clock()
        while i < n and t0 + i / rate <= now:
            task = loop.create_task(one(t0 + i / rate))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
        await asyncio.sleep(max(0.0, min(0.001, t0 + i / rate - clock())))
    if tasks:
        _, late = await asyncio.wait(set(tasks), timeout=duration_s)
        for task in late:
            task.cancel()
            statuses["unfinished"] += 1
    # Throughput over the schedule's own span: the rate actually served.
    phase = Phase(name, "open", f"{rate:,.0f}/s", duration_s=max(clock() - t0, duration_s))
    pool.close()
    return _metered(_finish(phase, lat, statuses, ok), meter)


# ----------------------------------------------------------------------------- CPU meter
_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def _proc_stat(pid: int) -> tuple[str, int, float] | None:
    """(command name, parent pid, CPU seconds used) of a live process, else None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    close = raw.rfind(b")")
    comm = raw[raw.find(b"(") + 1 : close].decode(errors="replace")
    fields = raw[close + 2 :].split()
    return comm, int(fields[1]), (int(fields[11]) + int(fields[12])) * _TICK_S


class CpuMeter:
    """CPU seconds used per part of the system between :meth:`start` and :meth:`stop`:
    ``conveyor`` (the given server pid), ``sandbox`` (its descendants: forkserver and code
    children), ``postgres``, ``redis``, ``client`` (this process) and ``other`` (everything
    else on the machine). Read from /proc, so it counts work, not waiting: divided by the runs
    served it says where a run's CPU goes, and it moves far less than throughput when the
    machine is shared. Processes that end between the readings are not counted."""

    def __init__(self, server_pid: int | None) -> None:
        self.server_pid = server_pid
        self._start: dict[int, tuple[str, float]] = {}

    def _read(self) -> dict[int, tuple[str, float]]:
        stats: dict[int, tuple[str, int, float]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit() and (st := _proc_stat(int(entry))) is not None:
                stats[int(entry)] = st
        out: dict[int, tuple[str, float]] = {}
        me = os.getpid()
        for pid, (comm, ppid, cpu) in stats.items():
            if pid == me:
                part = "client"
            elif pid == self.server_pid:
                part = "conveyor"
            elif comm.startswith(("postgres", "postmaster")):
                part = "postgres"
            elif comm.startswith("redis-server"):
                part = "redis"
            else:
                part = "other"
                parent, seen = ppid, 0
                while parent > 1 and seen < 16:  # a descendant of the server: the sandbox
                    if parent == self.server_pid:
                        part = "sandbox"
                        break
                    parent, seen = stats.get(parent, ("", 0, 0.0))[1], seen + 1
            out[pid] = (part, cpu)
        return out

    def start(self) -> None:
        self._start = self._read()

    def stop(self, runs: int) -> dict[str, float]:
        """CPU microseconds per run by part (and ``total``) since :meth:`start`."""
        used: dict[str, float] = {}
        for pid, (part, cpu) in self._read().items():
            used[part] = used.get(part, 0.0) + cpu - self._start.get(pid, (part, 0.0))[1]
        n = max(1, runs)
        out = {part: round(used[part] * 1e6 / n, 1) for part in sorted(used)}
        out["total"] = round(sum(used.values()) * 1e6 / n, 1)
        return out


# ----------------------------------------------------------------------------- servers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def serve_bare(port: int) -> None:
    """The reference: a bare aiohttp + uvloop POST handler (subprocess entry point)."""
    from aiohttp import web  # noqa: PLC0415

    answer = orjson.dumps({"run_id": "00000000-0000-0000-0000-000000000000", "status": "QUEUED"})

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=answer, status=202, content_type="application/json")

    app = web.Application()
    app.router.add_post("/hook", handle)
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


async def _wait_http(port: int, path: str, proc: subprocess.Popen[bytes], bound_s: float) -> None:
    deadline = time.monotonic() + bound_s
    req = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with contextlib.suppress(OSError, ConnectionError):
            _, conn = await asyncio.get_running_loop().create_connection(_Conn, "127.0.0.1", port)
            status = await asyncio.wait_for(conn.request(req), 2)
            if conn.transport:
                conn.transport.close()
            if status < 500 or path == "/hook":
                return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"server on port {port} not ready after {bound_s} s")


def _spawn(cmd: list[str], env: dict[str, str] | None, out: Any) -> subprocess.Popen[bytes]:
    sink = out if out is not None else subprocess.DEVNULL
    return subprocess.Popen(cmd, env=env, stdout=sink, stderr=sink)


def _stop(proc: subprocess.Popen[bytes], timeout_s: float = 20) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _with_db(url: str, db: int) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{db}"))


def _replace_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


async def _api(port: int, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    import aiohttp  # noqa: PLC0415

    async with (
        aiohttp.ClientSession() as session,
        session.request(method, f"http://127.0.0.1:{port}{path}", json=body) as resp,
    ):
        return resp.status, await resp.json(content_type=None)


async def _create_flow(port: int, doc: dict[str, Any]) -> str:
    status, body = await _api(port, "POST", "/api/v1/flows", doc)
    if status != 201:
        raise RuntimeError(f"creating flow {doc['name']}: {status} {body}")
    return str(body["id"])


# ----------------------------------------------------------------------------- main
async def run(args: argparse.Namespace) -> dict[str, Any]:
    redis_url = _with_db(
        os.environ.get("CONVEYOR_TEST_REDIS_URL") or "redis://127.0.0.1:6379", REDIS_DB
    )
    pg_admin = os.environ.get("CONVEYOR_TEST_POSTGRES_URL") or (
        "postgresql://postgres@127.0.0.1:5432/test"
    )
    for url in (redis_url, pg_admin):
        host = urlsplit(url).hostname or "127.0.0.1"
        if not (host.startswith("127.") or host in ("localhost", "::1")):
            raise SystemExit(f"refusing a non-loopback server: {url}")
    dbname = f"conveyor_bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(pg_admin)
    await admin.execute(f'CREATE DATABASE "{dbname}"')
    await admin.close()
    pg_url = _replace_database(pg_admin, dbname)
    r = aioredis.Redis.from_url(redis_url)
    await r.flushdb()

    workdir = Path(tempfile.mkdtemp(prefix="conveyor-bench-"))
    port, bare_port = _free_port(), _free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("AP_") and not k.startswith("CONVEYOR_")
    }
    env.update(
        AP_CONTAINER_TYPE="WORKER_AND_APP",
        AP_WORKER_CONCURRENCY=str(args.worker_concurrency),
        AP_HOST="127.0.0.1",
        AP_PORT=str(port),
        AP_REDIS_URL=redis_url,
        AP_POSTGRES_URL=pg_url,
        AP_ENCRYPTION_KEY=secrets.token_hex(32),
        AP_CONFIG_PATH=str(workdir / "config"),
        AP_LOG_LEVEL="warning",
        AP_QUEUE_MAX_LENGTH="2000000",
        AP_WEBHOOK_TIMEOUT_SECONDS="10",
        PYTHONPATH=str(REPO),
    )
    log_path = workdir / "conveyor.log"
    log_file = log_path.open("wb")
    conveyor = _spawn([sys.executable, "-m", "conveyor", "up"], env, log_file)
    bare = _spawn([sys.executable, __file__, "--serve-bare", str(bare_port)], None, None)
    phases: list[Phase] = []
    load_before = os.getloadavg()
    ok_ingest = {202}
    ok_sync = {200}
    try:
        await _wait_http(port, "/readyz", conveyor, 60)
        await _wait_http(bare_port, "/hook", bare, 30)
        small = await _create_flow(port, SMALL_FLOW)
        four = await _create_flow(port, FOUR_STEP_FLOW)
        ingest = await _create_flow(port, INGEST_FLOW)
        c, d, w = args.concurrency, args.duration, args.warmup

        def show(phase: Phase) -> Phase:
            print(
                f"  {phase.name:<24} {phase.load:>12}  {phase.rps:>9,.0f}/s  "
                f"p50 {phase.p50_ms:7.2f}  p95 {phase.p95_ms:7.2f}  p99 {phase.p99_ms:7.2f} ms"
                f"  {phase.statuses}",
                flush=True,
            )
            if phase.cpu_us_per_ok:
                print(f"      CPU µs/run: {_cpu_line(phase.cpu_us_per_ok)}", flush=True)
            phases.append(phase)
            return phase

        # (c) the reference first, on an idle Conveyor.
        bare_req = build_request(bare_port, "/hook")
        await closed_loop("warmup", bare_port, bare_req, clients=c, duration_s=w, ok={202})
        ref = show(
            await closed_loop(
                "bare aiohttp handler",
                bare_port,
                bare_req,
                clients=c,
                duration_s=d,
                ok={202},
                meter=CpuMeter(bare.pid),
            )
        )
        _stop(bare)

        # (a) async ingest, with the runs queue paused so the worker does not compete.
        await _api(port, "POST", "/api/v1/queues/runs/pause")
        ingest_req = build_request(port, f"/api/v1/webhooks/{ingest}")
        await closed_loop("warmup", port, ingest_req, clients=c, duration_s=w, ok=ok_ingest)
        meter = CpuMeter(conveyor.pid)
        ing = show(
            await closed_loop(
                "async ingest (202)",
                port,
                ingest_req,
                clients=c,
                duration_s=d,
                ok=ok_ingest,
                meter=meter,
            )
        )

        # (b) sync end to end: saturation, then a fixed arrival rate.
        results: dict[str, Any] = {}
        for label, fid, rate in (
            ("sync transform+respond", small, args.rate_small),
            ("sync 4-step", four, args.rate_4step),
        ):
            req = build_request(port, f"/api/v1/webhooks/{fid}/sync")
            await closed_loop("warmup", port, req, clients=c, duration_s=w, ok=ok_sync)
            sat = show(
                await closed_loop(
                    f"{label} max", port, req, clients=c, duration_s=d, ok=ok_sync, meter=meter
                )
            )
            target = rate or max(10.0, round(sat.rps * 0.5, -1))
            show(
                await open_loop(
                    f"{label} @rate", port, req, rate=target, duration_s=d, ok=ok_sync, meter=meter
                )
            )
            results[label] = target

        # Async runs end to end: resume the queue, count finished runs for a while.
        conn = await asyncpg.connect(pg_url)
        try:
            count_sql = "SELECT count(*) FROM runs WHERE flow_id = $1 AND status = ANY($2::text[])"
            terminal = ["SUCCEEDED", "FAILED", "TIMEOUT", "INTERNAL_ERROR", "CANCELED"]
            before = await conn.fetchval(count_sql, uuid.UUID(ingest), terminal)
            await _api(port, "POST", "/api/v1/queues/runs/resume")
            t = time.monotonic()
            meter.start()
            await asyncio.sleep(args.drain_s)
            after = await conn.fetchval(count_sql, uuid.UUID(ingest), terminal)
            span = time.monotonic() - t
            await _api(port, "POST", "/api/v1/queues/runs/pause")
            drain = Phase("async runs drained", "drain", f"{args.drain_s:.0f} s", span)
            drain.ok = drain.requests = int(after - before)
            drain.rps = round(drain.ok / span, 1)
            show(_metered(drain, meter))
            by_status = await conn.fetch(
                "SELECT f.name, r.status, count(*) AS n FROM runs r JOIN flows f ON f.id = "
                "r.flow_id GROUP BY 1, 2 ORDER BY 1, 2"
            )
        finally:
            await conn.close()
        runs = {f"{row['name']} {row['status']}": row["n"] for row in by_status}
    except BaseException:
        log_file.flush()
        print(log_path.read_text()[-4000:], file=sys.stderr)
        raise
    finally:
        _stop(bare)
        _stop(conveyor)
        log_file.close()
        await r.flushdb()
        await r.aclose()
        admin = await asyncpg.connect(pg_admin)
        await admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        await admin.close()
        shutil.rmtree(workdir, ignore_errors=True)
    ratio = ing.rps / ref.rps if ref.rps else 0.0
    return {
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
        "config": {
            "concurrency": args.concurrency,
            "duration_s": args.duration,
            "worker_concurrency": args.worker_concurrency,
            "open_loop_rates": results,
            "client": "asyncio.Protocol keep-alive HTTP/1.1, one process, uvloop",
        },
        "phases": [asdict(p) for p in phases],
        "runs_by_flow_and_status": runs,
        "ratio_async_ingest_to_bare": round(ratio, 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=64, help="closed-loop clients")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per phase")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up")
    parser.add_argument("--worker-concurrency", type=int, default=32)
    parser.add_argument("--rate-small", type=float, default=0.0, help="0: half the max")
    parser.add_argument("--rate-4step", type=float, default=0.0, help="0: half the max")
    parser.add_argument("--drain-s", type=float, default=8.0)
    parser.add_argument("--json", default=str(REPO / "bench" / "results" / "webhooks.json"))
    parser.add_argument("--serve-bare", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_bare:
        serve_bare(args.serve_bare)
        return 0
    uvloop.install()
    started = time.monotonic()
    print(
        f"conveyor webhooks bench: {args.concurrency} clients, {args.duration:.0f} s per phase, "
        f"AP_WORKER_CONCURRENCY={args.worker_concurrency}",
        flush=True,
    )
    result = asyncio.run(run(args))
    result["total_s"] = round(time.monotonic() - started, 1)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    tmp.replace(out)
    print()
    print("| phase | load | ok/s | p50 ms | p95 ms | p99 ms | answers |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for p in result["phases"]:
        answers = ", ".join(f"{k}: {v:,}" for k, v in sorted(p["statuses"].items()))
        print(
            f"| {p['name']} | {p['load']} | {p['rps']:,.0f} | {p['p50_ms']:.2f} | "
            f"{p['p95_ms']:.2f} | {p['p99_ms']:.2f} | {answers} |"
        )
    print(f"\nruns: {result['runs_by_flow_and_status']}")
    print(f"total {result['total_s']} s; JSON in {out}")
    print(f"ratio: async ingest = {result['ratio_async_ingest_to_bare'] * 100:.0f}% of bare")
    return 0


if __name__ == "__main__":
    sys.exit(main())
