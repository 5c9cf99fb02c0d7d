"""Queue benchmark: Conveyor's Redis Streams queue against saq and a raw XREADGROUP loop.

Run with no arguments: N = 50,000 no-op jobs, concurrency C = 64, Redis from
``CONVEYOR_TEST_REDIS_URL``, else 127.0.0.1:6379, else an embedded server; DB 14 (``--db``, or
``BENCH_REDIS_DB``), flushed before every phase. In one process and one uvloop event loop it
measures

* Conveyor enqueue: N concurrent ``Producer.enqueue`` calls (coalesced into pipelined scripts);
* Conveyor process: one ``Consumer`` at concurrency C draining the N jobs (burst mode);
* raw: a consume-only loop over a pre-filled stream, ``XREADGROUP COUNT C`` + ``XACK`` of each
  batch, with nothing else (the ceiling for any Python consumer on this client);
* saq: the same N no-op jobs through one saq ``Worker`` at concurrency C.

It prints a table (with this process's and the Redis server's CPU µs per job of each Conveyor
and raw phase; Redis's is the whole server's, so other clients add to it); its last two lines
are exactly ``ratio: R.Rx saq`` and ``ratio: P% of raw`` (Conveyor process throughput over
saq's, and over the raw loop's). ``--json PATH`` also writes the figures as JSON.
"""

# ruff: noqa: E402
from __future__ import annotations

import sys
from pathlib import Path

# This file is named queue.py and Python puts its directory first on sys.path, where it would
# shadow the standard library's ``queue`` (which redis-py imports): use the repository instead.
_BENCH_DIR = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH_DIR]
sys.path.insert(0, str(_BENCH_DIR.parent))

import argparse
import asyncio
import os
import shutil
import socket
import tempfile
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson
import redis.asyncio as aioredis
import uvloop
from saq import Queue, Worker

from conveyor.embedded import EmbeddedRedis
from conveyor.queue import Consumer, Job, Producer, QueueConfig

DB = int(os.environ.get("BENCH_REDIS_DB") or 14)
ENQUEUE_WINDOW = 2000  # concurrent enqueue() calls in flight, like a busy ingest process


def _with_db(url: str, db: int) -> str:
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return urlunsplit(parts._replace(query=f"db={db}"))
    return urlunsplit(parts._replace(path=f"/{db}"))


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def pick_redis(explicit: str | None, db: int = DB) -> tuple[str, Any]:
    """(url on DB ``db``, embedded server to stop or None)."""
    if explicit:
        return _with_db(explicit, db), None
    env = os.environ.get("CONVEYOR_TEST_REDIS_URL")
    if env:
        return _with_db(env, db), None
    if _reachable("127.0.0.1", 6379):
        return f"redis://127.0.0.1:6379/{db}", None
    server = EmbeddedRedis(Path(tempfile.mkdtemp(prefix="conveyor-bench-")) / "redis")
    return _with_db(server.start(), db), server


async def _noop(job: Job) -> None:
    return None


class _Cpu:
    """CPU seconds of this process and of the Redis server over a phase (``INFO cpu``)."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self.own = self.redis = 0.0

    async def _redis_cpu(self) -> float:
        info = await self.client.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    async def start(self) -> None:
        self.redis = await self._redis_cpu()
        self.own = time.process_time()

    async def stop(self) -> tuple[float, float]:
        own = time.process_time() - self.own
        return own, await self._redis_cpu() - self.redis


CPU: dict[str, tuple[float, float]] = {}  # phase -> (own CPU s, Redis CPU s)


async def bench_conveyor(
    client: aioredis.Redis, n: int, c: int, *, progress: list[int] | None = None
) -> tuple[float, float]:
    """(enqueue seconds, process seconds); ``progress[0]`` follows the jobs processed."""
    await client.flushdb()
    cfg = QueueConfig(concurrency=c, max_length=max(100_000, n))
    producer = Producer(client, cfg)
    payload = {"flow_id": "bench", "trigger": {"n": 0}}
    cpu = _Cpu(client)
    await cpu.start()
    t0 = time.perf_counter()
    for start in range(0, n, ENQUEUE_WINDOW):
        await asyncio.gather(
            *(
                producer.enqueue("runs", payload, job_id=f"job-{i}")
                for i in range(start, min(n, start + ENQUEUE_WINDOW))
            )
        )
    enqueue_s = time.perf_counter() - t0
    CPU["conveyor enqueue"] = await cpu.stop()
    consumer = Consumer(client, _noop, cfg, queues=["runs"])
    watch = None
    if progress is not None:

        async def follow() -> None:
            while True:
                progress[0] = consumer.processed
                await asyncio.sleep(0.05)

        watch = asyncio.ensure_future(follow())
    await cpu.start()
    t0 = time.perf_counter()
    done = await consumer.drain()
    process_s = time.perf_counter() - t0
    CPU["conveyor process"] = await cpu.stop()
    if watch is not None:
        watch.cancel()
        progress[0] = consumer.processed
    if done != n or consumer.processed != n:
        raise SystemExit(f"conveyor processed {consumer.processed} of {n}")
    return enqueue_s, process_s


async def bench_raw(
    client: aioredis.Redis, n: int, c: int, *, progress: list[int] | None = None
) -> float:
    """Seconds for the raw loop to read and acknowledge ``n`` pre-filled entries."""
    await client.flushdb()
    stream, group = b"bench:raw", b"g"
    payload = orjson.dumps({"flow_id": "bench", "trigger": {"n": 0}})
    for start in range(0, n, 5000):
        pipe = client.pipeline(transaction=False)
        for i in range(start, min(n, start + 5000)):
            pipe.xadd(stream, {b"i": f"job-{i}".encode(), b"p": payload})
        await pipe.execute()
    await client.xgroup_create(stream, group, id="0")
    seen = 0
    cpu = _Cpu(client)
    await cpu.start()
    t0 = time.perf_counter()
    while True:
        reply = await client.xreadgroup(group, b"raw", {stream: b">"}, count=c)
        if not reply or not reply[0][1]:
            break
        entries = reply[0][1]
        seen += len(entries)
        await client.xack(stream, group, *[eid for eid, _ in entries])
        if progress is not None:
            progress[0] = seen
    elapsed = time.perf_counter() - t0
    CPU["raw XREADGROUP+XACK"] = await cpu.stop()
    if seen != n:
        raise SystemExit(f"raw loop read {seen} of {n}")
    return elapsed


async def bench_saq(url: str, client: aioredis.Redis, n: int, c: int) -> tuple[float, float]:
    await client.flushdb()
    queue = Queue.from_url(url)
    await queue.connect()
    finished = asyncio.Event()
    count = 0

    async def noop(ctx: Any) -> None:
        nonlocal count
        count += 1
        if count >= n:
            finished.set()

    t0 = time.perf_counter()
    for start in range(0, n, ENQUEUE_WINDOW):
        await asyncio.gather(
            *(queue.enqueue("noop", key=f"job-{i}") for i in range(start, min(n, start + 2000)))
        )
    enqueue_s = time.perf_counter() - t0
    worker = Worker(queue, functions=[("noop", noop)], concurrency=c)
    t0 = time.perf_counter()
    task = asyncio.ensure_future(worker.start())
    await finished.wait()
    process_s = time.perf_counter() - t0
    await worker.stop()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await queue.disconnect()
    return enqueue_s, process_s


async def main(args: argparse.Namespace) -> dict[str, Any]:
    url, embedded = pick_redis(args.url, args.db)
    client = aioredis.Redis.from_url(url, decode_responses=False)
    try:
        info = await client.info("server")
        n, c = args.n, args.c
        print(f"# queue bench: N={n} C={c} redis {info['redis_version']} at {url}")
        print(f"# python {sys.version.split()[0]}, {os.cpu_count()} cpus, uvloop")
        enq_s, proc_s = await bench_conveyor(client, n, c)
        raw_s = await bench_raw(client, n, c)
        saq = None if args.skip_saq else await bench_saq(url, client, n, c)
        await client.flushdb()
    finally:
        await client.aclose()
        if embedded is not None:
            embedded.stop()
            shutil.rmtree(embedded.data_dir.parent, ignore_errors=True)

    rows = [
        ("conveyor enqueue", n, enq_s),
        ("conveyor process", n, proc_s),
        ("raw XREADGROUP+XACK", n, raw_s),
    ]
    if saq is not None:
        rows += [("saq enqueue", n, saq[0]), ("saq process", n, saq[1])]
    print(f"{'phase':<22} {'jobs':>8} {'seconds':>9} {'jobs/s':>10} {'µs/job':>7} {'redis':>6}")
    for name, jobs, secs in rows:
        own, red = CPU.get(name, (float("nan"), float("nan")))
        print(
            f"{name:<22} {jobs:>8} {secs:>9.3f} {jobs / secs:>10.0f}"
            f" {1e6 * own / jobs:>7.2f} {1e6 * red / jobs:>6.2f}"
        )
    conveyor_rate = n / proc_s
    saq_ratio = conveyor_rate / (n / saq[1]) if saq is not None else float("nan")
    raw_pct = 100 * conveyor_rate / (n / raw_s)
    print(f"ratio: {saq_ratio:.1f}x saq")
    print(f"ratio: {raw_pct:.0f}% of raw")
    return {
        "n": n,
        "c": c,
        "redis_url": url,
        "rows": [
            {
                "phase": r[0],
                "jobs": r[1],
                "seconds": r[2],
                "cpu_us_per_job": 1e6 * CPU[r[0]][0] / r[1] if r[0] in CPU else None,
                "redis_cpu_us_per_job": 1e6 * CPU[r[0]][1] / r[1] if r[0] in CPU else None,
            }
            for r in rows
        ],
        "ratio_saq": saq_ratio,
        "pct_of_raw": raw_pct,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=50_000, help="jobs per phase (50,000)")
    parser.add_argument("--c", type=int, default=64, help="consumer concurrency (64)")
    parser.add_argument("--url", help="Redis URL (DB index replaced by --db)")
    parser.add_argument(
        "--db",
        type=int,
        default=DB,
        help="Redis DB, flushed before every phase (BENCH_REDIS_DB, else 14)",
    )
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--skip-saq", action="store_true", help="leave saq out (quick runs)")
    cli = parser.parse_args()
    result = uvloop.run(main(cli))
    if cli.json:
        Path(cli.json).write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
