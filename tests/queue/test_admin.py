"""Admin: locate for the reconciler, paged listings per state, retry, delete, clean, pause."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from conveyor.queue import (
    Consumer,
    Job,
    JobNotFound,
    Location,
    Producer,
    QueueAdmin,
    QueueConfig,
)
from conveyor.queue import keys as k


async def _noop(job: Job) -> None:
    return None


async def _fail(job: Job) -> None:
    raise RuntimeError("nope")


async def _one_dead(redis: aioredis.Redis, job_id: str = "dead-1") -> None:
    cfg = QueueConfig(max_deliveries=1)
    await Producer(redis, cfg).enqueue("runs", {"x": 1}, job_id=job_id)
    await Consumer(redis, _fail, cfg).drain()


async def test_locate_reports_where_each_job_is(redis: aioredis.Redis) -> None:
    """locate() says stream, delayed, dead or absent (completed jobs are absent)."""
    producer = Producer(redis)
    admin = QueueAdmin(redis)
    await _one_dead(redis)
    await producer.enqueue("runs", {}, job_id="done")
    await Consumer(redis, _noop).drain()
    await producer.enqueue("runs", {}, job_id="waiting")
    await producer.enqueue("runs", {}, job_id="later", delay_s=60)
    found = await admin.locate("runs", ["waiting", "later", "dead-1", "done", "unknown"])
    assert found == {
        "waiting": Location.STREAM,
        "later": Location.DELAYED,
        "dead-1": Location.DEAD,
        "done": None,
        "unknown": None,
    }
    assert await admin.contains("runs", "waiting")
    assert not await admin.contains("runs", "dead-1")


async def test_locate_notices_an_entry_cut_from_the_stream(redis: aioredis.Redis) -> None:
    """A stream entry cut by hand or by trimming reads as absent, so the reconciler re-enqueues."""
    producer = Producer(redis)
    await producer.enqueue("runs", {}, job_id="gone")
    sk = k.ShardKeys("runs", 0)
    ((eid, _),) = await redis.xrange(sk.stream)
    await redis.xdel(sk.stream, eid)
    assert await QueueAdmin(redis).locate("runs", ["gone"]) == {"gone": None}
    assert await producer.enqueue("runs", {}, job_id="gone") == "gone"
    assert await redis.xlen(sk.stream) == 1


@pytest.mark.parametrize("shards", [1, 3])
async def test_waiting_jobs_page_with_cursor(redis: aioredis.Redis, shards: int) -> None:
    """Cursor paging returns every waiting job exactly once, across shards."""
    cfg = QueueConfig(shards=shards)
    producer = Producer(redis, cfg)
    await asyncio.gather(*(producer.enqueue("runs", {}, job_id=f"p{i}") for i in range(25)))
    admin = QueueAdmin(redis, cfg)
    seen: list[str] = []
    cursor = None
    for _ in range(10):
        page, cursor = await admin.list_jobs("runs", "waiting", limit=10, cursor=cursor)
        assert len(page) <= 10
        seen += [j.id for j in page]
        if cursor is None:
            break
    assert sorted(seen) == sorted(f"p{i}" for i in range(25))


async def test_each_state_lists_its_jobs(redis: aioredis.Redis) -> None:
    """waiting, active, delayed, failed and completed listings show the right jobs."""
    producer = Producer(redis)
    admin = QueueAdmin(redis)
    await _one_dead(redis)
    await producer.enqueue("runs", {}, job_id="ok")
    await Consumer(redis, _noop).drain()
    await producer.enqueue("runs", {"a": 1}, job_id="act")
    await redis.xreadgroup(k.GROUP, "w1", {k.ShardKeys("runs", 0).stream: ">"}, count=1)
    await producer.enqueue("runs", {}, job_id="wait")
    await producer.enqueue("runs", {}, job_id="del", delay_s=60)

    async def ids(state: str) -> list[str]:
        return [j.id for j in (await admin.list_jobs("runs", state))[0]]

    assert await ids("waiting") == ["wait"]
    assert await ids("delayed") == ["del"]
    assert await ids("failed") == ["dead-1"]
    assert await ids("completed") == ["ok"]
    active, _ = await admin.list_jobs("runs", "active")
    assert [(j.id, j.consumer, j.payload) for j in active] == [("act", "w1", {"a": 1})]
    failed, _ = await admin.list_jobs("runs", "failed")
    assert failed[0].error == "RuntimeError: nope"


async def test_retry_dead_puts_the_job_back(redis: aioredis.Redis) -> None:
    """A dead-lettered job retried from the board runs again with a fresh delivery count."""
    await _one_dead(redis)
    admin = QueueAdmin(redis)
    await admin.retry_dead("runs", "dead-1")
    seen: list[Job] = []

    async def handler(job: Job) -> None:
        seen.append(job)

    await Consumer(redis, handler).drain()
    assert [(j.id, j.attempt, j.payload) for j in seen] == [("dead-1", 1, {"x": 1})]
    assert await redis.xlen(k.ShardKeys("runs", 0).dead) == 0
    with pytest.raises(JobNotFound):
        await admin.retry_dead("runs", "dead-1")


async def test_delete_job_in_each_state(redis: aioredis.Redis) -> None:
    """delete_job removes a waiting, delayed or dead job; unknown ids raise JobNotFound."""
    producer = Producer(redis)
    admin = QueueAdmin(redis)
    await _one_dead(redis)
    await producer.enqueue("runs", {}, job_id="w")
    await producer.enqueue("runs", {}, job_id="d", delay_s=60)
    assert await admin.delete_job("runs", "w") == Location.STREAM
    assert await admin.delete_job("runs", "d") == Location.DELAYED
    assert await admin.delete_job("runs", "dead-1") == Location.DEAD
    with pytest.raises(JobNotFound):
        await admin.delete_job("runs", "w")
    st = await admin.stats("runs")
    assert (st.waiting, st.delayed, st.dead) == (0, 0, 0)


async def test_clean_removes_old_jobs_per_state(redis: aioredis.Redis) -> None:
    """clean(state, older_than_s) drops old jobs of that state only; active is refused."""
    producer = Producer(redis)
    admin = QueueAdmin(redis)
    await _one_dead(redis)
    await producer.enqueue("runs", {}, job_id="ok")
    await Consumer(redis, _noop).drain()
    await producer.enqueue("runs", {}, job_id="w")
    await producer.enqueue("runs", {}, job_id="d", delay_s=60)
    assert await admin.clean("runs", "waiting", older_than_s=3600) == 0
    await asyncio.sleep(0.01)  # time gap: every job is now older than zero seconds
    for state in ("waiting", "delayed", "failed", "completed"):
        assert await admin.clean("runs", state, older_than_s=0) == 1, state
    st = await admin.stats("runs")
    assert (st.waiting, st.delayed, st.dead, st.completed) == (0, 0, 0, 0)
    with pytest.raises(ValueError, match="active"):
        await admin.clean("runs", "active", older_than_s=0)


async def test_pause_and_resume_flags(redis: aioredis.Redis) -> None:
    """pause/resume flip a flag every worker and the stats see."""
    admin = QueueAdmin(redis)
    await admin.pause("sync")
    assert await admin.is_paused("sync") and (await admin.stats("sync")).paused
    assert not await admin.is_paused("runs")
    await admin.resume("sync")
    assert not await admin.is_paused("sync")


async def test_failed_and_completed_page_newest_first(redis: aioredis.Redis) -> None:
    """Failed and completed listings page newest first without repeats."""
    cfg = QueueConfig(max_deliveries=1)
    producer = Producer(redis, cfg)
    for i in range(7):
        await producer.enqueue("runs", {}, job_id=f"f{i}")
    await Consumer(redis, _fail, cfg).drain()
    for i in range(7):
        await producer.enqueue("runs", {}, job_id=f"c{i}")
    await Consumer(redis, _noop, cfg).drain()
    admin = QueueAdmin(redis, cfg)
    for state, prefix in (("failed", "f"), ("completed", "c")):
        seen: list[str] = []
        cursor = None
        while True:
            page, cursor = await admin.list_jobs("runs", state, limit=3, cursor=cursor)
            seen += [j.id for j in page]
            if cursor is None:
                break
        assert seen == [f"{prefix}{i}" for i in reversed(range(7))], state
