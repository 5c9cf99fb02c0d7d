"""Every performance target of issue 13 in one run: Conveyor, its references and its peers.

``python bench/run_all.py`` (``--quick`` for a smoke run of a minute or two, ``--peers`` to
install and measure n8n and BullMQ too). One run, one machine, so the ratios compare:

1. **async ingest** — ``POST /api/v1/webhooks/{id}`` answered 202 by one ``WORKER_AND_APP``
   (the ``runs`` queue paused) against the **bare** aiohttp + uvloop handler (one process,
   same client, same request): target ≥ 50 % of bare;
2. **async drain** — the ``runs`` queue resumed: ``transform → respond`` runs finished per
   second by that process (backlog from 1.): ≥ 20 % of bare;
3. **sync** ``transform → respond`` max ≥ 12 % of bare; **sync 4-step** (``transform → code →
   branch → respond``, the code step in the sandbox) max ≥ 8 % of bare and ≥ 20× **n8n** on
   the same flow (``bench/peers/n8n-four-step.json``, regular mode, SQLite); p95 ≤ 25 ms at
   half of each flow's max rate (open loop, latency from the scheduled send time);
4. **queue** — N no-op jobs through Conveyor's ``Consumer`` (concurrency C) against **BullMQ**
   (one ``Worker``, concurrency C, ``bench/peers/bullmq_bench.mjs``) ≥ 5×, and against the
   **raw** ``XREADGROUP COUNT C`` + ``XACK`` loop ≥ 60 % (``bench/queue.py``'s phases);
5. **memory and completeness** — idle ``WORKER_AND_APP`` RSS ≤ 120 MB; a sustained run at
   half load (``--soak-s``, default 600 s; a fresh process; ``--soak-connections``, 128,
   keep-alive connections, all open before the first sample): RSS and Redis ``used_memory``
   flat, and every accepted run terminal exactly once (``bench/soak.py``'s check).

It starts a private ``redis-server`` (``--save ""``, no AOF) on a free loopback port in a temp
directory unless ``--redis-url`` is given, a throwaway ``conveyor_bench_*`` database on
``--postgres-url`` (else ``CONVEYOR_TEST_POSTGRES_URL``, else
postgresql://postgres@127.0.0.1:5432/test) dropped at the end, and every server on
127.0.0.1. ``--peers`` installs the pinned n8n and BullMQ of ``bench/peers/package.json`` with
npm once into ``$XDG_CACHE_HOME/conveyor/bench-peers`` (else ``~/.cache/...``) and reuses
it; without npm/node, or without ``--peers`` and no cached install, the peers are skipped with
a message. Prints one table (figure, reference, ratio, target, met) and the machine; writes
``bench/results/run_all.json`` and PNG plots (throughput and latency over time per phase;
needs matplotlib, ``pip install -e .[bench]``, else skipped with a message); ``--readme``
replaces the table and plots in ``bench/README.md``.
"""

# ruff: noqa: E402
from __future__ import annotations

import sys
from pathlib import Path

# bench/queue.py would shadow the standard library's ``queue`` (redis-py imports it) if this
# directory stayed first on sys.path: use the repository instead.
_BENCH_DIR = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH_DIR]
sys.path.insert(0, str(_BENCH_DIR.parent))

import argparse
import asyncio
import contextlib
import importlib.util
import itertools
import os
import platform
import re
import secrets
import shutil
import subprocess
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson
import psutil
import redis.asyncio as aioredis
import uvloop

from conveyor.queue import keys as qkeys

REPO = _BENCH_DIR.parent
PEERS_DIR = _BENCH_DIR / "peers"
RESULTS = _BENCH_DIR / "results"
README = _BENCH_DIR / "README.md"
README_BEGIN = "<!-- run_all:begin (written by bench/run_all.py --readme) -->"
README_END = "<!-- run_all:end -->"
DB = 14
TERMINAL = ["SUCCEEDED", "FAILED", "TIMEOUT", "INTERNAL_ERROR", "CANCELED", "MEMORY_LIMIT_EXCEEDED"]
TTY = sys.stderr.isatty()


def _load(name: str, file: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, _BENCH_DIR / file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


wh = _load("bench_webhooks", "webhooks.py")
qb = _load("bench_queue", "queue.py")
soak = _load("bench_soak", "soak.py")
clock = wh.clock


# ----------------------------------------------------------------------------- progress
@contextlib.asynccontextmanager
async def progress(label: str, total_s: float, status: Callable[[], str]) -> AsyncIterator[None]:
    """A one-line progress bar on stderr while the block runs (every 5 s when not a tty)."""
    start = time.monotonic()

    def draw(final: bool = False) -> None:
        done = time.monotonic() - start
        frac = min(1.0, done / total_s) if total_s > 0 else 1.0
        bar = "#" * int(frac * 20) + "-" * (20 - int(frac * 20))
        line = f"  .. {label:<34} [{bar}] {done:6.1f}/{total_s:.0f} s  {status()}"
        if TTY:
            sys.stderr.write("\r" + line[:150].ljust(150) + ("\n" if final else ""))
        elif not final:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    async def tick() -> None:
        while True:
            await asyncio.sleep(0.25 if TTY else 5.0)
            draw()

    task = asyncio.ensure_future(tick())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if TTY:
            draw(final=True)


# ----------------------------------------------------------------------------- series
def bins(
    samples: list[tuple[float, float, int]], t0: float, ok: set[int], width: float
) -> list[dict[str, float]]:
    """Answers per ``width`` seconds: ok/s, p50 and p95 latency (ms) of each bin."""
    if not samples:
        return []
    by: dict[int, list[float]] = {}
    for t, lat, status in samples:
        if status in ok:
            by.setdefault(int((t - t0) / width), []).append(lat)
    out = []
    for i in range(max(by) + 1 if by else 0):
        lats = sorted(by.get(i, []))

        def pct(q: float, la: list[float] = lats) -> float:
            return la[min(len(la) - 1, int(q * len(la)))] * 1000 if la else 0.0

        out.append(
            {
                "t": round((i + 0.5) * width, 3),
                "ok_per_s": round(len(lats) / width, 1),
                "p50_ms": round(pct(0.5), 2),
                "p95_ms": round(pct(0.95), 2),
            }
        )
    return out


def _bin_width(duration_s: float) -> float:
    return 0.25 if duration_s <= 5 else 0.5 if duration_s <= 30 else max(1.0, duration_s / 120)


# ----------------------------------------------------------------------------- services
def _loopback(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return
    host = parts.hostname or "127.0.0.1"
    if not (host.startswith("127.") or host in ("localhost", "::1")):
        raise SystemExit(f"refusing a non-loopback server: {url}")


def _with_db(url: str, db: int) -> str:
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return urlunsplit(parts._replace(query=f"db={db}"))
    return urlunsplit(parts._replace(path=f"/{db}"))


def start_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A private redis-server on a free loopback port, no persistence, in ``workdir``."""
    port = wh._free_port()
    directory = workdir / "redis"
    directory.mkdir()
    popen = subprocess.Popen(
        [
            soak._redis_binary(), "--port", str(port), "--bind", "127.0.0.1",
            "--dir", str(directory), "--save", "", "--appendonly", "no",
            "--daemonize", "no", "--protected-mode", "yes",
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    return popen, f"redis://127.0.0.1:{port}/0"


def _cmd(cmd: list[str], timeout: float = 10) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        return (out.stdout or out.stderr).strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def machine() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import aiohttp  # noqa: PLC0415

    return {
        "cpu": cpu or platform.processor(),
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "uvloop": uvloop.__version__,
        "commit": _commit(),
    }


def _commit() -> str:
    """The commit measured, flagged when conveyor/ has uncommitted changes (then the figures
    are of the working tree, not of the commit alone)."""
    if not (REPO / ".git").exists():
        return os.environ.get("CONVEYOR_BENCH_COMMIT", "unknown (not a git checkout)")
    commit = _cmd(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = _cmd(["git", "-C", str(REPO), "status", "--porcelain", "--", "conveyor"])
    return commit + (" + uncommitted changes in conveyor/" if dirty else "")


def rss(pid: int) -> dict[str, float]:
    """Own RSS, and RSS and PSS of the process with its descendants (MB); 0 if gone."""
    mb = 2**20
    try:
        proc = psutil.Process(pid)
        own = proc.memory_info().rss
        tree_rss = own
        tree_pss = getattr(proc.memory_full_info(), "pss", own)
        for child in proc.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                tree_rss += child.memory_info().rss
                tree_pss += getattr(child.memory_full_info(), "pss", 0)
    except psutil.Error:
        return {"rss_mb": 0.0, "tree_rss_mb": 0.0, "tree_pss_mb": 0.0}
    return {
        "rss_mb": round(own / mb, 1),
        "tree_rss_mb": round(tree_rss / mb, 1),
        "tree_pss_mb": round(tree_pss / mb, 1),
    }


class Conveyor:
    """One ``python -m conveyor up`` (``WORKER_AND_APP``) on a loopback port."""

    def __init__(self, workdir: Path, redis_url: str, pg_url: str, args: argparse.Namespace):
        self.port = wh._free_port()
        self.env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("AP_") and not k.startswith("CONVEYOR_")
        }
        self.env.update(
            AP_CONTAINER_TYPE="WORKER_AND_APP",
            AP_WORKER_CONCURRENCY=str(args.worker_concurrency),
            AP_HOST="127.0.0.1",
            AP_PORT=str(self.port),
            AP_REDIS_URL=redis_url,
            AP_POSTGRES_URL=pg_url,
            AP_ENCRYPTION_KEY=secrets.token_hex(32),
            AP_CONFIG_PATH=str(workdir / "config"),
            AP_LOG_LEVEL="warning",
            AP_QUEUE_MAX_LENGTH="2000000",
            AP_WEBHOOK_TIMEOUT_SECONDS="10",
            PYTHONPATH=str(REPO),
        )
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "conveyor.log"

    async def start(self, **extra: str) -> None:
        env = {**self.env, **extra}
        with self.log.open("ab") as sink:
            self.proc = wh._spawn([sys.executable, "-m", "conveyor", "up"], env, sink)
        try:
            await wh._wait_http(self.port, "/readyz", self.proc, 90)
        except RuntimeError:
            print(self.log.read_text()[-3000:], file=sys.stderr)
            raise

    def stop(self) -> None:
        if self.proc is not None:
            wh._stop(self.proc)
            self.proc = None


# ----------------------------------------------------------------------------- profiles
class Profiler:
    """``py-spy record`` of one process during a phase (``--profile``): the collapsed stacks
    go to ``bench/results/profiles/<phase>.txt``, the functions with the most samples (own
    and, for Conveyor's code, inclusive) to the JSON and the output."""

    def __init__(self, exe: str | None, out: Path) -> None:
        self.exe = exe
        self.out = out
        self.summaries: dict[str, dict[str, Any]] = {}

    @contextlib.asynccontextmanager
    async def record(self, key: str, pid: int | None, seconds: float) -> AsyncIterator[None]:
        if self.exe is None or pid is None:
            yield
            return
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / f"{key}.txt"
        proc = await asyncio.create_subprocess_exec(
            self.exe, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
            "--rate", "100", "--format", "raw", "--output", str(path), "--nonblocking",
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            yield
        finally:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(proc.wait(), 20)
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        if path.exists():
            self.summaries[key] = summarize_profile(path)
            top = self.summaries[key]["own"][:6]
            print(
                f"  profile {key}: {self.summaries[key]['samples']:,} samples; own: "
                + "; ".join(f"{row['pct']:.0f}% {row['frame']}" for row in top),
                flush=True,
            )


def _frame(frame: str) -> str:
    """``fn (path/to/file.py:123)`` without the line number and the path before the package."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    where = re.sub(r"^.*/(site-packages|lib/python3\.\d+)/", "", where)
    where = re.sub(r"^.*/(conveyor|bench)/", r"\1/", where)
    return f"{name} ({where})" if where else name


#: Frames under every sample of the Conveyor process (its entry point): left out of "inclusive".
_ENTRY_FRAMES = ("(conveyor/__main__.py)", "(conveyor/cli.py)", "(conveyor/runtime.py)")


def summarize_profile(path: Path, top: int = 15) -> dict[str, Any]:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_frame(f) for f in stack.split(";") if f]
        if frames:
            own[frames[-1]] += n
        for f in set(frames):
            if "conveyor/" in f and not f.endswith(_ENTRY_FRAMES):
                inclusive[f] += n

    def rows(counter: Counter[str]) -> list[dict[str, Any]]:
        return [
            {"frame": f, "samples": n, "pct": round(100 * n / total, 1) if total else 0.0}
            for f, n in counter.most_common(top)
        ]

    shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    return {
        "file": str(shown),
        "samples": total,
        "own": rows(own),
        "conveyor_inclusive": rows(inclusive),
    }


# ----------------------------------------------------------------------------- results
class Run:
    """Everything measured, for the table, the JSON and the plots."""

    def __init__(self) -> None:
        self.phases: dict[str, dict[str, Any]] = {}
        self.series: dict[str, list[dict[str, float]]] = {}
        self.figures: dict[str, Any] = {}
        self.notes: list[str] = []
        self.profiler = Profiler(None, RESULTS / "profiles")

    def show(self, key: str, phase: Any, samples: list[Any] | None, t0: float) -> dict[str, Any]:
        data = asdict(phase)
        self.phases[key] = data
        if samples is not None:
            self.series[key] = bins(samples, t0, {200, 202}, _bin_width(phase.duration_s))
        print(
            f"  {phase.name:<34} {phase.load:>12}  {phase.rps:>9,.0f}/s  "
            f"p50 {phase.p50_ms:7.2f}  p95 {phase.p95_ms:7.2f}  p99 {phase.p99_ms:7.2f} ms"
            f"  {phase.statuses}",
            flush=True,
        )
        if data.get("cpu_us_per_ok"):
            print(f"{'':6}CPU µs per answer: {wh._cpu_line(data['cpu_us_per_ok'])}", flush=True)
        return data


async def http_phase(
    run: Run,
    key: str,
    label: str,
    port: int,
    request: bytes,
    *,
    ok: set[int],
    duration: float,
    clients: int = 0,
    rate: float = 0.0,
    profile_pid: int | None = None,
    server_pid: int | None = None,
) -> dict[str, Any]:
    """One closed-loop (``clients``) or open-loop (``rate``) phase, with a progress bar;
    CPU per answer by part of the system with ``server_pid`` as the server."""
    samples: list[tuple[float, float, int]] = []
    meter = wh.CpuMeter(server_pid or profile_pid)
    t0 = clock()
    bound = duration * 2 if rate else duration
    async with (
        progress(label, bound, lambda: f"{len(samples):,} answers"),
        run.profiler.record(key, profile_pid, duration),
    ):
        if rate:
            phase = await wh.open_loop(
                label, port, request, rate=rate, duration_s=duration, ok=ok, samples=samples,
                meter=meter,
            )  # fmt: skip
        else:
            phase = await wh.closed_loop(
                label, port, request, clients=clients, duration_s=duration, ok=ok,
                samples=samples, meter=meter,
            )  # fmt: skip
    return run.show(key, phase, samples, t0)


async def sample_answer(port: int, path: str) -> str:
    """Status and body of one request with the bench payload (both flows answer the same)."""
    import aiohttp  # noqa: PLC0415

    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"http://127.0.0.1:{port}{path}",
            data=wh.PAYLOAD,
            headers={"Content-Type": "application/json"},
        ) as resp,
    ):
        return f"{resp.status} {(await resp.text())[:200]}"


async def warmup(port: int, request: bytes, clients: int, seconds: float, ok: set[int]) -> None:
    if seconds > 0:
        await wh.closed_loop("warmup", port, request, clients=clients, duration_s=seconds, ok=ok)


# ----------------------------------------------------------------------------- conveyor phases
async def conveyor_phases(
    run: Run, args: argparse.Namespace, redis_url: str, pg_url: str, workdir: Path
) -> None:
    c, d, w = args.concurrency, args.duration, args.warmup
    cv = Conveyor(workdir, redis_url, pg_url, args)
    bare_port = wh._free_port()
    bare = wh._spawn(
        [sys.executable, str(_BENCH_DIR / "webhooks.py"), "--serve-bare", str(bare_port)],
        None,
        None,
    )
    pg = await asyncpg.connect(pg_url)
    try:
        print("starting Conveyor (WORKER_AND_APP) and the bare handler ...", flush=True)
        await cv.start()
        await wh._wait_http(bare_port, "/hook", bare, 30)
        assert cv.proc is not None
        small = await wh._create_flow(cv.port, wh.SMALL_FLOW)
        four = await wh._create_flow(cv.port, wh.FOUR_STEP_FLOW)
        run.figures["flows"] = {"small": small, "four": four}
        run.figures["conveyor_answer"] = await sample_answer(
            cv.port, f"/api/v1/webhooks/{four}/sync"
        )
        print(f"  Conveyor 4-step answers {run.figures['conveyor_answer']}", flush=True)
        # 5a. Idle memory: ready, flows created, nothing running for a few seconds.
        await asyncio.sleep(args.idle_s)
        run.figures["idle"] = rss(cv.proc.pid)
        print(f"  idle WORKER_AND_APP: {run.figures['idle']}", flush=True)

        # Reference: the bare handler, alone.
        bare_req = wh.build_request(bare_port, "/hook")
        await warmup(bare_port, bare_req, c, w, {202})
        await http_phase(
            run, "bare", "bare aiohttp handler", bare_port, bare_req, ok={202}, duration=d,
            clients=c, server_pid=bare.pid,
        )  # fmt: skip
        wh._stop(bare)

        # 1. Async ingest, the runs queue paused so the worker does not compete.
        await wh._api(cv.port, "POST", "/api/v1/queues/runs/pause")
        ingest_req = wh.build_request(cv.port, f"/api/v1/webhooks/{small}")
        await warmup(cv.port, ingest_req, c, w, {202})
        await http_phase(
            run, "ingest", "async ingest (202)", cv.port, ingest_req, ok={202}, duration=d,
            clients=c, profile_pid=cv.proc.pid,
        )  # fmt: skip

        # 2. Async drain of that backlog.
        await drain_phase(run, args, cv, pg, small)

        # 3. Sync flows: max (closed loop), then half of it (open loop).
        for key, label, fid in (
            ("sync_small", "sync transform→respond", small),
            ("sync_four", "sync 4-step", four),
        ):
            req = wh.build_request(cv.port, f"/api/v1/webhooks/{fid}/sync")
            await warmup(cv.port, req, c, w, {200})
            top = await http_phase(
                run, f"{key}_max", f"{label} max", cv.port, req, ok={200}, duration=d,
                clients=c, profile_pid=cv.proc.pid,
            )  # fmt: skip
            rate = max(10.0, round(top["rps"] * 0.5, -1))
            await http_phase(
                run, f"{key}_half", f"{label} @half", cv.port, req, ok={200}, duration=d,
                rate=rate, server_pid=cv.proc.pid,
            )  # fmt: skip
        rows = await pg.fetch(
            "SELECT f.name, r.status, count(*) AS n FROM runs r JOIN flows f ON f.id = "
            "r.flow_id GROUP BY 1, 2 ORDER BY 1, 2"
        )
        run.figures["runs_by_flow_and_status"] = {
            f"{r['name']} {r['status']}": r["n"] for r in rows
        }
    finally:
        wh._stop(bare)
        cv.stop()
        await pg.close()

    # 5b–d. A fresh process at half load for --soak-s.
    if args.soak_s > 0:
        await soak_phase(run, args, (redis_url, pg_url), workdir, (small, four))


async def drain_phase(
    run: Run, args: argparse.Namespace, cv: Conveyor, pg: asyncpg.Connection, flow: str
) -> None:
    """Resume the runs queue; runs finished per second over ``--drain-s`` from the first
    finished run (a resume reaches the worker within its pause poll), or until the backlog
    is empty if sooner; then let the rest finish so the sync phases start on an idle process."""
    sql = "SELECT count(*) FROM runs WHERE flow_id = $1 AND status = ANY($2::text[])"
    total_sql = "SELECT count(*) FROM runs WHERE flow_id = $1"
    fid = uuid.UUID(flow)
    total = int(await pg.fetchval(total_sql, fid))
    before = int(await pg.fetchval(sql, fid, TERMINAL))
    points: list[tuple[float, int]] = [(0.0, before)]
    done = before
    meter = wh.CpuMeter(cv.proc.pid if cv.proc else None)
    meter.start()
    cpu: dict[str, float] = {}
    await wh._api(cv.port, "POST", "/api/v1/queues/runs/resume")
    t0 = time.monotonic()
    profile = run.profiler.record("drain", cv.proc.pid if cv.proc else None, args.drain_s + 1)
    await profile.__aenter__()
    window_start: tuple[float, int] | None = None
    window_end: tuple[float, int] | None = None
    async with progress(
        "async drain (then the rest)",
        args.drain_s + 1,
        lambda: f"{done - before:,} of {total - before:,} runs finished",
    ):
        while True:
            await asyncio.sleep(0.2)
            done = int(await pg.fetchval(sql, fid, TERMINAL))
            t = time.monotonic() - t0
            points.append((t, done))
            if window_start is None and done > before:
                window_start = points[-2]
            if t >= args.drain_s + 1 and not cpu:
                cpu = meter.stop(done - before)  # the same first seconds as the profile
            if t >= args.drain_s + 1 and profile is not None:
                await profile.__aexit__(None, None, None)
                profile = None
            if (
                window_start is not None
                and window_end is None
                and (t - window_start[0] >= args.drain_s or done >= total)
            ):
                window_end = (t, done)
            if done >= total or t > args.drain_s + args.drain_rest_s:
                break
    if profile is not None:
        await profile.__aexit__(None, None, None)
    window_start = window_start or (0.0, before)
    window_end = window_end or points[-1]
    span = window_end[0] - window_start[0]
    finished = window_end[1] - window_start[1]
    rps = round(finished / span, 1) if span else 0.0
    run.phases["drain"] = {
        "name": "async runs drained",
        "mode": "drain",
        "load": f"{span:.1f} s",
        "duration_s": round(span, 2),
        "ok": finished,
        "rps": rps,
        "backlog": total - before,
        "left_after_rest": total - done,
        "backlog_emptied_in_window": window_end[1] >= total,
        "cpu_us_per_ok": cpu or meter.stop(done - before),
    }
    series = []
    for (ta, na), (tb, nb) in itertools.pairwise(points):
        if tb > ta:
            series.append({"t": round(tb, 2), "ok_per_s": round((nb - na) / (tb - ta), 1)})
    run.series["drain"] = series
    print(
        f"  {'async runs drained':<34} {span:>10.1f} s  {rps:>9,.0f}/s  backlog "
        f"{total - before:,}, {total - done:,} left after {points[-1][0]:.0f} s",
        flush=True,
    )
    print(f"{'':6}CPU µs per run: {wh._cpu_line(run.phases['drain']['cpu_us_per_ok'])}", flush=True)


class _SoakPool(wh.Pool):  # type: ignore[misc]
    """The soak's connections: opened up front (:meth:`open_all`), then reused oldest-idle
    first, so none idles past the server's keep-alive timeout (75 s), to be closed and opened
    again on the next burst."""

    async def open_all(self) -> None:
        """Open every connection, each with one ``GET /healthz``, and leave them idle."""
        head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"

        async def one() -> Any:
            conn = await self.acquire()
            await conn.request(head)
            return conn

        for conn in await asyncio.gather(*(one() for _ in range(self.limit))):
            self.release(conn)

    async def acquire(self) -> Any:
        while self.idle:
            conn = self.idle.pop(0)
            if not conn.closed:
                return conn
            self.open -= 1
        return await super().acquire()


async def soak_phase(
    run: Run,
    args: argparse.Namespace,
    urls: tuple[str, str],
    workdir: Path,
    flows: tuple[str, str],
) -> None:
    """Open-loop load at half of what the process showed it can do: async ``transform →
    respond`` at a quarter of the drain rate plus sync 4-step at a quarter of its max, for
    ``--soak-s``; memory sampled throughout; then the completeness check of bench/soak.py."""
    redis_url, pg_url = urls
    small, four = flows
    r = aioredis.Redis.from_url(redis_url)
    await r.flushdb()  # the completed log holds only this phase's jobs
    cv = Conveyor(workdir, redis_url, pg_url, args)
    pg = await asyncpg.create_pool(pg_url, min_size=1, max_size=2)
    drain_rps = run.phases.get("drain", {}).get("rps", 0.0)
    four_rps = run.phases.get("sync_four_max", {}).get("rps", 0.0)
    rate_async = max(5.0, round(drain_rps * 0.25))
    rate_sync = max(5.0, round(four_rps * 0.25))
    accepted: dict[str, str] = {}
    statuses: Counter[str] = Counter()
    samples: dict[str, list[tuple[float, float, int]]] = {"async": [], "sync": []}
    memory: list[dict[str, float]] = []
    try:
        print(
            f"soak: fresh WORKER_AND_APP, async {rate_async:,.0f}/s + sync 4-step "
            f"{rate_sync:,.0f}/s for {args.soak_s:.0f} s ...",
            flush=True,
        )
        # Every completion kept in the log for the check; its memory is measured and
        # subtracted from used_memory below.
        await cv.start(AP_REDIS_COMPLETED_JOB_RETENTION_MAX_COUNT="5000000")
        assert cv.proc is not None
        pid = cv.proc.pid
        completed_keys = [sk.completed for q in soak.QUEUES for sk in qkeys.shard_keys(q, 1)]
        # A fixed set of keep-alive connections, all open (one GET /healthz each) before the
        # first sample: the server holds ~12 KB per connection and keeps that memory once a
        # burst has opened them, so a pool that grew with each stall of a shared host (up to
        # 1024) read as RSS growth. Requests beyond them wait in the client (open loop: the
        # schedule does not slip; latency counts the wait).
        pool = _SoakPool(cv.port, args.soak_connections)
        await pool.open_all()
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[None]] = set()
        t0 = clock()

        async def one(kind: str, request: bytes, at: float) -> None:
            conn = await pool.acquire()
            try:
                status = await conn.request(request)
            except (ConnectionError, OSError):
                statuses[f"{kind} error"] += 1
                pool.discard(conn)
                return
            head = conn.head
            pool.release(conn)
            statuses[f"{kind} {status}"] += 1
            samples[kind].append((clock(), clock() - at, status))
            pos = head.find(b"\r\nx-run-id:")
            if pos >= 0:
                end = head.find(b"\r\n", pos + 2)
                accepted[head[pos + 11 : end if end >= 0 else None].strip().decode()] = kind

        async def stream(kind: str, request: bytes, rate: float) -> None:
            n = int(rate * args.soak_s)
            i = 0
            while i < n:
                now = clock()
                while i < n and t0 + i / rate <= now:
                    task = loop.create_task(one(kind, request, t0 + i / rate))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    i += 1
                await asyncio.sleep(max(0.0, min(0.002, t0 + i / rate - clock())))

        stream_keys = [sk.stream for q in soak.QUEUES for sk in qkeys.shard_keys(q, 1)]
        #: "load" while requests go out, "drain" after, "drained" for the one sample taken once
        #: every accepted run is terminal (the queue then holds nothing).
        phase = ["load"]

        async def sample() -> None:
            info = await r.info("memory")
            log_bytes = 0
            for key in completed_keys:
                # SAMPLES 0: exact. The default estimate from 5 samples of a list of mixed
                # entries drifted by 10+ MB over a 10-minute soak and read as a leak.
                log_bytes += int(await r.memory_usage(key, samples=0) or 0)
            backlog = 0
            for key in stream_keys:
                backlog += int(await r.xlen(key))
            mem = rss(pid)
            memory.append(
                {
                    "t": round(clock() - t0, 1),
                    "phase": phase[0],
                    **mem,
                    "connections": pool.open,
                    "waiting": len(pool.waiting),
                    "in_flight": len(tasks),
                    "queue_entries": backlog,
                    "redis_used_mb": round(int(info["used_memory"]) / 2**20, 2),
                    "redis_log_mb": round(log_bytes / 2**20, 2),
                    "redis_rss_mb": round(int(info["used_memory_rss"]) / 2**20, 2),
                }
            )

        async def sampler() -> None:
            while True:
                await sample()
                await asyncio.sleep(args.soak_sample_s)

        watch = asyncio.ensure_future(sampler())
        async with progress(
            "soak at half load",
            args.soak_s,
            lambda: (
                f"{len(accepted):,} accepted, {len(tasks)} in flight, "
                f"rss {memory[-1]['rss_mb'] if memory else 0} MB"
            ),
        ):
            await asyncio.gather(
                stream("async", wh.build_request(cv.port, f"/api/v1/webhooks/{small}"), rate_async),
                stream(
                    "sync", wh.build_request(cv.port, f"/api/v1/webhooks/{four}/sync"), rate_sync
                ),
            )
            if tasks:
                await asyncio.wait(set(tasks), timeout=30)
        load_s = clock() - t0
        phase[0] = "drain"

        # Drain, then the completeness check (as bench/soak.py does it).
        ids = [uuid.UUID(x) for x in accepted]
        drain_t = time.monotonic()
        terminal = 0
        while time.monotonic() - drain_t < args.drain_rest_s:
            terminal = int(
                await pg.fetchval(
                    "SELECT count(*) FROM runs WHERE id = ANY($1::uuid[]) AND status = ANY($2)",
                    ids,
                    TERMINAL,
                )
            )
            if terminal == len(ids):
                break
            await asyncio.sleep(0.5)
        drain_s = time.monotonic() - drain_t
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch
        phase[0] = "drained"
        await sample()
        pool.close()
        completed: list[str] = []
        for _ in range(30):
            completed = await soak.completed_jobs(r)
            if set(accepted) <= set(completed):
                break
            await asyncio.sleep(1)
        counts = Counter(completed)
        found = {
            str(row["id"]): row["status"]
            for row in await pg.fetch("SELECT id, status FROM runs WHERE id = ANY($1::uuid[])", ids)
        }
        steps_twice = await pg.fetchval(
            "SELECT count(*) FROM (SELECT run_id, name FROM step_runs WHERE run_id = "
            "ANY($1::uuid[]) GROUP BY 1, 2 HAVING count(*) > 1) d",
            ids,
        )
        lost = [rid for rid in accepted if found.get(rid) not in TERMINAL]
        twice = [j for j, n in counts.items() if n > 1]
        run.figures["soak"] = {
            "seconds": round(load_s, 1),
            "rate_async": rate_async,
            "rate_sync": rate_sync,
            "connections": args.soak_connections,
            "connections_max": max((m["connections"] for m in memory), default=0),
            "answers": dict(statuses),
            "accepted": len(accepted),
            "terminal": sum(1 for s in found.values() if s in TERMINAL),
            "by_status": dict(Counter(found.values())),
            "lost": len(lost),
            "lost_ids": lost[:20],
            "completed_twice": len(twice),
            "not_in_completed_log": len(set(accepted) - set(counts)),
            "steps_recorded_twice": int(steps_twice),
            "drain_s": round(drain_s, 1),
            "memory": memory,
            "flat": soak_flatness(memory),
        }
        width = _bin_width(args.soak_s)
        run.series["soak_async"] = bins(samples["async"], t0, {202}, width)
        run.series["soak_sync"] = bins(samples["sync"], t0, {200}, width)
        s = run.figures["soak"]
        print(
            f"  soak {s['seconds']:.0f} s: accepted {s['accepted']:,}, lost {s['lost']}, "
            f"completed twice {s['completed_twice']}, steps twice {s['steps_recorded_twice']}; "
            f"RSS {s['flat']['rss_mb']}, redis {s['flat']['redis_used_mb']}; "
            f"{args.soak_connections} connections (most open: {s['connections_max']}); rule: "
            "flat if the mean of the last fifth of the samples after the first 10 % exceeds "
            "that of the first fifth by at most max(5 MB, 5 %) for RSS, max(2 MB, 5 %) for "
            "Redis used_memory less the completed log",
            flush=True,
        )
    finally:
        cv.stop()
        await pg.close()
        await r.aclose()


def flatness(points: list[tuple[float, float]], slack_mb: float) -> dict[str, Any]:
    """Is a memory series flat? ``points`` are (seconds, MB). The first 10 % of the span is a
    fresh process's warm-up and left out; of the rest: the means of the first and the last
    fifth, the growth between them, and the least-squares slope (MB/min) of the second half.
    Flat if the growth is at most ``slack_mb`` or 5 % of the first, whichever is larger."""
    if len(points) < 3:
        return {"first": 0.0, "last": 0.0, "growth": 0.0, "slope_mb_per_min": 0.0, "flat": None}
    span = points[-1][0] - points[0][0]
    rest = [p for p in points if p[0] - points[0][0] >= 0.1 * span] or points
    k = max(1, len(rest) // 5)
    first = sum(v for _, v in rest[:k]) / k
    last = sum(v for _, v in rest[-k:]) / k
    half = rest[len(rest) // 2 :]
    n = len(half)
    mean_t = sum(t for t, _ in half) / n
    mean_v = sum(v for _, v in half) / n
    var = sum((t - mean_t) ** 2 for t, _ in half)
    slope = sum((t - mean_t) * (v - mean_v) for t, v in half) / var if var else 0.0
    growth = last - first
    return {
        "warmup_s": round(0.1 * span, 1),
        "first": round(first, 2),
        "last": round(last, 2),
        "growth": round(growth, 2),
        "slope_mb_per_min": round(slope * 60, 3),
        "flat": growth <= max(slack_mb, 0.05 * first),
    }


#: The growth a soak's memory series may show and still read as flat (or 5 % if larger).
SOAK_SLACK_MB = {"rss_mb": 5.0, "tree_pss_mb": 5.0, "redis_used_mb": 2.0}


def soak_flatness(memory: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The series of the load (samples of the drain after it left out), and Redis before the
    load against after the drain: during the load ``used_memory`` also holds the queue's
    entries, which grow whenever the worker falls behind (on a shared host, at any rate);
    once every run is terminal the queue holds nothing and what is left is what the runs left
    behind."""
    load = [m for m in memory if m.get("phase", "load") == "load"] or memory
    out = {
        "rss_mb": flatness([(m["t"], m["rss_mb"]) for m in load], SOAK_SLACK_MB["rss_mb"]),
        "tree_pss_mb": flatness(
            [(m["t"], m["tree_pss_mb"]) for m in load], SOAK_SLACK_MB["tree_pss_mb"]
        ),
        "redis_used_mb": flatness(
            [(m["t"], m["redis_used_mb"] - m["redis_log_mb"]) for m in load],
            SOAK_SLACK_MB["redis_used_mb"],
        ),
    }
    after = next((m for m in memory if m.get("phase") == "drained"), None)
    if after is not None:  # runs saved before this sample existed are judged by the series
        first = memory[0]["redis_used_mb"] - memory[0]["redis_log_mb"]
        last = after["redis_used_mb"] - after["redis_log_mb"]
        out["redis_drained_mb"] = {
            "first": round(first, 2),
            "last": round(last, 2),
            "growth": round(last - first, 2),
            "queue_entries_max": max(m["queue_entries"] for m in load),
            "queue_entries_after": after["queue_entries"],
            "flat": last - first <= max(SOAK_SLACK_MB["redis_used_mb"], 0.05 * first),
        }
    return out


# ----------------------------------------------------------------------------- peers
def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "conveyor" / "bench-peers"


def peers_ready(install: bool) -> tuple[Path | None, str]:
    """(the cache dir with n8n and bullmq installed, or None; why not)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        return None, "peers skipped: node/npm not found"
    cache = cache_dir()
    wanted = orjson.loads((PEERS_DIR / "package.json").read_bytes())
    stamp = cache / "package.json"
    installed = (
        stamp.exists()
        and orjson.loads(stamp.read_bytes()) == wanted
        and (cache / "node_modules" / "n8n" / "bin" / "n8n").exists()
        and (cache / "node_modules" / "bullmq" / "package.json").exists()
    )
    if installed:
        return cache, ""
    if not install:
        return None, "peers skipped: not installed yet (run with --peers once)"
    cache.mkdir(parents=True, exist_ok=True)
    shutil.copy(PEERS_DIR / "package.json", stamp)
    print(f"installing n8n and bullmq into {cache} (npm, once; several minutes) ...", flush=True)
    env = dict(os.environ, SCARF_ANALYTICS="false", DO_NOT_TRACK="1")  # no install telemetry
    if Path("/usr/include/node/node_version.h").exists():
        env.setdefault("npm_config_nodedir", "/usr")  # native modules without a headers download
    log = cache / "install.log"
    with log.open("wb") as sink:
        code = subprocess.call(
            [npm, "install", "--no-audit", "--no-fund", "--loglevel=warn"],
            cwd=cache,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    if code != 0:
        return None, f"peers skipped: npm install failed ({code}), see {log}"
    return cache, ""


def n8n_env(folder: Path, port: int) -> dict[str, str]:
    """Headless, loopback-only, no call to n8n's servers (docs: "Isolate n8n")."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("N8N_", "AP_"))}
    env.update(
        N8N_USER_FOLDER=str(folder),
        N8N_PORT=str(port),
        N8N_LISTEN_ADDRESS="127.0.0.1",
        N8N_HOST="127.0.0.1",
        N8N_PROTOCOL="http",
        WEBHOOK_URL=f"http://127.0.0.1:{port}/",
        N8N_EDITOR_BASE_URL=f"http://127.0.0.1:{port}/",
        DB_TYPE="sqlite",
        EXECUTIONS_MODE="regular",
        N8N_ENCRYPTION_KEY=secrets.token_hex(24),
        N8N_DIAGNOSTICS_ENABLED="false",
        N8N_DIAGNOSTICS_CONFIG_FRONTEND="",
        N8N_DIAGNOSTICS_CONFIG_BACKEND="",
        EXTERNAL_FRONTEND_HOOKS_URLS="",
        N8N_VERSION_NOTIFICATIONS_ENABLED="false",
        N8N_TEMPLATES_ENABLED="false",
        N8N_PERSONALIZATION_ENABLED="false",
        N8N_HIRING_BANNER_ENABLED="false",
        N8N_DYNAMIC_BANNERS_ENABLED="false",
        N8N_COMMUNITY_PACKAGES_ENABLED="false",
        N8N_AI_ENABLED="false",
        N8N_VERSION_NOTIFICATIONS_WHATS_NEW_ENABLED="false",
        N8N_LICENSE_AUTO_RENEW_ENABLED="false",
        N8N_PYTHON_ENABLED="false",
        N8N_PUBLIC_API_DISABLED="true",
        N8N_ENFORCE_SETTINGS_FILE_PERMISSIONS="false",
        N8N_SECURE_COOKIE="false",
        N8N_LOG_LEVEL="warn",
        N8N_RUNNERS_BROKER_LISTEN_ADDRESS="127.0.0.1",
        N8N_RUNNERS_BROKER_PORT=str(wh._free_port()),
        N8N_METRICS="false",
        NODE_ENV="production",
        DO_NOT_TRACK="1",
        NO_PROXY="*",
    )
    return env


def _off_loopback(pid: int) -> list[str]:
    """Sockets of ``pid`` and its children listening on, or connected to, anything but
    loopback (n8n must do neither)."""
    bad = []
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return bad

    def loopback(ip: str) -> bool:
        return ip.startswith("127.") or ip in ("::1", "::ffff:127.0.0.1")

    for p in procs:
        with contextlib.suppress(psutil.Error):
            for conn in p.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN and not loopback(conn.laddr.ip):
                    bad.append(f"{p.name()} listens on {conn.laddr.ip}:{conn.laddr.port}")
                elif conn.raddr and not loopback(conn.raddr.ip):
                    bad.append(f"{p.name()} connects to {conn.raddr.ip}:{conn.raddr.port}")
    return bad


async def n8n_phases(run: Run, args: argparse.Namespace, cache: Path, workdir: Path) -> None:
    folder = workdir / "n8n"
    folder.mkdir()
    port = wh._free_port()
    env = n8n_env(folder, port)
    n8n = [shutil.which("node") or "node", str(cache / "node_modules" / "n8n" / "bin" / "n8n")]
    flow = PEERS_DIR / "n8n-four-step.json"
    wf = orjson.loads(flow.read_bytes())
    log = workdir / "n8n.log"
    print("n8n: importing and activating the 4-step workflow ...", flush=True)
    with log.open("ab") as sink:
        for cmd in (
            [*n8n, "import:workflow", f"--input={flow}"],
            [*n8n, "publish:workflow", f"--id={wf['id']}"],
        ):
            code = await asyncio.to_thread(
                subprocess.call, cmd, env=env, stdout=sink, stderr=sink, timeout=300
            )
            if code != 0 and cmd[2].startswith("publish"):
                code = await asyncio.to_thread(
                    subprocess.call,
                    [*n8n, "update:workflow", f"--id={wf['id']}", "--active=true"],
                    env=env, stdout=sink, stderr=sink, timeout=300,
                )  # fmt: skip
            if code != 0:
                run.notes.append(f"n8n skipped: {cmd[2]} failed, see the log")
                print(log.read_text()[-3000:], file=sys.stderr)
                return
    sink = log.open("ab")
    proc = wh._spawn([*n8n, "start"], env, sink)
    try:
        req = wh.build_request(port, "/webhook/bench-four-step")
        deadline = time.monotonic() + 180
        status = 0
        async with progress("n8n start", 60, lambda: "waiting for the webhook"):
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise RuntimeError(f"n8n exited with {proc.returncode}")
                with contextlib.suppress(OSError, ConnectionError, asyncio.TimeoutError):
                    _, conn = await asyncio.get_running_loop().create_connection(
                        wh._Conn, "127.0.0.1", port
                    )
                    status = await asyncio.wait_for(conn.request(req), 10)
                    if conn.transport:
                        conn.transport.close()
                    if status == 200:
                        break
                await asyncio.sleep(1)
        if status != 200:
            raise RuntimeError(f"n8n webhook not answering 200 (last {status})")
        bad = _off_loopback(proc.pid)
        if bad:
            raise RuntimeError(f"n8n off loopback: {bad}")
        run.figures["n8n_idle"] = rss(proc.pid)
        run.figures["n8n_answer"] = await sample_answer(port, "/webhook/bench-four-step")
        print(f"  n8n answers {run.figures['n8n_answer']}", flush=True)
        c, d, w = args.concurrency, args.duration, args.warmup
        await warmup(port, req, 16, w, {200})
        for clients in (16, c):
            await http_phase(
                run, f"n8n_c{clients}", f"n8n 4-step c={clients}", port, req, ok={200},
                duration=d, clients=clients, server_pid=proc.pid,
            )  # fmt: skip
        bad = _off_loopback(proc.pid)
        run.figures["n8n_off_loopback"] = bad  # checked at start and after the load
        if bad:
            run.notes.append(f"n8n had sockets off loopback: {bad}")
    except (RuntimeError, OSError) as exc:
        run.notes.append(f"n8n failed: {exc}")
        print(f"n8n failed: {exc}; log tail:\n{log.read_text()[-3000:]}", file=sys.stderr)
    finally:
        wh._stop(proc, 30)
        sink.close()


# ----------------------------------------------------------------------------- queue phases
async def queue_phases(
    run: Run, args: argparse.Namespace, redis_url: str, cache: Path | None
) -> None:
    url = _with_db(redis_url, DB)
    client = aioredis.Redis.from_url(url, decode_responses=False)
    n, c = args.jobs, args.c
    timelines: dict[str, list[tuple[float, int]]] = {}

    async def follow(key: str, counter: list[int]) -> None:
        t0 = time.perf_counter()
        points = timelines.setdefault(key, [])
        while True:
            points.append((time.perf_counter() - t0, counter[0]))
            await asyncio.sleep(0.05)

    async def measured(key: str, label: str, coro_fn: Callable[[list[int]], Any]) -> Any:
        counter = [0]
        watch = asyncio.ensure_future(follow(key, counter))
        try:
            async with progress(label, n / 20_000, lambda: f"{counter[0]:,}/{n:,} jobs"):
                return await coro_fn(counter)
        finally:
            watch.cancel()

    try:
        async with run.profiler.record("queue_conveyor", os.getpid(), n / 20_000):
            enq_s, proc_s = await measured(
                "queue_conveyor",
                "queue: conveyor",
                lambda p: qb.bench_conveyor(client, n, c, progress=p),
            )
        raw_s = await measured(
            "queue_raw", "queue: raw", lambda p: qb.bench_raw(client, n, c, progress=p)
        )
        rows = {
            "conveyor enqueue": enq_s,
            "conveyor process": proc_s,
            "raw XREADGROUP+XACK": raw_s,
        }
        if cache is not None:
            await client.flushdb()
            bull = await measured(
                "queue_bullmq", "queue: bullmq", lambda p: bullmq(cache, url, n, c, p)
            )
            if bull is not None:
                rows["bullmq addBulk"] = bull["enqueue_s"]
                rows["bullmq process"] = bull["process_s"]
                run.figures["bullmq_version"] = bull["bullmq"]
        await client.flushdb()
    finally:
        await client.aclose()
    run.figures["queue"] = {
        "n": n,
        "c": c,
        "rows": {
            k: {"seconds": round(v, 3), "jobs_per_s": round(n / v, 1)} for k, v in rows.items()
        },
    }
    for key, points in timelines.items():
        # Jobs done per bin of 1/40 of the processing time, from its first finished job.
        start = next((i for i, (_, done) in enumerate(points) if done > 0), len(points))
        busy = points[max(0, start - 1) :]
        if len(busy) < 2:
            continue
        t0, t_end = busy[0][0], busy[-1][0]
        width = max(0.05, (t_end - t0) / 40)
        series = []
        i, prev = 0, busy[0][1]
        edge = t0 + width
        while edge <= t_end + width:
            while i + 1 < len(busy) and busy[i + 1][0] <= edge:
                i += 1
            series.append(
                {"t": round(edge - t0, 3), "ok_per_s": round((busy[i][1] - prev) / width, 1)}
            )
            prev = busy[i][1]
            edge += width
        run.series[key] = series
    for name, secs in rows.items():
        print(f"  {name:<34} {n:>8,} jobs {secs:8.3f} s {n / secs:>10,.0f}/s", flush=True)


async def bullmq(
    cache: Path, url: str, n: int, c: int, counter: list[int]
) -> dict[str, Any] | None:
    script = cache / "bullmq_bench.mjs"
    shutil.copy(PEERS_DIR / "bullmq_bench.mjs", script)  # resolves bullmq from the cache
    proc = await asyncio.create_subprocess_exec(
        shutil.which("node") or "node", str(script), url, str(n), str(c),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    result = None
    async for line in proc.stdout:
        with contextlib.suppress(orjson.JSONDecodeError):
            msg = orjson.loads(line)
            if "result" in msg:
                result = msg["result"]
            else:
                counter[0] = int(msg["done"])
    err = await proc.stderr.read()
    await proc.wait()
    if result is None:
        print(f"bullmq failed ({proc.returncode}): {err.decode()[-2000:]}", file=sys.stderr)
    return result


# ----------------------------------------------------------------------------- table
def targets(run: Run) -> list[dict[str, Any]]:
    """The issue's targets: measure, Conveyor's figure, reference, ratio, target, met."""
    p, f = run.phases, run.figures
    rows: list[dict[str, Any]] = []

    def rps(key: str) -> float | None:
        return p[key]["rps"] if key in p else None

    def add(  # noqa: PLR0917
        measure: str, value: str, ref: str, ratio: float | None, shown: str, target: str,
        met: bool | None,
    ) -> None:  # fmt: skip
        rows.append(
            {
                "measure": measure,
                "conveyor": value,
                "reference": ref,
                "ratio": None if ratio is None else round(ratio, 4),
                "ratio_shown": shown,
                "target": target,
                "met": met,
            }
        )

    def vs(  # noqa: PLR0917
        measure: str, key: str, unit: str, ref_key: str, ref_name: str, goal: float
    ) -> None:
        a, b = rps(key), rps(ref_key)
        ratio = a / b if a is not None and b else None
        add(
            measure,
            f"{a:,.0f} {unit}" if a is not None else "—",
            f"{ref_name} {b:,.0f}/s" if b else "—",
            ratio,
            f"{ratio * 100:.1f} %" if ratio is not None else "—",
            f"≥ {goal * 100:.0f} %",
            None if ratio is None else ratio >= goal,
        )

    vs("1. async ingest (202)", "ingest", "req/s", "bare", "bare", 0.50)
    vs("2. async drain, transform→respond", "drain", "runs/s", "bare", "bare", 0.20)
    vs("3. sync transform→respond, max", "sync_small_max", "runs/s", "bare", "bare", 0.12)
    vs("3. sync 4-step, max", "sync_four_max", "runs/s", "bare", "bare", 0.08)
    n8n_best = max(
        (p[k]["rps"] for k in p if k.startswith("n8n_c")), default=None
    )  # the better of c=16 / c=64
    four = rps("sync_four_max")
    ratio = four / n8n_best if four is not None and n8n_best else None
    add(
        "3. sync 4-step vs n8n (same flow)",
        f"{four:,.0f} runs/s" if four is not None else "—",
        f"n8n {n8n_best:,.1f}/s (best of c=16/{run.figures.get('c', 64)})" if n8n_best else "—",
        ratio,
        f"{ratio:.1f}×" if ratio is not None else "—",
        "≥ 20×",
        None if ratio is None else ratio >= 20,
    )
    for key, label in (("sync_small_half", "transform→respond"), ("sync_four_half", "4-step")):
        if key in p:
            add(
                f"3. p95 sync {label} @ half max",
                f"{p[key]['p95_ms']:.1f} ms",
                f"at {p[key]['load']}",
                None,
                "—",
                "≤ 25 ms",
                p[key]["p95_ms"] <= 25,
            )
    q = f.get("queue", {}).get("rows", {})
    conv = q.get("conveyor process", {}).get("jobs_per_s")
    for ref_key, name, goal, shown_as in (
        ("bullmq process", "BullMQ", 5.0, "x"),
        ("raw XREADGROUP+XACK", "raw", 0.60, "%"),
    ):
        ref = q.get(ref_key, {}).get("jobs_per_s")
        ratio = conv / ref if conv and ref else None
        add(
            f"4. queue vs {name} ({f.get('queue', {}).get('n', 0):,} no-op jobs, C="
            f"{f.get('queue', {}).get('c', 0)})",
            f"{conv:,.0f} jobs/s" if conv else "—",
            f"{name} {ref:,.0f}/s" if ref else "—",
            ratio,
            "—"
            if ratio is None
            else (f"{ratio:.1f}×" if shown_as == "x" else f"{ratio * 100:.0f} %"),
            f"≥ {goal:.0f}×" if shown_as == "x" else f"≥ {goal * 100:.0f} %",
            None if ratio is None else ratio >= goal,
        )
    idle = f.get("idle")
    if idle:
        add(
            "5. idle WORKER_AND_APP RSS",
            f"{idle['rss_mb']:.1f} MB",
            f"with sandbox children: RSS {idle['tree_rss_mb']:.0f}, "
            f"PSS {idle['tree_pss_mb']:.0f} MB",
            None,
            "—",
            "≤ 120 MB",
            idle["rss_mb"] <= 120,
        )
    s = f.get("soak")
    if s:
        conns = s.get("connections")
        fl = s["flat"]["rss_mb"]
        add(
            f"5. RSS over {s['seconds']:.0f} s at half load",
            f"{fl['first']:.1f} → {fl['last']:.1f} MB",
            f"first vs last fifth after {fl.get('warmup_s', 0):.0f} s of warm-up; "
            f"slope of the second half {fl.get('slope_mb_per_min', 0):+.2f} MB/min"
            + (f"; {conns} keep-alive connections" if conns else ""),
            None,
            f"{fl['growth']:+.1f} MB",
            f"growth ≤ max({SOAK_SLACK_MB['rss_mb']:g} MB, 5 %)",
            fl["flat"],
        )
        dr, fl = s["flat"].get("redis_drained_mb"), s["flat"]["redis_used_mb"]
        if dr is None:
            how = "first vs last fifth of the load"
            dr = fl
        else:
            how = (
                "before the load vs after the drain (queue empty); during the load "
                f"{fl['first']:.1f} → {fl['last']:.1f} MB (first vs last fifth) with up to "
                f"{dr['queue_entries_max']:,} entries queued"
            )
        add(
            f"5. Redis used_memory over {s['seconds']:.0f} s at half load",
            f"{dr['first']:.1f} → {dr['last']:.1f} MB",
            how + " (completed log excluded)",
            None,
            f"{dr['growth']:+.1f} MB",
            f"growth ≤ max({SOAK_SLACK_MB['redis_used_mb']:g} MB, 5 %)",
            dr["flat"],
        )
        bad = s["lost"] + s["completed_twice"] + s["steps_recorded_twice"]
        add(
            "5. completeness (soak)",
            f"{s['accepted']:,} accepted, {s['terminal']:,} terminal",
            f"lost {s['lost']}, completed twice {s['completed_twice']}, "
            f"steps twice {s['steps_recorded_twice']}",
            None,
            "—",
            "0 lost, 0 twice",
            bad == 0 and s["not_in_completed_log"] == 0,
        )
    return rows


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"Measured {result['measured_at']} by `{result['command']}` "
        f"(commit {m.get('commit', '?')}, {result['total_s']:.0f} s in all).",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, kernel {m['kernel']}, "
        f"Python {m['python']}, aiohttp {m['aiohttp']}, uvloop {m['uvloop']}, "
        f"Redis {m.get('redis', '?')} ({m.get('redis_where', '')}), "
        f"PostgreSQL {m.get('postgres', '?')}"
        + (f", node {m['node']}" if m.get("node") else "")
        + (f", n8n {m['n8n']}" if m.get("n8n") else "")
        + (f", BullMQ {m['bullmq']}" if m.get("bullmq") else "")
        + f". Load average at start {m['loadavg_start']}, at the end {m['loadavg_end']}.",
        "",
        "| measure | Conveyor | reference (same run) | ratio | target | met |",
        "|---|---:|---|---:|---|---|",
    ]
    for row in result["targets"]:
        met = {True: "**met**", False: "**not met**", None: "—"}[row["met"]]
        lines.append(
            f"| {row['measure']} | {row['conveyor']} | {row['reference']} | "
            f"{row['ratio_shown']} | {row['target']} | {met} |"
        )
    lines += [
        "",
        "| phase | load | ok/s | p50 ms | p95 ms | p99 ms | answers |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for p in result["phases"].values():
        answers = ", ".join(f"{k}: {v:,}" for k, v in sorted(p.get("statuses", {}).items()))
        if p.get("mode") == "drain":
            answers = f"backlog {p['backlog']:,}" + (
                " (emptied)" if p["backlog_emptied_in_window"] else ""
            )
            lines.append(f"| {p['name']} | {p['load']} | {p['rps']:,.0f} | — | — | — | {answers} |")
            continue
        lines.append(
            f"| {p['name']} | {p['load']} | {p['rps']:,.0f} | {p['p50_ms']:.2f} | "
            f"{p['p95_ms']:.2f} | {p['p99_ms']:.2f} | {answers} |"
        )
    cpu_rows = [p for p in result["phases"].values() if p.get("cpu_us_per_ok")]
    if cpu_rows:
        parts = ["conveyor", "sandbox", "postgres", "redis", "client", "other"]
        names = ["server", "its children", "PostgreSQL", "Redis", "load generator", "other"]
        lines += [
            "",
            "CPU per answer (per finished run for the drain), µs, read from /proc over each "
            "phase: the server process (Conveyor; the bare handler; n8n), its children (the "
            "sandbox; n8n's task runner), PostgreSQL, Redis, the load generator, everything else.",
            "",
            "| phase | " + " | ".join(names) + " | total |",
            "|---|" + "---:|" * (len(parts) + 1),
        ]
        for p in cpu_rows:
            cpu = p["cpu_us_per_ok"]
            cells = " | ".join(f"{cpu.get(k, 0):,.0f}" for k in [*parts, "total"])
            lines.append(f"| {p['name']} | {cells} |")
    q = result["figures"].get("queue")
    if q:
        lines += ["", "| queue phase | jobs | seconds | jobs/s |", "|---|---:|---:|---:|"]
        for name, row in q["rows"].items():
            lines.append(
                f"| {name} | {q['n']:,} | {row['seconds']:.3f} | {row['jobs_per_s']:,.0f} |"
            )
    s = result["figures"].get("soak")
    if s:
        lines += [
            "",
            f"Soak: {s['seconds']:.0f} s, async {s['rate_async']:,.0f}/s + sync 4-step "
            f"{s['rate_sync']:,.0f}/s; answers {s['answers']}; runs by status {s['by_status']}; "
            f"drained in {s['drain_s']} s. RSS {s['flat']['rss_mb']['first']} → "
            f"{s['flat']['rss_mb']['last']} MB (PSS with sandbox children "
            f"{s['flat']['tree_pss_mb']['first']} → {s['flat']['tree_pss_mb']['last']} MB), "
            f"Redis used_memory without the completed log {s['flat']['redis_used_mb']['first']}"
            f" → {s['flat']['redis_used_mb']['last']} MB.",
        ]
    profiles = result.get("profiles") or {}
    if profiles:
        lines += [
            "",
            "Profiles (`--profile`: py-spy at 100 Hz on the Conveyor process during the phase; "
            "collapsed stacks in `bench/results/profiles/`): share of samples",
            "",
            "| phase | samples | most own time | Conveyor code, inclusive |",
            "|---|---:|---|---|",
        ]
        for key, prof in profiles.items():
            own = "; ".join(f"{r['pct']:.0f}% `{r['frame']}`" for r in prof["own"][:5])
            incl = "; ".join(
                f"{r['pct']:.0f}% `{r['frame']}`" for r in prof["conveyor_inclusive"][:5]
            )
            lines.append(f"| {key} | {prof['samples']:,} | {own} | {incl} |")
    for note in result["notes"]:
        lines.append(f"\nNote: {note}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots
def plots(result: dict[str, Any], out: Path) -> list[Path]:
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install -e .[bench])")
        return []
    written = []
    series = result["series"]
    http = [k for k in result["phases"] if k in series and k != "drain"]
    if http:
        fig, axes = plt.subplots(len(http), 2, figsize=(12, 2.0 * len(http)), squeeze=False)
        for row, key in enumerate(http):
            pts = series[key]
            t = [x["t"] for x in pts]
            axes[row][0].plot(t, [x["ok_per_s"] for x in pts], color="tab:blue")
            axes[row][0].set_ylabel("ok/s")
            axes[row][0].set_title(result["phases"][key]["name"], fontsize=9, loc="left")
            axes[row][1].plot(t, [x["p50_ms"] for x in pts], label="p50")
            axes[row][1].plot(t, [x["p95_ms"] for x in pts], label="p95")
            axes[row][1].set_ylabel("ms")
            axes[row][1].legend(fontsize=7, loc="upper right")
            for ax in axes[row]:
                ax.set_ylim(bottom=0)
                ax.tick_params(labelsize=7)
        axes[-1][0].set_xlabel("s")
        axes[-1][1].set_xlabel("s")
        fig.suptitle("HTTP phases: throughput and latency over time", fontsize=10)
        fig.tight_layout()
        path = out / "run_all-http.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    others = [k for k in ("drain", "queue_conveyor", "queue_raw", "queue_bullmq") if k in series]
    if others:
        fig, axes = plt.subplots(1, len(others), figsize=(4 * len(others), 3), squeeze=False)
        for ax, key in zip(axes[0], others, strict=False):
            pts = series[key]
            ax.plot([x["t"] for x in pts], [x["ok_per_s"] for x in pts])
            ax.set_title(key.replace("_", " "), fontsize=9)
            ax.set_xlabel("s")
            ax.set_ylabel("runs/s" if key == "drain" else "jobs/s")
            ax.set_ylim(bottom=0)
            ax.tick_params(labelsize=7)
        fig.tight_layout()
        path = out / "run_all-drain-queue.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    s = result["figures"].get("soak")
    if s and s["memory"]:
        fig, axes = plt.subplots(2, 2, figsize=(12, 6))
        for key, label in (("soak_async", "async 202/s"), ("soak_sync", "sync 200/s")):
            pts = series.get(key, [])
            axes[0][0].plot([x["t"] for x in pts], [x["ok_per_s"] for x in pts], label=label)
        axes[0][0].set_title("soak throughput", fontsize=9)
        axes[0][0].legend(fontsize=7)
        pts = series.get("soak_sync", [])
        axes[0][1].plot([x["t"] for x in pts], [x["p50_ms"] for x in pts], label="sync p50")
        axes[0][1].plot([x["t"] for x in pts], [x["p95_ms"] for x in pts], label="sync p95")
        axes[0][1].set_title("soak sync 4-step latency (ms)", fontsize=9)
        axes[0][1].legend(fontsize=7)
        mem = s["memory"]
        t = [x["t"] for x in mem]
        axes[1][0].plot(t, [x["rss_mb"] for x in mem], label="WORKER_AND_APP RSS")
        axes[1][0].plot(t, [x["tree_pss_mb"] for x in mem], label="with sandbox, PSS")
        axes[1][0].set_title("memory (MB)", fontsize=9)
        axes[1][0].legend(fontsize=7)
        axes[1][1].plot(t, [x["redis_used_mb"] for x in mem], label="used_memory")
        axes[1][1].plot(
            t, [x["redis_used_mb"] - x["redis_log_mb"] for x in mem], label="without completed log"
        )
        axes[1][1].set_title("Redis (MB)", fontsize=9)
        axes[1][1].legend(fontsize=7)
        for ax in axes.flat:
            ax.set_ylim(bottom=0)
            ax.set_xlabel("s")
            ax.tick_params(labelsize=7)
        fig.tight_layout()
        path = out / "run_all-soak.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written


def update_readme(text: str, images: list[Path]) -> None:
    body = text + "\n\n" + "\n".join(f"![{p.stem}](results/{p.name})" for p in images)
    readme = README.read_text()
    block = f"{README_BEGIN}\n{body}\n{README_END}"
    if README_BEGIN in readme and README_END in readme:
        head, rest = readme.split(README_BEGIN, 1)
        readme = head + block + rest.split(README_END, 1)[1]
    else:
        readme = readme.rstrip() + "\n\n" + block + "\n"
    README.write_text(readme)


# ----------------------------------------------------------------------------- main
async def run_all(args: argparse.Namespace) -> dict[str, Any]:
    run = Run()
    if args.profile:
        # From PATH, else beside this interpreter (the bench extra's venv, not activated).
        here = str(Path(sys.executable).parent)
        exe = args.py_spy or shutil.which("py-spy") or shutil.which("py-spy", path=here)
        if exe is None:
            print("profiles skipped: py-spy not found (pip install -e .[bench], or --py-spy PATH)")
        run.profiler = Profiler(exe, Path(args.json).parent / "profiles")
    info = machine()
    info["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]
    pg_admin = (
        args.postgres_url
        or os.environ.get("CONVEYOR_TEST_POSTGRES_URL")
        or "postgresql://postgres@127.0.0.1:5432/test"
    )
    _loopback(pg_admin)
    if args.redis_url:
        _loopback(args.redis_url)
    cache, why = (None, "peers skipped: --no-peers") if args.no_peers else peers_ready(args.peers)
    if why:
        print(why, flush=True)
        run.notes.append(why)
    if cache is not None:
        info["node"] = _cmd(["node", "--version"])
        for name in ("n8n", "bullmq"):
            pkg = cache / "node_modules" / name / "package.json"
            info[name] = orjson.loads(pkg.read_bytes())["version"]

    workdir = Path(tempfile.mkdtemp(prefix="conveyor-run-all-"))
    redis_proc = None
    if args.redis_url:
        base = args.redis_url
        info["redis_where"] = "given by --redis-url"
    else:
        redis_proc, base = start_redis(workdir)
        await soak.wait_redis(base)
        info["redis_where"] = "private redis-server, no persistence"
    redis_url = _with_db(base, DB)
    r = aioredis.Redis.from_url(redis_url)
    info["redis"] = (await r.info("server"))["redis_version"]
    await r.flushdb()
    dbname = f"conveyor_bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(pg_admin)
    info["postgres"] = await admin.fetchval("SHOW server_version")
    await admin.execute(f'CREATE DATABASE "{dbname}"')
    await admin.close()
    pg_url = urlunsplit(urlsplit(pg_admin)._replace(path=f"/{dbname}"))
    started = time.monotonic()
    print(
        f"run_all: {args.concurrency} clients, {args.duration:g} s per phase, "
        f"AP_WORKER_CONCURRENCY={args.worker_concurrency}, soak {args.soak_s:g} s, "
        f"queue {args.jobs:,} jobs; redis {info['redis']}, postgres {info['postgres']}; "
        f"load average {info['loadavg_start']}",
        flush=True,
    )
    try:
        if "conveyor" not in args.skip:
            await conveyor_phases(run, args, redis_url, pg_url, workdir)
        if cache is not None and "n8n" not in args.skip:
            await n8n_phases(run, args, cache, workdir)
        if "queue" not in args.skip:
            await queue_phases(run, args, redis_url, cache if "bullmq" not in args.skip else None)
    finally:
        await r.flushdb()
        await r.aclose()
        if redis_proc is not None:
            wh._stop(redis_proc)
        admin = await asyncpg.connect(pg_admin)
        await admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        await admin.close()
        shutil.rmtree(workdir, ignore_errors=True)
    info["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    run.figures["c"] = args.concurrency
    return {
        "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python bench/run_all.py " + " ".join(sys.argv[1:]),
        "total_s": round(time.monotonic() - started, 1),
        "machine": info,
        "config": {k: v for k, v in vars(args).items() if k not in ("json", "readme", "skip")},
        "targets": targets(run),
        "phases": run.phases,
        "figures": run.figures,
        "series": run.series,
        "notes": run.notes,
        "profiles": run.profiler.summaries,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: short phases, 20 s soak")
    parser.add_argument("--peers", action="store_true", help="install n8n and BullMQ if needed")
    parser.add_argument("--no-peers", action="store_true", help="leave the peers out")
    parser.add_argument("--concurrency", type=int, default=64, help="closed-loop clients (64)")
    parser.add_argument("--duration", type=float, help="seconds per HTTP phase (8; quick 2)")
    parser.add_argument("--warmup", type=float, help="seconds of warm-up per phase (2; quick 0.5)")
    parser.add_argument("--worker-concurrency", type=int, default=32)
    parser.add_argument("--drain-s", type=float, help="drain measuring window (8; quick 2)")
    parser.add_argument("--drain-rest-s", type=float, default=180, help="bound on the rest")
    parser.add_argument("--soak-s", type=float, help="sustained half load (600; quick 20)")
    parser.add_argument("--soak-sample-s", type=float, help="memory sampling period (5; quick 1)")
    parser.add_argument(
        "--soak-connections",
        type=int,
        default=128,
        help="keep-alive connections of the soak, all opened before its first sample (128)",
    )
    parser.add_argument("--idle-s", type=float, default=5.0, help="idle before the RSS reading")
    parser.add_argument("--jobs", type=int, help="queue phase jobs (50,000; quick 10,000)")
    parser.add_argument("--c", type=int, default=64, help="queue concurrency (64)")
    parser.add_argument("--redis-url", help="use this Redis (DB 14, flushed) instead of a private")
    parser.add_argument("--postgres-url", help="admin URL for the throwaway database")
    parser.add_argument(
        "--skip", default="", help="comma list of conveyor,n8n,queue,bullmq to leave out"
    )
    parser.add_argument("--json", default=str(RESULTS / "run_all.json"))
    parser.add_argument("--readme", action="store_true", help="write the table into README.md")
    parser.add_argument(
        "--profile", action="store_true", help="py-spy each Conveyor phase (bench/results/profiles)"
    )
    parser.add_argument("--py-spy", help="the py-spy executable (default: from PATH)")
    parser.add_argument("--note", help="a sentence about the conditions, kept with the table")
    parser.add_argument(
        "--from-json", help="measure nothing: table, plots (and --readme) from a saved run"
    )
    args = parser.parse_args()
    quick = args.quick
    for name, full, short in (
        ("duration", 8.0, 2.0),
        ("warmup", 2.0, 0.5),
        ("drain_s", 8.0, 2.0),
        ("soak_s", 600.0, 20.0),
        ("soak_sample_s", 5.0, 1.0),
        ("jobs", 50_000, 10_000),
    ):
        if getattr(args, name) is None:
            setattr(args, name, short if quick else full)
    args.skip = {x.strip() for x in args.skip.split(",") if x.strip()}
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        # Table, plots and README again from a saved run, measuring nothing.
        result = orjson.loads(Path(args.from_json).read_bytes())
        again = Run()
        again.phases, again.figures = result["phases"], result["figures"]
        if again.figures.get("soak"):
            again.figures["soak"]["flat"] = soak_flatness(again.figures["soak"]["memory"])
        result["targets"] = targets(again)
    else:
        result = uvloop.run(run_all(args))
    if args.note:
        result.setdefault("notes", []).append(args.note)
    if Path(args.from_json or "").resolve() != out.resolve():
        tmp = out.with_suffix(".json.tmp")
        tmp.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
        tmp.replace(out)
    images = plots(result, out.parent)
    text = markdown(result)
    print()
    print(text)
    print(f"\nJSON in {out}" + (f"; plots {', '.join(str(p) for p in images)}" if images else ""))
    if args.readme:
        update_readme(text, images)
        print(f"table and plots written into {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
