"""Sandbox overhead: code-step executions per second and p50/p99 latency, warm and fresh.

Run ``python bench/sandbox.py`` (as root with bubblewrap for the real configuration). It
measures, in one process and one run:

* **bare** — ``run(input)`` called in-process (compiled once), the floor;
* **warm** — ``Sandbox.run_code`` for the same flow version again and again (warm child);
* **fresh** — ``warm=False``: every execution in a never-used child, back to back (the
  spare children cannot keep up; this is the fork-server's fork rate);
* **fresh-paced** — the same at a steady 100 executions/s, where the spare is ready;
* **warm-2-slots** — two concurrent callers on a 2-slot sandbox (throughput).

Overhead is the sandbox's p50/p99 latency minus the bare call's p50. Latencies are the
worker's wall time for ``run_code`` (request encode, socket round trip, execution in the
child, cleanup, decode). ``--json PATH`` also writes the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from conveyor.sandbox import Sandbox, SandboxConfig

CODE = "def run(input):\n    return {'total': input['a'] + input['b']}\n"
INPUT = {"a": 20, "b": 22}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def bare(n: int) -> dict[str, Any]:
    ns: dict[str, Any] = {}
    exec(compile(CODE, "<bench>", "exec"), ns)
    fn = ns["run"]
    lat: list[float] = []
    start = time.perf_counter()
    for _ in range(n):
        t0 = time.perf_counter()
        fn(INPUT)
        lat.append((time.perf_counter() - t0) * 1e3)
    total = time.perf_counter() - start
    return {"n": n, "per_s": n / total, "p50": pct(lat, 0.5), "p99": pct(lat, 0.99)}


async def sequential(
    sb: Sandbox, n: int, *, fresh: bool, pace_s: float = 0.0, flow: str = "bench"
) -> dict[str, Any]:
    lat: list[float] = []
    loop = asyncio.get_running_loop()
    start = loop.time()
    for i in range(n):
        t0 = time.perf_counter()
        result = await sb.run_code(
            flow_id=flow,
            flow_version=i if fresh else 1,
            step="bench",
            code=CODE,
            input=INPUT,
            timeout_s=10,
        )
        lat.append((time.perf_counter() - t0) * 1e3)
        if result.output != {"total": 42}:
            raise RuntimeError(f"unexpected result: {result}")
        if pace_s:
            await asyncio.sleep(max(0.0, pace_s - (time.perf_counter() - t0)))
    total = loop.time() - start
    return {"n": n, "per_s": n / total, "p50": pct(lat, 0.5), "p99": pct(lat, 0.99)}


async def concurrent(sb: Sandbox, n: int, callers: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    start = loop.time()
    parts = await asyncio.gather(
        *(sequential(sb, n // callers, fresh=False, flow="bench") for _ in range(callers))
    )
    total = loop.time() - start
    lat_p50 = statistics.mean(p["p50"] for p in parts)
    lat_p99 = max(p["p99"] for p in parts)
    done = sum(p["n"] for p in parts)
    return {"n": done, "per_s": done / total, "p50": lat_p50, "p99": lat_p99}


async def main(args: argparse.Namespace) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    rows["bare"] = bare(args.n_warm)
    async with Sandbox(SandboxConfig(slots=1)) as sb:
        isolation = sb.isolation
        await sequential(sb, 200, fresh=False)  # warm-up
        rows["warm"] = await sequential(sb, args.n_warm, fresh=False)
    async with Sandbox(SandboxConfig(slots=1, warm=False)) as sb:
        await sequential(sb, 50, fresh=True)
        rows["fresh"] = await sequential(sb, args.n_fresh, fresh=True)
        rows["fresh-paced"] = await sequential(sb, min(args.n_fresh, 500), fresh=True, pace_s=0.01)
    async with Sandbox(SandboxConfig(slots=2)) as sb:
        await concurrent(sb, 400, 2)
        rows["warm-2-slots"] = await concurrent(sb, args.n_warm, 2)
    floor = rows["bare"]["p50"]
    for name, row in rows.items():
        row["overhead_p50"] = 0.0 if name == "bare" else row["p50"] - floor
        row["overhead_p99"] = 0.0 if name == "bare" else row["p99"] - floor
    return {
        "isolation": isolation,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "rows": rows,
    }


def render(report: dict[str, Any]) -> str:
    lines = [
        f"isolation: {report['isolation']['isolation']} ({report['isolation']['mechanism']})",
        f"python {report['python']}, {report['cpus']} CPUs",
        "",
        f"{'mode':<14}{'n':>7}{'exec/s':>10}{'p50 ms':>10}{'p99 ms':>10}"
        f"{'overhead p50':>14}{'overhead p99':>14}",
    ]
    for name, row in report["rows"].items():
        lines.append(
            f"{name:<14}{row['n']:>7}{row['per_s']:>10.0f}{row['p50']:>10.3f}{row['p99']:>10.3f}"
            f"{row['overhead_p50']:>14.3f}{row['overhead_p99']:>14.3f}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-warm", type=int, default=5000, help="warm executions")
    parser.add_argument("--n-fresh", type=int, default=1000, help="fresh-child executions")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    ns = parser.parse_args()
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        result = asyncio.run(main(ns))
    else:
        result = uvloop.run(main(ns))  # the production event loop
    print(render(result))
    if ns.json:
        ns.json.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
