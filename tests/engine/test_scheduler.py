"""The scheduler: one leader fires each cron tick once, against real Redis and PostgreSQL.

Most tests drive :meth:`Scheduler.run_once` with an injected clock on whole seconds, so which
ticks fire is deterministic; two tests run the real loop on a per-second cron and wait (with a
generous bound, never a timed assertion) for runs to appear.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer

from conveyor.app import create_app
from conveyor.engine.flow import Trigger, load_document, parse_flow
from conveyor.engine.schedule import next_fire, tick_id
from conveyor.engine.scheduler import Scheduler, latest_tick
from conveyor.ids import uuid7
from conveyor.queue import Producer, QueueConfig
from conveyor.queue import keys as k
from conveyor.store import flows as flow_store
from conveyor.store.db import Database
from conveyor.store.runs import NewRun, RunWriter
from tests.api.conftest import make_settings
from tests.polling import eventually

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
EVERY_SECOND = "* * * * * *"  # croniter's optional sixth field is seconds


class Clock:
    """A settable clock for the scheduler (aware UTC)."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


def _base() -> datetime:
    """A whole second safely after every flow's creation time (ticks count from there)."""
    return datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=10)


def _doc(name: str, cron: str = EVERY_SECOND, tz: str = "UTC") -> dict[str, Any]:
    return parse_flow(
        {
            "name": name,
            "trigger": {"type": "schedule", "cron": cron, "timezone": tz},
            "steps": [{"name": "stamp", "type": "transform", "input": {"at": "{{trigger.body}}"}}],
        }
    ).to_document()


async def _flow(db: Database, name: str = "tick", cron: str = EVERY_SECOND) -> uuid.UUID:
    return (await flow_store.create_flow(db, name, _doc(name, cron))).id


async def _runs(db: Database, flow_id: uuid.UUID) -> list[dict[str, Any]]:
    async with db.writer() as conn:
        rows = await conn.fetch(
            "SELECT id, status, trigger, idempotency_key, flow_version FROM runs "
            "WHERE flow_id = $1 ORDER BY idempotency_key",
            flow_id,
        )
    return [dict(r) for r in rows]


async def _jobs(redis: aioredis.Redis) -> list[dict[str, Any]]:
    entries = await redis.xrange(k.ShardKeys("runs", 0).stream)
    return [orjson.loads(fields[b"p"]) for _, fields in entries]


@pytest.fixture
async def make_scheduler(
    db: Database, redis: aioredis.Redis
) -> AsyncIterator[Callable[..., Awaitable[Scheduler]]]:
    """Schedulers with their own writer and producer (like separate processes); closed after."""
    made: list[tuple[Scheduler, RunWriter, Producer]] = []

    async def build(clock: Clock, **kwargs: Any) -> Scheduler:
        writer = RunWriter(db)
        producer = Producer(redis, QueueConfig())
        kwargs.setdefault("refresh_s", 0.0)
        sched = Scheduler(db, writer, producer, redis, clock=clock, **kwargs)
        made.append((sched, writer, producer))
        return sched

    yield build
    for sched, writer, producer in made:
        await sched.close()
        await producer.close()
        await writer.close()


async def test_nightly_report_example_next_tick_in_berlin() -> None:
    """nightly-report.yaml is valid; 02:00 Berlin is 01:00 UTC in winter, 00:00 in summer."""
    flow = parse_flow(load_document((EXAMPLES / "nightly-report.yaml").read_bytes(), None))
    assert flow.trigger.type == "schedule" and flow.trigger.timezone == "Europe/Berlin"
    winter = next_fire(flow.trigger, datetime(2026, 1, 10, 12, 0, tzinfo=UTC))
    assert winter == datetime(2026, 1, 11, 1, 0, tzinfo=UTC)
    summer = next_fire(flow.trigger, datetime(2026, 7, 10, 12, 0, tzinfo=UTC))
    assert summer == datetime(2026, 7, 11, 0, 0, tzinfo=UTC)


def test_latest_tick_includes_a_tick_exactly_now() -> None:
    """latest_tick is the last tick at or before now, computed in the trigger's zone."""
    trig = Trigger(type="schedule", cron="0 9 * * *", timezone="Europe/Paris")
    at_tick = datetime(2026, 1, 10, 8, 0, tzinfo=UTC)
    assert latest_tick(trig, at_tick) == at_tick
    assert latest_tick(trig, at_tick - timedelta(seconds=1)) == at_tick - timedelta(days=1)


async def test_tick_commits_run_then_enqueues_job(
    db: Database, redis: aioredis.Redis, make_scheduler: Any
) -> None:
    """A fired tick is a QUEUED run with a SCHEDULE trigger and a runs-queue job of the same run."""
    fid = await _flow(db)
    clock = Clock(_base())
    sched = await make_scheduler(clock)
    await sched.run_once()
    (run,) = await _runs(db, fid)
    assert run["status"] == "QUEUED"
    assert run["idempotency_key"] == tick_id(str(fid), clock.now)
    assert run["trigger"] == {
        "method": "SCHEDULE",
        "headers": {},
        "query": {},
        "body": {"scheduled_at": clock.now.isoformat(), "cron": EVERY_SECOND, "timezone": "UTC"},
    }
    assert await _jobs(redis) == [
        {"run_id": str(run["id"]), "flow_id": str(fid), "version": 1, "trigger": run["trigger"]}
    ]


async def test_only_one_scheduler_holds_the_lease(db: Database, make_scheduler: Any) -> None:
    """Of two schedulers sharing the lease, one leads and the tick fires once."""
    fid = await _flow(db)
    clock = Clock(_base())
    a, b = await make_scheduler(clock), await make_scheduler(clock)
    await a.run_once()
    await b.run_once()
    assert a.is_leader and not b.is_leader
    assert len(await _runs(db, fid)) == 1


async def test_two_leaders_with_skewed_clocks_fire_each_tick_once(
    db: Database, redis: aioredis.Redis, make_scheduler: Any
) -> None:
    """Two schedulers that both lead (split lease, 300 ms skew) still fire every tick once."""
    fid = await _flow(db)
    base = _base()
    ca, cb = Clock(base), Clock(base + timedelta(milliseconds=300))
    a = await make_scheduler(ca, lease_key=b"test:lease:a")
    b = await make_scheduler(cb, lease_key=b"test:lease:b")
    for _ in range(5):
        await asyncio.gather(a.run_once(), b.run_once())
        ca.advance(1)
        cb.advance(1)
    assert a.is_leader and b.is_leader
    runs = await _runs(db, fid)
    expected = [tick_id(str(fid), base + timedelta(seconds=i)) for i in range(5)]
    assert [r["idempotency_key"] for r in runs] == expected
    assert sorted(j["run_id"] for j in await _jobs(redis)) == sorted(str(r["id"]) for r in runs)
    assert a.fired + b.fired == 5


async def test_concurrent_fire_of_one_tick_creates_one_run(
    db: Database, redis: aioredis.Redis, make_scheduler: Any
) -> None:
    """Racing firings of the same tick from two processes: one run, one job, one winner."""
    fid = await _flow(db)
    clock = Clock(_base())
    a, b = await make_scheduler(clock), await make_scheduler(clock)
    trig = Trigger(type="schedule", cron=EVERY_SECOND, timezone="UTC")
    results = await asyncio.gather(*(s.fire(fid, 1, trig, clock.now) for s in (a, b, a, b)))
    assert len([r for r in results if r is not None]) == 1
    assert len(await _runs(db, fid)) == 1
    assert len(await _jobs(redis)) == 1


async def test_missed_ticks_fire_only_the_latest(db: Database, make_scheduler: Any) -> None:
    """After 30 s without a pass, one run fires, for the most recent tick."""
    fid = await _flow(db)
    clock = Clock(_base())
    sched = await make_scheduler(clock)
    first = clock.now
    await sched.run_once()
    later = clock.advance(30)
    await sched.run_once()
    keys = [r["idempotency_key"] for r in await _runs(db, fid)]
    assert keys == [tick_id(str(fid), first), tick_id(str(fid), later)]


async def test_forged_or_future_tick_keys_do_not_silence_a_flow(
    db: Database, make_scheduler: Any
) -> None:
    """A far-future tick key (forged by a webhook or not) does not stop the current ticks."""
    fid = await _flow(db)
    writer = RunWriter(db)
    far = datetime(2999, 1, 1, tzinfo=UTC)
    for method in ("POST", "SCHEDULE"):
        trigger = {"method": method, "headers": {}, "query": {}, "body": None}
        key = tick_id(str(fid), far - timedelta(days=1 if method == "POST" else 0))
        await writer.insert(NewRun(uuid7(), fid, 1, trigger, idempotency_key=key))
    await writer.close()
    clock = Clock(_base())
    sched = await make_scheduler(clock)
    await sched.run_once()
    assert sched.fired == 0  # counted from now, not from 2999
    for _ in range(2):
        clock.advance(1)
        await sched.run_once()
    assert sched.fired == 2


async def test_lease_handover_when_the_leader_closes(db: Database, make_scheduler: Any) -> None:
    """A follower leads once the leader closes, resuming after the last fired tick."""
    fid = await _flow(db)
    clock = Clock(_base())
    a, b = await make_scheduler(clock), await make_scheduler(clock)
    await a.run_once()
    clock.advance(1)
    await a.run_once()
    await b.run_once()
    assert not b.is_leader
    await a.close()
    await b.run_once()
    assert b.is_leader and not a.is_leader
    assert len(await _runs(db, fid)) == 2  # the tick a fired at this second is not fired again
    clock.advance(1)
    await b.run_once()
    assert len(await _runs(db, fid)) == 3


async def test_lost_lease_stops_firing(
    db: Database, redis: aioredis.Redis, make_scheduler: Any
) -> None:
    """A leader whose lease now names another owner steps down and fires nothing."""
    fid = await _flow(db)
    clock = Clock(_base())
    sched = await make_scheduler(clock)
    await sched.run_once()
    await redis.set(k.scheduler_lease(), b"someone-else", px=60_000)
    clock.advance(1)
    await sched.run_once()
    assert not sched.is_leader
    assert len(await _runs(db, fid)) == 1
    assert await redis.get(k.scheduler_lease()) == b"someone-else"


async def test_disabled_flow_stops_firing(db: Database, make_scheduler: Any) -> None:
    """Once a flow is disabled (or deleted) the next refresh drops it and its ticks stop."""
    fid = await _flow(db, "a")
    other = await _flow(db, "b")
    clock = Clock(_base())
    sched = await make_scheduler(clock)
    await sched.run_once()
    await flow_store.set_enabled(db, fid, False)
    await flow_store.delete_flow(db, other)
    for _ in range(3):
        clock.advance(1)
        await sched.run_once()
    assert len(await _runs(db, fid)) == 1
    await flow_store.set_enabled(db, fid, True)
    clock.advance(1)
    await sched.run_once()
    assert len(await _runs(db, fid)) == 2  # re-enabled: one tick, not the disabled stretch


async def test_changed_cron_takes_effect(db: Database, make_scheduler: Any) -> None:
    """A new version with another cron is picked up at the next refresh."""
    fid = await _flow(db)
    clock = Clock(_base().replace(second=0) + timedelta(minutes=1))
    sched = await make_scheduler(clock)
    await sched.run_once()
    await flow_store.update_flow(db, fid, "tick", _doc("tick", cron="0 * * * *"))
    clock.advance(1)
    await sched.run_once()
    runs = await _runs(db, fid)
    assert len(runs) == 1 and runs[0]["flow_version"] == 1


async def test_firing_gives_up_after_trigger_timeout_and_never_doubles(
    db: Database, postgres_url: str, make_scheduler: Any
) -> None:
    """A firing blocked past AP_TRIGGER_TIMEOUT_SECONDS is abandoned; the retry adds no run."""
    fid = await _flow(db)
    clock = Clock(_base())
    sched = await make_scheduler(clock, trigger_timeout_s=0.5)
    await sched.run_once()
    clock.advance(1)
    trig = Trigger(type="schedule", cron=EVERY_SECOND, timezone="UTC")
    blocker = await asyncpg.connect(postgres_url)
    try:
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("LOCK TABLE runs IN ACCESS EXCLUSIVE MODE")
        assert await sched.run_once() >= 1.0  # the firing timed out: back off, keep it due
        with pytest.raises(TimeoutError):
            await sched.fire(fid, 1, trig, clock.now)
        await tx.rollback()
    finally:
        await blocker.close()
    await sched.run_once()
    keys = [r["idempotency_key"] for r in await _runs(db, fid)]
    assert keys == [
        tick_id(str(fid), clock.now - timedelta(seconds=1)),
        tick_id(str(fid), clock.now),
    ]


# --------------------------------------------------------------------- real loop, real clock
async def test_per_second_cron_runs_succeed_in_a_live_worker(
    db: Database, redis: aioredis.Redis, postgres_url: str, redis_url: str
) -> None:
    """A WORKER_AND_APP process fires a per-second schedule and its runs SUCCEED."""
    settings = make_settings(postgres_url, redis_url, AP_CONTAINER_TYPE="WORKER_AND_APP")
    client = TestClient(TestServer(create_app(settings), host="127.0.0.1"))
    await client.start_server()
    try:
        resp = await client.post("/api/v1/flows", json=_doc("live"))
        assert resp.status == 201, await resp.text()
        fid = (await resp.json())["id"]

        async def two_succeeded() -> bool:
            resp = await client.get("/api/v1/flow-runs", params={"flow_id": fid})
            runs = (await resp.json())["data"]
            return sum(r["status"] == "SUCCEEDED" for r in runs) >= 2

        await eventually(two_succeeded, timeout_s=60, interval_s=0.1)
        runs = (await (await client.get("/api/v1/flow-runs", params={"flow_id": fid})).json())[
            "data"
        ]
        done = [r for r in runs if r["status"] == "SUCCEEDED"]
        assert {r["trigger"]["method"] for r in done} == {"SCHEDULE"}
        ticks = [r["trigger"]["body"]["scheduled_at"] for r in runs]
        assert len(ticks) == len(set(ticks))
        detail = await (await client.get(f"/api/v1/flow-runs/{done[0]['id']}")).json()
        assert detail["steps"][0]["output"]["at"] == done[0]["trigger"]["body"]
    finally:
        await client.close()


async def test_two_running_schedulers_fire_each_tick_once(
    db: Database, redis: aioredis.Redis
) -> None:
    """Two live scheduler loops that both believe they lead produce one run per tick."""
    fid = await _flow(db)
    writers = [RunWriter(db), RunWriter(db)]
    producers = [Producer(redis, QueueConfig()), Producer(redis, QueueConfig())]
    scheds = [
        Scheduler(db, w, p, redis, refresh_s=0.5, lease_key=f"test:lease:{i}".encode())
        for i, (w, p) in enumerate(zip(writers, producers, strict=True))
    ]
    for s in scheds:
        await s.start()
    try:

        async def three_ticks() -> bool:
            return len(await _runs(db, fid)) >= 3

        await eventually(three_ticks, timeout_s=60, interval_s=0.1)
    finally:
        for s in scheds:
            await s.close()
        for p in producers:
            await p.close()
        for w in writers:
            await w.close()
    runs = await _runs(db, fid)
    keys = [r["idempotency_key"] for r in runs]
    assert len(keys) == len(set(keys))
    assert len(await _jobs(redis)) == len(runs)
    assert all(s.is_leader is False for s in scheds)  # close handed the leases back
