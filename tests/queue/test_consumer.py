"""Consumer: priority, concurrency, retries, dead letters, pause, own-PEL recovery, reclaim."""

from __future__ import annotations

import asyncio
import uuid

import redis.asyncio as aioredis

from conveyor.queue import Consumer, Job, Producer, QueueAdmin, QueueConfig
from conveyor.queue import keys as k


class Recorder:
    """A handler that records every delivery and can be told to fail some jobs."""

    def __init__(self, fail: dict[str, int] | None = None, sleep_s: float = 0.0) -> None:
        self.jobs: list[Job] = []
        self.fail = fail or {}
        self.sleep_s = sleep_s
        self.running = 0
        self.max_running = 0
        self.dead: list[tuple[str, str]] = []
        #: Set once the first job reaches this handler.
        self.started = asyncio.Event()

    async def __call__(self, job: Job) -> None:
        self.jobs.append(job)
        self.started.set()
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            if self.sleep_s:
                await asyncio.sleep(self.sleep_s)
            if self.fail.get(job.id, 0) > 0:
                self.fail[job.id] -= 1
                raise RuntimeError(f"boom {job.id}")
        finally:
            self.running -= 1

    async def on_dead(self, job: Job, error: str) -> None:
        self.dead.append((job.id, error))

    @property
    def ids(self) -> list[str]:
        return [j.id for j in self.jobs]


async def completed_ids(redis: aioredis.Redis, queue: str = "runs") -> list[str]:
    jobs, _ = await QueueAdmin(redis).list_jobs(queue, "completed", limit=1000)
    return [j.id for j in jobs]


async def test_burst_drains_every_job_once(redis: aioredis.Redis, cfg: QueueConfig) -> None:
    """Burst mode processes every waiting job exactly once, acknowledges it, then returns."""
    producer = Producer(redis, cfg)
    await asyncio.gather(*(producer.enqueue("runs", {"n": i}, job_id=f"j{i}") for i in range(50)))
    rec = Recorder()
    assert await Consumer(redis, rec, cfg).drain() == 50
    assert sorted(rec.ids) == sorted(f"j{i}" for i in range(50))
    assert rec.jobs[0].payload == {"n": 0} and rec.jobs[0].attempt == 1
    assert sorted(await completed_ids(redis)) == sorted(rec.ids)
    assert (await redis.xpending(k.ShardKeys("runs", 0).stream, k.GROUP))["pending"] == 0


async def test_sync_queue_is_served_first(redis: aioredis.Redis, cfg: QueueConfig) -> None:
    """With both queues backed up, every sync job runs before any background run."""
    producer = Producer(redis, cfg)
    for i in range(5):
        await producer.enqueue("runs", {}, job_id=f"r{i}")
    for i in range(5):
        await producer.enqueue("sync", {}, job_id=f"s{i}")
    rec = Recorder()
    await Consumer(redis, rec, cfg, concurrency=1).drain()
    assert [j.queue for j in rec.jobs] == ["sync"] * 5 + ["runs"] * 5


async def test_never_more_than_concurrency_in_flight(
    redis: aioredis.Redis, cfg: QueueConfig
) -> None:
    """COUNT follows free slots: at most `concurrency` handlers run at once."""
    producer = Producer(redis, cfg)
    await asyncio.gather(*(producer.enqueue("runs", {}, job_id=f"c{i}") for i in range(30)))
    rec = Recorder(sleep_s=0.01)
    await Consumer(redis, rec, cfg, concurrency=3).drain()
    assert len(rec.jobs) == 30
    assert rec.max_running == 3


async def test_raising_handler_is_retried_then_dead_lettered(
    redis: aioredis.Redis, cfg: QueueConfig
) -> None:
    """An always-raising handler gets max_deliveries tries, then DLQ + on_dead; others flow."""
    producer = Producer(redis, cfg)
    await producer.enqueue("runs", {}, job_id="bad")
    await producer.enqueue("runs", {}, job_id="good")
    rec = Recorder(fail={"bad": 99})
    await Consumer(redis, rec, cfg, on_dead=rec.on_dead).drain(wait_delayed_s=5)
    attempts = [j.attempt for j in rec.jobs if j.id == "bad"]
    assert attempts == [1, 2, 3, 4, 5]
    assert rec.ids.count("good") == 1
    assert [d[0] for d in rec.dead] == ["bad"]
    assert "RuntimeError: boom bad" in rec.dead[0][1]
    failed, _ = await QueueAdmin(redis).list_jobs("runs", "failed")
    assert [(j.id, j.attempts) for j in failed] == [("bad", 5)]
    assert await completed_ids(redis) == ["good"]


async def test_retry_after_one_failure_completes(redis: aioredis.Redis, cfg: QueueConfig) -> None:
    """A handler that raises once succeeds on delivery 2 and sees the previous error."""
    await Producer(redis, cfg).enqueue("runs", {"k": "v"}, job_id="flaky")
    rec = Recorder(fail={"flaky": 1})
    await Consumer(redis, rec, cfg).drain(wait_delayed_s=5)
    assert [j.attempt for j in rec.jobs] == [1, 2]
    assert rec.jobs[1].last_error == "RuntimeError: boom flaky"
    assert rec.jobs[1].payload == {"k": "v"}
    assert await completed_ids(redis) == ["flaky"]


async def test_undecodable_payload_is_dead_lettered_at_once(
    redis: aioredis.Redis, cfg: QueueConfig
) -> None:
    """An entry whose payload is not JSON goes straight to the dead letters with the reason."""
    sk = k.ShardKeys("runs", 0)
    await redis.xgroup_create(sk.stream, k.GROUP, id="0", mkstream=True)
    await redis.xadd(sk.stream, {b"i": b"mangled", b"p": b"{not json"})
    await redis.incr(sk.count)
    await Producer(redis, cfg).enqueue("runs", {}, job_id="fine")
    rec = Recorder()
    await Consumer(redis, rec, cfg, on_dead=rec.on_dead).drain()
    assert rec.ids == ["fine"]
    assert rec.dead[0][0] == "mangled" and "not valid JSON" in rec.dead[0][1]
    failed, _ = await QueueAdmin(redis).list_jobs("runs", "failed")
    assert [j.id for j in failed] == ["mangled"]
    assert "not valid JSON" in (failed[0].error or "")


async def test_failing_on_dead_still_dead_letters(redis: aioredis.Redis, cfg: QueueConfig) -> None:
    """Undecodable and invalid jobs reach the dead letters even when on_dead raises every time
    (nothing stays pending, redelivered forever)."""
    sk = k.ShardKeys("runs", 0)
    await redis.xgroup_create(sk.stream, k.GROUP, id="0", mkstream=True)
    await redis.xadd(sk.stream, {b"i": b"mangled", b"p": b"{not json"})
    await redis.incr(sk.count)
    await Producer(redis, cfg).enqueue("runs", {"run_id": "not-a-uuid"}, job_id="invalid")
    calls: list[str] = []

    async def handler(job: Job) -> None:
        uuid.UUID(job.payload["run_id"])  # what the engine does first: raises ValueError

    async def on_dead(job: Job, error: str) -> None:
        calls.append(job.id)
        uuid.UUID(str(job.payload and job.payload.get("run_id")))  # raises too

    consumer = Consumer(redis, handler, cfg, on_dead=on_dead)
    await consumer.drain(wait_delayed_s=5, wait_pending=True)
    failed, _ = await QueueAdmin(redis).list_jobs("runs", "failed")
    assert sorted((j.id, j.attempts) for j in failed) == [("invalid", 5), ("mangled", 1)]
    assert sorted(calls) == ["invalid", "mangled"]
    assert (await redis.xpending(sk.stream, k.GROUP))["pending"] == 0


async def test_paused_queue_delivers_nothing_until_resumed(
    redis: aioredis.Redis, cfg: QueueConfig
) -> None:
    """A paused queue delivers nothing to any worker; the other queue keeps flowing."""
    producer = Producer(redis, cfg)
    admin = QueueAdmin(redis, cfg)
    await producer.enqueue("runs", {}, job_id="r1")
    await producer.enqueue("sync", {}, job_id="s1")
    await admin.pause("runs")
    rec = Recorder()
    await Consumer(redis, rec, cfg).drain()
    assert rec.ids == ["s1"]
    await admin.resume("runs")
    await Consumer(redis, rec, cfg).drain()
    assert rec.ids == ["s1", "r1"]


async def test_restart_with_same_name_takes_back_own_pending(
    redis: aioredis.Redis, cfg: QueueConfig
) -> None:
    """A consumer re-reads its own pending entries on start, without waiting for a timeout."""
    slow = QueueConfig(visibility_timeout_s=3600, heartbeat_s=60)
    await Producer(redis, slow).enqueue("runs", {}, job_id="mine")
    sk = k.ShardKeys("runs", 0)
    await redis.xreadgroup(k.GROUP, "worker-a", {sk.stream: ">"}, count=10)
    rec = Recorder()
    await Consumer(redis, rec, slow, name="worker-a").drain()
    assert rec.ids == ["mine"] and rec.jobs[0].attempt == 2


async def test_dead_workers_entries_are_reclaimed(redis: aioredis.Redis, cfg: QueueConfig) -> None:
    """Entries held by a vanished consumer are reclaimed after the visibility timeout."""
    producer = Producer(redis, cfg)
    for i in range(5):
        await producer.enqueue("runs", {}, job_id=f"g{i}")
    sk = k.ShardKeys("runs", 0)
    await redis.xreadgroup(k.GROUP, "ghost", {sk.stream: ">"}, count=10)
    rec = Recorder()
    await asyncio.wait_for(Consumer(redis, rec, cfg).drain(wait_pending=True), 20)
    assert sorted(rec.ids) == [f"g{i}" for i in range(5)]
    assert {j.attempt for j in rec.jobs} == {2}


async def test_reclaim_past_max_deliveries_dead_letters(
    redis: aioredis.Redis, cfg: QueueConfig
) -> None:
    """An entry whose workers keep dying is dead-lettered once deliveries run out."""
    one = QueueConfig(max_deliveries=1, visibility_timeout_s=0.3, heartbeat_s=0.1)
    await Producer(redis, one).enqueue("runs", {}, job_id="cursed")
    sk = k.ShardKeys("runs", 0)
    await redis.xreadgroup(k.GROUP, "ghost", {sk.stream: ">"}, count=10)
    rec = Recorder()
    await asyncio.wait_for(
        Consumer(redis, rec, one, on_dead=rec.on_dead).drain(wait_pending=True), 20
    )
    assert rec.ids == []
    assert rec.dead[0][0] == "cursed" and "gave up after 1 deliveries" in rec.dead[0][1]


async def test_heartbeat_keeps_a_long_job_from_being_stolen(
    redis: aioredis.Redis, cfg: QueueConfig
) -> None:
    """A job running longer than the visibility timeout is heartbeated, not run twice."""
    # Wide margins: a heartbeat every 0.1 s against a 1 s timeout survives a loaded machine.
    beat = QueueConfig(visibility_timeout_s=1.0, heartbeat_s=0.1, block_ms=50)
    await Producer(redis, beat).enqueue("runs", {}, job_id="long")
    rec = Recorder(sleep_s=2.5)
    thief = Recorder()
    first = asyncio.ensure_future(Consumer(redis, rec, beat, name="owner").drain())
    await asyncio.wait_for(rec.started.wait(), 10)  # the owner holds the job: now the thief
    second = Consumer(redis, thief, beat, name="thief")
    await asyncio.wait_for(second.drain(wait_pending=True), 20)
    await first
    assert rec.ids == ["long"] and thief.ids == []


async def test_background_consumer_processes_and_closes_cleanly(
    redis: aioredis.Redis, cfg: QueueConfig
) -> None:
    """start()/close(): jobs enqueued while running are processed; close flushes acks."""
    done = asyncio.Event()
    seen: list[str] = []

    async def handler(job: Job) -> None:
        seen.append(job.id)
        if len(seen) == 20:
            done.set()

    async with Consumer(redis, handler, cfg):
        producer = Producer(redis, cfg)
        await asyncio.gather(*(producer.enqueue("runs", {}, job_id=f"b{i}") for i in range(20)))
        await asyncio.wait_for(done.wait(), 10)
    assert len(await completed_ids(redis)) == 20
    assert (await redis.xpending(k.ShardKeys("runs", 0).stream, k.GROUP))["pending"] == 0


async def test_delayed_job_runs_once_due(redis: aioredis.Redis, cfg: QueueConfig) -> None:
    """A delayed job is promoted when due and delivered exactly once."""
    await Producer(redis, cfg).enqueue("runs", {"d": 1}, job_id="soon", delay_s=0.2)
    rec = Recorder()
    assert await Consumer(redis, rec, cfg).drain() == 0
    await Consumer(redis, rec, cfg).drain(wait_delayed_s=5)
    assert rec.ids == ["soon"] and rec.jobs[0].payload == {"d": 1}


async def test_delayed_jobs_promoted_once_by_competing_workers(
    redis: aioredis.Redis, cfg: QueueConfig
) -> None:
    """Two workers promoting the same delayed set deliver each job exactly once."""
    producer = Producer(redis, cfg)
    ids = [f"dl{i}" for i in range(40)]
    await asyncio.gather(*(producer.enqueue("runs", {}, job_id=j, delay_s=0.2) for j in ids))
    a, b = Recorder(), Recorder()
    await asyncio.gather(
        Consumer(redis, a, cfg, name="a").drain(wait_delayed_s=5),
        Consumer(redis, b, cfg, name="b").drain(wait_delayed_s=5),
    )
    assert sorted(a.ids + b.ids) == sorted(ids)
    assert sorted(await completed_ids(redis)) == sorted(ids)


async def test_reclaim_survives_entries_deleted_while_pending(
    redis: aioredis.Redis, cfg: QueueConfig
) -> None:
    """An entry deleted while a dead worker held it is dropped from the PEL (6.2 and 7.x)."""
    producer = Producer(redis, cfg)
    await producer.enqueue("runs", {}, job_id="kept")
    await producer.enqueue("runs", {}, job_id="erased")
    sk = k.ShardKeys("runs", 0)
    read = await redis.xreadgroup(k.GROUP, "ghost", {sk.stream: ">"}, count=10)
    await redis.xdel(sk.stream, read[0][1][1][0])
    rec = Recorder()
    await asyncio.wait_for(Consumer(redis, rec, cfg).drain(wait_pending=True), 20)
    assert rec.ids == ["kept"]
    st = await QueueAdmin(redis).stats("runs")
    assert (st.waiting, st.active) == (0, 0)
    assert await QueueAdmin(redis).locate("runs", ["erased"]) == {"erased": None}


async def test_backend_outage_spends_no_delivery(redis: aioredis.Redis, cfg: QueueConfig) -> None:
    """A handler failing because a backend is down (more often than max_deliveries) is
    retried until it succeeds, never dead-lettered, and never looks like a first delivery."""
    await Producer(redis, cfg).enqueue("runs", {}, job_id="patient")
    attempts: list[int] = []

    async def handler(job: Job) -> None:
        attempts.append(job.attempt)
        if len(attempts) <= 7:
            raise ConnectionError("postgres down")

    def transient(exc: BaseException) -> str | None:
        return "postgres" if isinstance(exc, ConnectionError) else None

    consumer = Consumer(redis, handler, cfg, transient=transient)
    await asyncio.wait_for(consumer.drain(wait_delayed_s=5), 30)
    assert len(attempts) == 8 and attempts[0] == 1 and set(attempts[1:]) == {2}
    assert await completed_ids(redis) == ["patient"]
    assert await redis.xlen(k.ShardKeys("runs", 0).dead) == 0
