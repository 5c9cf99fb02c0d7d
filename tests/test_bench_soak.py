"""bench/run_all.py's soak connections: a fixed set, all open before the first sample, every
one kept busy (the server's RSS follows the number of connections it has held, so a pool that
grew with each stall read as memory growth)."""

from __future__ import annotations

import importlib.util
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType

import pytest
from aiohttp import web

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def run_all() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_run_all", REPO / "bench" / "run_all.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_run_all"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
async def server() -> AsyncIterator[tuple[int, Counter[tuple[str, str]]]]:
    """A loopback server counting (peer, path) of every request."""
    seen: Counter[tuple[str, str]] = Counter()

    async def handle(request: web.Request) -> web.Response:
        seen[(str(request.transport.get_extra_info("peername")), request.path)] += 1
        return web.Response(status=202 if request.method == "POST" else 200, text="ok")

    app = web.Application()
    app.router.add_get("/healthz", handle)
    app.router.add_post("/hook", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield port, seen
    finally:
        await runner.cleanup()


async def test_all_connections_open_before_the_load(
    run_all: ModuleType, server: tuple[int, Counter[tuple[str, str]]]
) -> None:
    port, seen = server
    pool = run_all._SoakPool(port, 8)
    await pool.open_all()
    try:
        assert pool.open == 8
        assert len(pool.idle) == 8
        peers = {peer for peer, path in seen if path == "/healthz"}
        assert len(peers) == 8  # eight connections, one GET /healthz each
    finally:
        pool.close()


async def test_requests_go_round_the_connections_and_never_open_more(
    run_all: ModuleType, server: tuple[int, Counter[tuple[str, str]]]
) -> None:
    port, seen = server
    pool = run_all._SoakPool(port, 4)
    await pool.open_all()
    request = run_all.wh.build_request(port, "/hook")
    try:
        for _ in range(12):  # one at a time: a LIFO pool would use one connection throughout
            conn = await pool.acquire()
            assert await conn.request(request) == 202
            pool.release(conn)
        hooks = Counter({peer: n for (peer, path), n in seen.items() if path == "/hook"})
        assert sorted(hooks.values()) == [3, 3, 3, 3]  # oldest idle first: none sits idle
        assert pool.open == 4
    finally:
        pool.close()


def _samples(
    redis: list[float], *, drained: float | None, queued: list[int]
) -> list[dict[str, float | str]]:
    out: list[dict[str, float | str]] = [
        {
            "t": 10.0 * i,
            "phase": "load",
            "rss_mb": 80.0,
            "tree_pss_mb": 150.0,
            "redis_used_mb": mb + 5.0,
            "redis_log_mb": 5.0,
            "queue_entries": q,
        }
        for i, (mb, q) in enumerate(zip(redis, queued, strict=True))
    ]
    if drained is not None:
        last = {**out[-1], "t": 10.0 * len(redis), "phase": "drained", "queue_entries": 0}
        out.append({**last, "redis_used_mb": drained + 9.0, "redis_log_mb": 9.0})
    return out


def test_redis_is_judged_with_the_queue_empty(run_all: ModuleType) -> None:
    # A backlog during the load (the worker behind on a shared host) raises used_memory; once
    # drained, nothing of it is left: flat. The series alone read it as growth.
    backlog = _samples(
        [1.0 + i for i in range(20)], drained=1.3, queued=[1000 * i for i in range(20)]
    )
    flat = run_all.soak_flatness(backlog)
    assert flat["redis_used_mb"]["flat"] is False
    assert flat["redis_drained_mb"]["flat"] is True
    assert flat["redis_drained_mb"]["queue_entries_max"] == 19_000
    # What the runs leave behind stays after the drain: not flat.
    leak = _samples([1.0 + i for i in range(20)], drained=12.0, queued=[0] * 20)
    assert run_all.soak_flatness(leak)["redis_drained_mb"]["flat"] is False
    # The drain's samples are not part of the load's series.
    tail = [{**backlog[-2], "t": 500.0 + i, "phase": "drain", "rss_mb": 200.0} for i in range(5)]
    assert run_all.soak_flatness(backlog[:-1] + tail + backlog[-1:])["rss_mb"]["flat"] is True
