"""What the HA tests drive through a failure: `conveyor up`, a flow, open-loop webhook load,
and the invariants checked at the end against PostgreSQL (the source of truth).

Invariants: every webhook answered 202 has exactly one run row, and that run ends SUCCEEDED
(the flow cannot fail) with each step recorded exactly once; no run of the flow is left live.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from conveyor.status import TERMINAL
from tests.polling import eventually

TERMINAL_VALUES = [s.value for s in TERMINAL]
STEPS = ("echo", "pause")

#: Two cheap steps; the short in-worker delay keeps runs in flight when a server dies.
FLOW: dict[str, Any] = {
    "name": "ha-load",
    "trigger": {"type": "webhook"},
    "steps": [
        {"name": "echo", "type": "transform", "input": {"n": "{{trigger.body.n}}"}},
        {"name": "pause", "type": "delay", "input": {"seconds": 0.2}},
    ],
}


class Conveyor:
    """`python -m conveyor up` with ``env`` on ``port``, its output kept in ``log``."""

    def __init__(self, env: dict[str, str], port: int, log: Path) -> None:
        self.env = env
        self.port = port
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, timeout_s: float = 30.0) -> None:
        with self.log.open("ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "conveyor", "up", env=self.env,
                stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
            )  # fmt: skip
        async with aiohttp.ClientSession() as http:

            async def ready() -> bool:
                assert self.proc is not None and self.proc.returncode is None, "exited"
                async with http.get(f"{self.base}/readyz") as r:
                    return r.status == 200

            try:
                await eventually(
                    ready, timeout_s=timeout_s, interval_s=0.1, ignore=(aiohttp.ClientError,)
                )
                return
            except AssertionError:
                pass
        await self.kill()
        raise AssertionError(f"conveyor up did not become ready:\n{self.tail()}")

    async def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM and wait for the drain; returns the exit code (None: killed after timeout)."""
        if self.proc is None or self.proc.returncode is not None:
            return self.proc.returncode if self.proc else None
        self.proc.terminate()
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout_s)
        except TimeoutError:
            await self.kill()
            return None

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    async def create_flow(self, flow: dict[str, Any] = FLOW) -> str:
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{self.base}/api/v1/flows", json=flow) as r,
        ):
            assert r.status == 201, await r.text()
            return str((await r.json())["id"])


@dataclass
class Load:
    """Open-loop async webhooks to ``flow_id`` at ``rate_per_s`` until :meth:`stop`.

    ``accepted`` maps each 202's run id to when it was accepted (monotonic seconds);
    ``refused`` counts other statuses; ``errors`` counts requests with no answer at all.
    """

    base: str
    flow_id: str
    rate_per_s: float = 40.0
    max_in_flight: int = 50
    accepted: dict[str, float] = field(default_factory=dict)
    refused: Counter[int] = field(default_factory=Counter)
    errors: int = 0
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=15)
        slots = asyncio.Semaphore(self.max_in_flight)
        tasks: set[asyncio.Task[None]] = set()
        async with aiohttp.ClientSession(timeout=timeout) as http:
            n = 0
            start = time.monotonic()
            while not self._stop.is_set():
                await slots.acquire()
                task = asyncio.create_task(self._one(http, n, slots))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                n += 1
                delay = start + n / self.rate_per_s - time.monotonic()
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), delay)
            if tasks:
                await asyncio.gather(*tasks)

    async def _one(self, http: aiohttp.ClientSession, n: int, slots: asyncio.Semaphore) -> None:
        try:
            url = f"{self.base}/api/v1/webhooks/{self.flow_id}"
            async with http.post(url, json={"n": n}) as r:
                if r.status == 202:
                    self.accepted[(await r.json())["run_id"]] = time.monotonic()
                else:
                    self.refused[r.status] += 1
        except (aiohttp.ClientError, TimeoutError):
            self.errors += 1
        finally:
            slots.release()

    def summary(self) -> str:
        return f"accepted={len(self.accepted)} refused={dict(self.refused)} no_answer={self.errors}"


async def wait_terminal(
    postgres_url: str, flow_id: str, accepted: int, timeout_s: float
) -> tuple[int, float]:
    """Wait until the flow has at least ``accepted`` runs and none is live; returns the number
    of terminal runs and how long it took (raises with the counts on timeout)."""
    start = time.monotonic()
    conn = await asyncpg.connect(postgres_url)
    counts = [0, 0]

    async def settled() -> bool:
        counts[:] = await conn.fetchrow(
            """SELECT count(*), count(*) FILTER (WHERE status = ANY($2::text[]))
               FROM runs WHERE flow_id = $1::uuid""",
            flow_id,
            TERMINAL_VALUES,
        )
        return counts[0] >= accepted and counts[1] == counts[0]

    try:
        try:
            await eventually(settled, timeout_s=timeout_s, interval_s=0.25)
        except AssertionError:
            total, done = counts
            raise AssertionError(
                f"after {timeout_s} s: {done}/{total} runs terminal, {accepted} accepted"
            ) from None
        return int(counts[1]), time.monotonic() - start
    finally:
        await conn.close()


async def check_runs(postgres_url: str, flow_id: str, accepted: set[str]) -> None:
    """Every accepted run exists once, SUCCEEDED, each step recorded exactly once; no run of
    the flow is live."""
    conn = await asyncpg.connect(postgres_url)
    try:
        rows = await conn.fetch(
            "SELECT id::text AS id, status FROM runs WHERE flow_id = $1::uuid", flow_id
        )
        steps = await conn.fetch(
            """SELECT s.run_id::text AS run_id, s.name, count(*) AS n
               FROM step_runs s JOIN runs r ON r.id = s.run_id
               WHERE r.flow_id = $1::uuid GROUP BY s.run_id, s.name""",
            flow_id,
        )
    finally:
        await conn.close()
    status = {r["id"]: r["status"] for r in rows}
    missing = accepted - status.keys()
    assert not missing, f"{len(missing)} accepted runs have no row, e.g. {sorted(missing)[:3]}"
    live = {i: s for i, s in status.items() if s not in TERMINAL_VALUES}
    assert not live, f"{len(live)} runs still live: {list(live.items())[:3]}"
    not_ok = {i: status[i] for i in accepted if status[i] != "SUCCEEDED"}
    assert not not_ok, f"{len(not_ok)} accepted runs did not succeed: {list(not_ok.items())[:3]}"
    recorded: dict[str, Counter[str]] = {}
    for s in steps:
        recorded.setdefault(s["run_id"], Counter())[s["name"]] += int(s["n"])
    wrong = {i: dict(recorded.get(i, {})) for i in accepted if recorded.get(i) != Counter(STEPS)}
    assert not wrong, f"{len(wrong)} runs do not have each step once: {list(wrong.items())[:3]}"


async def slowest_runs(postgres_url: str, flow_id: str, *edges: float) -> list[float]:
    """The longest accept-to-finish time (s) of the runs created in each window between the
    wall-clock ``edges`` (and after the last one): where a failure left runs waiting."""
    conn = await asyncpg.connect(postgres_url)
    try:
        rows = await conn.fetch(
            """SELECT extract(epoch FROM created_at) AS created,
                      extract(epoch FROM finished_at - created_at) AS took
               FROM runs WHERE flow_id = $1::uuid""",
            flow_id,
        )
    finally:
        await conn.close()
    bounds = [*edges, float("inf")]
    out = [0.0] * len(edges)
    for r in rows:
        for i in range(len(edges)):
            if bounds[i] <= float(r["created"]) < bounds[i + 1]:
                out[i] = max(out[i], float(r["took"]))
    return out
