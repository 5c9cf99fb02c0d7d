"""A small Conveyor deployment for fault tests: real `conveyor up` processes (APP, WORKERs) on
a private Redis (and a database the test owns), an HTTP endpoint the flows call, and the
end-of-test invariants.

The endpoint records every call with its ``Idempotency-Key`` (``{run_id}:{step}``) and holds
the *first* call of each key for ``hold`` seconds, so a run is caught mid-step when a process
is killed and its redelivery shows up as a second call of the same key.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import psutil
import redis.asyncio as aioredis
from aiohttp import web

from conveyor.queue import QueueAdmin, QueueConfig
from conveyor.status import TERMINAL
from tests.polling import eventually
from tests.processes import conveyor_env, free_port

TERMINAL_VALUES = frozenset(s.value for s in TERMINAL)


class Endpoint:
    """The HTTP service the flows call, on a loopback port."""

    def __init__(self) -> None:
        self.calls: dict[str, list[float]] = {}
        self.port = free_port()
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/step", self._step)
        # Held calls of a killed worker end with its connection, not after the hold.
        self._runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0
        )
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _step(self, request: web.Request) -> web.Response:
        key = request.headers.get("Idempotency-Key", "")
        seen = self.calls.setdefault(key, [])
        seen.append(time.monotonic())
        if len(seen) == 1:
            # The step's own work: the first call is held so runs are mid-step on cue.
            await asyncio.sleep(float(request.query.get("hold", "0")))
        return web.json_response({"ok": True})

    def url(self, hold_s: float) -> str:
        return f"http://127.0.0.1:{self.port}/step?hold={hold_s}"

    def first_calls(self, n: int) -> int:
        """How many keys were called at least ``n`` times."""
        return sum(1 for times in self.calls.values() if len(times) >= n)


def flow(endpoint: Endpoint, hold_s: float, name: str = "fault") -> dict[str, Any]:
    """A webhook flow: one held http call, then a transform (two checkpoints per run)."""
    return {
        "name": name,
        "trigger": {"type": "webhook"},
        "steps": [
            {"name": "call", "type": "http", "input": {"url": endpoint.url(hold_s)}},
            {"name": "done", "type": "transform", "input": {"n": "{{trigger.body.n}}"}},
        ],
    }


@dataclass
class Role:
    """One `conveyor up` process and the file its log goes to."""

    proc: asyncio.subprocess.Process
    port: int
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_lines(self) -> int:
        return len(self.log.read_bytes().splitlines()) if self.log.exists() else 0

    def log_size(self) -> int:
        """The log's length in bytes now: a mark for :meth:`logged`'s ``since``."""
        return self.log.stat().st_size if self.log.exists() else 0

    def logged(self, event: str, *, since: int = 0) -> bool:
        """Whether a line of the log after byte ``since`` names ``event`` (e.g.
        ``backend.unavailable``)."""
        return self.log.exists() and event.encode() in self.log.read_bytes()[since:]

    def cpu_s(self) -> float:
        times = psutil.Process(self.pid).cpu_times()
        return float(times.user + times.system)


@dataclass
class Deployment:
    """APP and WORKER processes sharing ``redis_url`` and ``postgres_url``."""

    directory: Path
    redis_url: str
    postgres_url: str
    env: dict[str, str] = field(default_factory=dict)
    roles: list[Role] = field(default_factory=list)
    _children: set[int] = field(default_factory=set)

    async def start(self, role: str, **extra: str) -> Role:
        port = free_port()
        port_var = "AP_PORT" if role == "APP" else "AP_METRICS_PORT"
        ap = {
            "AP_CONTAINER_TYPE": role,
            "AP_SSRF_ALLOW_LIST": "127.0.0.1",
            "AP_WORKER_CONCURRENCY": "4",
            "AP_REDIS_COMPLETED_JOB_RETENTION_MAX_COUNT": "100000",
            port_var: str(port),
        }
        env = conveyor_env(self.postgres_url, self.redis_url, **{**ap, **self.env, **extra})
        log = self.directory / f"{role.lower()}-{len(self.roles)}.log"
        sink = log.open("wb")  # the child keeps its own descriptor
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "conveyor", "up",
                env=env, stdout=asyncio.subprocess.DEVNULL, stderr=sink,
            )  # fmt: skip
        finally:
            sink.close()
        started = Role(proc, port, log)
        self.roles.append(started)
        await wait_ready(started)
        self._children.update(c.pid for c in psutil.Process(proc.pid).children(recursive=True))
        return started

    async def kill_all(self) -> None:
        for r in self.roles:
            if r.proc.returncode is None:
                r.proc.send_signal(signal.SIGKILL)
            await r.proc.wait()

    async def leftovers(self, grace_s: float = 10.0) -> list[int]:
        """Pids of any started process (or a child it had once ready) still alive after
        ``grace_s`` (children see their parent die a moment later)."""

        def alive() -> list[int]:
            pids = [r.pid for r in self.roles if r.proc.returncode is None]
            return pids + [pid for pid in self._children if _running(pid)]

        with contextlib.suppress(AssertionError):
            await eventually(lambda: not alive(), timeout_s=grace_s, interval_s=0.1)
        return alive()


async def wait_ready(role: Role, timeout_s: float = 60.0) -> None:
    """Until ``/readyz`` on the role's port answers 200."""
    async with aiohttp.ClientSession() as http:

        async def ready() -> bool:
            if role.proc.returncode is not None:
                raise AssertionError(f"conveyor exited: {role.log.read_text()[-2000:]}")
            try:
                async with http.get(f"http://127.0.0.1:{role.port}/readyz") as r:
                    return r.status == 200
            except aiohttp.ClientError:
                return False

        try:
            await eventually(ready, timeout_s=timeout_s, interval_s=0.1, what="/readyz 200")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {role.log.read_text()[-2000:]}") from None


async def create_flow(app: Role, document: dict[str, Any]) -> str:
    url = f"http://127.0.0.1:{app.port}/api/v1/flows"
    async with aiohttp.ClientSession() as http, http.post(url, json=document) as r:
        assert r.status == 201, await r.text()
        return str((await r.json())["id"])


async def post_runs(app: Role, flow_id: str, n: int) -> list[str]:
    """``n`` async webhooks; returns the accepted run ids."""
    ids = []
    async with aiohttp.ClientSession() as http:
        for i in range(n):
            url = f"http://127.0.0.1:{app.port}/api/v1/webhooks/{flow_id}"
            async with http.post(url, json={"n": i}) as r:
                assert r.status == 202, await r.text()
                ids.append((await r.json())["run_id"])
    return ids


async def statuses(postgres_url: str, run_ids: list[str]) -> dict[str, str]:
    conn = await asyncpg.connect(postgres_url)
    try:
        rows = await conn.fetch(
            "SELECT id, status FROM runs WHERE id = ANY($1::uuid[])",
            [uuid.UUID(r) for r in run_ids],
        )
    finally:
        await conn.close()
    return {str(r["id"]): r["status"] for r in rows}


async def all_terminal(postgres_url: str, run_ids: list[str]) -> bool:
    found = await statuses(postgres_url, run_ids)
    return len(found) == len(run_ids) and all(s in TERMINAL_VALUES for s in found.values())


async def check_invariants(
    postgres_url: str, run_ids: list[str], endpoint: Endpoint, deployment: Deployment
) -> None:
    """Every accepted run SUCCEEDED; no step checkpointed twice (a checkpointed step never ran
    again); the endpoint saw each run's call at most once per delivery; no process left."""
    conn = await asyncpg.connect(postgres_url)
    try:
        runs = await conn.fetch(
            "SELECT id, status, attempt FROM runs WHERE id = ANY($1::uuid[])",
            [uuid.UUID(r) for r in run_ids],
        )
        twice = await conn.fetch(
            "SELECT run_id, name, count(*) AS n FROM step_runs WHERE run_id = ANY($1::uuid[])"
            " GROUP BY run_id, name HAVING count(*) > 1",
            [uuid.UUID(r) for r in run_ids],
        )
        steps = await conn.fetchval(
            "SELECT count(*) FROM step_runs WHERE run_id = ANY($1::uuid[])",
            [uuid.UUID(r) for r in run_ids],
        )
    finally:
        await conn.close()
    assert len(runs) == len(run_ids)
    assert {r["status"] for r in runs} == {"SUCCEEDED"}, [dict(r) for r in runs]
    # Acknowledgements held back by an outage go out on the batcher's next retry.
    done: list[str] = []

    async def acknowledged() -> bool:
        done[:] = await completed_jobs(deployment.redis_url)
        return set(run_ids) <= set(done)

    await eventually(
        acknowledged, timeout_s=30, interval_s=0.1, what="every run's job acknowledged"
    )
    assert len(done) == len(set(done)), "a job completed twice in the queue's log"
    assert twice == [], [dict(r) for r in twice]
    assert steps == 2 * len(run_ids)
    for r in runs:
        calls = len(endpoint.calls.get(f"{r['id']}:call", []))
        assert 1 <= calls <= max(1, r["attempt"]), (str(r["id"]), calls, r["attempt"])
    await deployment.kill_all()
    assert await deployment.leftovers() == []


async def completed_jobs(redis_url: str) -> list[str]:
    """Every job id in the queue's completed log (each acknowledgement logs one)."""
    client = aioredis.Redis.from_url(redis_url)
    admin = QueueAdmin(client, QueueConfig(completed_retention_max_count=100_000))
    ids: list[str] = []
    try:
        for queue in ("runs", "sync"):
            cursor = None
            while True:
                page, cursor = await admin.list_jobs(queue, "completed", limit=1000, cursor=cursor)
                ids += [j.id for j in page]
                if cursor is None or not page:
                    break
    finally:
        await client.aclose()
    return ids


def cpu_share(role: Role, window_s: float) -> Callable[[], Any]:
    """A coroutine factory measuring ``role``'s CPU use (1.0 = one core) over ``window_s``."""

    async def measure() -> float:
        before, t0 = role.cpu_s(), time.monotonic()
        await asyncio.sleep(window_s)  # the measurement window: the time is what is measured
        return (role.cpu_s() - before) / (time.monotonic() - t0)

    return measure


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
