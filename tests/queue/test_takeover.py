"""Takeover: silent consumers' entries claimed without a pending-list scan, live ones left
alone, unfinished entries handed back on close, leased default names, key-prefix isolation."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import redis.asyncio as aioredis

from conveyor.queue import Consumer, Job, Producer, QueueAdmin, QueueConfig
from conveyor.queue import keys as k
from conveyor.queue.consumer import HANDOFF_S, default_consumer_name
from tests.polling import eventually
from tests.queue.proxy import TcpProxy
from tests.queue.servers import RedisServer


def no_scan(cfg: QueueConfig) -> QueueConfig:
    """``cfg`` with the pending-list scan effectively off: only the takeover path claims."""
    return dataclasses.replace(cfg, reclaim_interval_s=3600)


async def test_silent_consumer_is_taken_over(redis: aioredis.Redis, cfg: QueueConfig) -> None:
    """Entries of a consumer silent past the visibility timeout are claimed by a live one."""
    producer = Producer(redis, cfg)
    for i in range(5):
        await producer.enqueue("runs", {}, job_id=f"t{i}")
    sk = k.ShardKeys("runs", 0)
    await redis.xreadgroup(k.GROUP, "ghost", {sk.stream: ">"}, count=10)
    seen: list[Job] = []

    async def handler(job: Job) -> None:
        seen.append(job)

    async with Consumer(redis, handler, no_scan(cfg)):
        await eventually(lambda: len(seen) == 5, timeout_s=15)
    assert sorted(j.id for j in seen) == [f"t{i}" for i in range(5)]
    assert {j.attempt for j in seen} == {2}
    pending = await redis.xpending_range(sk.stream, k.GROUP, "-", "+", 10, b"ghost")
    assert pending == []


async def test_live_consumer_keeps_its_entries(redis: aioredis.Redis, cfg: QueueConfig) -> None:
    """A heartbeating consumer running jobs longer than the visibility timeout keeps them."""
    slow_cfg = no_scan(cfg)
    await Producer(redis, slow_cfg).enqueue("runs", {}, job_id="long")
    runs: list[tuple[str, int]] = []

    async def slow(job: Job) -> None:
        runs.append((job.id, job.attempt))
        await asyncio.sleep(4 * slow_cfg.visibility_timeout_s)  # the job: busy past the timeout

    async def other(job: Job) -> None:
        runs.append((job.id, job.attempt))

    async with Consumer(redis, slow, slow_cfg, name="busy"):
        await eventually(lambda: runs, timeout_s=5)
        async with Consumer(redis, other, slow_cfg, name="idle"):
            # Negative check: three visibility timeouts pass and the idle consumer takes
            # nothing (there is no event for "did not happen"; bounded by the job's length).
            await asyncio.sleep(3 * slow_cfg.visibility_timeout_s)
    assert runs == [("long", 1)]


async def test_close_hands_back_unfinished_entries(redis: aioredis.Redis, cfg: QueueConfig) -> None:
    """Past the drain deadline, entries still held go back to the stream and a live consumer
    runs them at once as a redelivery (attempt 2), not after the visibility timeout."""
    slow_cfg = dataclasses.replace(no_scan(cfg), visibility_timeout_s=3600, heartbeat_s=60)
    producer = Producer(redis, slow_cfg)
    for i in range(3):
        await producer.enqueue("runs", {}, job_id=f"h{i}")
    started: list[str] = []
    rescued: list[Job] = []

    async def stuck(job: Job) -> None:
        started.append(job.id)
        await asyncio.sleep(3600)  # the job never ends by itself: close() must hand it back

    async def rescuer(job: Job) -> None:
        rescued.append(job)

    leaving = Consumer(redis, stuck, slow_cfg, name="leaving", concurrency=2)
    await leaving.start()
    await eventually(lambda: len(started) == 2, timeout_s=5)
    async with Consumer(redis, rescuer, slow_cfg, name="staying", concurrency=4):
        await leaving.close(timeout_s=0.1)
        closed = time.monotonic()
        await eventually(lambda: len(rescued) == 3, timeout_s=5)
        assert time.monotonic() - closed < 2
    assert sorted(j.id for j in rescued) == ["h0", "h1", "h2"]
    assert sorted(j.attempt for j in rescued if j.id in started) == [2, 2]
    assert (await redis.xpending(k.ShardKeys("runs", 0).stream, k.GROUP))["pending"] == 0
    jobs, _ = await QueueAdmin(redis, slow_cfg).list_jobs("runs", "completed")
    assert sorted(j.id for j in jobs) == ["h0", "h1", "h2"]


async def test_default_name_is_never_shared(redis: aioredis.Redis, cfg: QueueConfig) -> None:
    """Two live consumers with the default host:pid name: the second gets a unique one; the
    lease is dropped on close so a restart gets the stable name back."""

    async def handler(job: Job) -> None:
        return None

    first = Consumer(redis, handler, cfg)
    second = Consumer(redis, handler, cfg)
    await first.start()
    await second.start()
    try:
        assert first.name == default_consumer_name()
        assert second.name.startswith(default_consumer_name() + ":")
    finally:
        await second.close()
        await first.close()
    again = Consumer(redis, handler, cfg)
    await again.start()
    await again.close()
    assert again.name == default_consumer_name()


async def test_key_prefixes_isolate_deployments(redis: aioredis.Redis, cfg: QueueConfig) -> None:
    """Two deployments on one Redis database: each consumes only its own jobs, and pausing or
    counting one does not touch the other."""
    blue = dataclasses.replace(cfg, key_prefix="blue")
    green = dataclasses.replace(cfg, key_prefix="green")
    await Producer(redis, blue).enqueue("runs", {}, job_id="b1")
    await Producer(redis, green).enqueue("runs", {}, job_id="g1")
    await QueueAdmin(redis, green).pause("sync")
    seen: dict[str, list[str]] = {"blue": [], "green": []}

    def recorder(name: str) -> object:
        async def handler(job: Job) -> None:
            seen[name].append(job.id)

        return handler

    await Consumer(redis, recorder("blue"), blue).drain()  # type: ignore[arg-type]
    assert seen == {"blue": ["b1"], "green": []}
    assert (await QueueAdmin(redis, green).stats("runs")).waiting == 1
    assert not (await QueueAdmin(redis, blue).stats("sync")).paused
    await Consumer(redis, recorder("green"), green).drain()  # type: ignore[arg-type]
    assert seen == {"blue": ["b1"], "green": ["g1"]}
    keys = await redis.keys("*")
    assert keys and all(key.startswith((b"blue:", b"green:")) for key in keys)


async def test_pause_stops_only_its_own_deployments_consumers(
    redis: aioredis.Redis, cfg: QueueConfig
) -> None:
    """Two deployments on one Redis database with running consumers: pausing one (or the
    default prefix) stops only that deployment's consumer; resuming lets it finish."""
    blue = dataclasses.replace(cfg, key_prefix="blue")
    green = dataclasses.replace(cfg, key_prefix="green")
    seen: dict[str, list[str]] = {"blue": [], "green": []}

    def recorder(name: str) -> object:
        async def handler(job: Job) -> None:
            seen[name].append(job.id)

        return handler

    await QueueAdmin(redis, green).pause("runs")
    await QueueAdmin(redis, QueueConfig()).pause("runs")  # the default prefix: neither of them
    async with (
        Consumer(redis, recorder("blue"), blue, name="blue-w"),  # type: ignore[arg-type]
        Consumer(redis, recorder("green"), green, name="green-w"),  # type: ignore[arg-type]
    ):
        await Producer(redis, blue).enqueue("runs", {}, job_id="b1")
        await Producer(redis, green).enqueue("runs", {}, job_id="g1")
        await eventually(lambda: seen["blue"] == ["b1"], timeout_s=10)
        # Negative check: many pause polls later the paused deployment's consumer has still
        # taken nothing (a bounded wait: nothing happens that an event could report).
        await asyncio.sleep(20 * green.pause_poll_s)
        assert seen["green"] == []
        assert (await QueueAdmin(redis, green).stats("runs")).waiting == 1
        await QueueAdmin(redis, green).resume("runs")
        await eventually(lambda: seen["green"] == ["g1"], timeout_s=10)
    assert seen == {"blue": ["b1"], "green": ["g1"]}


async def test_lapsed_name_lease_is_taken_again(redis: aioredis.Redis, cfg: QueueConfig) -> None:
    """A default-name lease that lapsed (Redis away past the visibility timeout) is taken
    again by its holder at the next heartbeat, so no other process can start under it."""

    async def handler(job: Job) -> None:
        return None

    consumer = Consumer(redis, handler, cfg)
    await consumer.start()
    try:
        lease = k.consumer_name(consumer.name, cfg.key_prefix)
        token = await redis.get(lease)
        assert token
        await redis.delete(lease)  # what expiry does during a long outage
        await eventually(lambda: consumer._leased is not None, timeout_s=1)

        async def retaken() -> bool:
            return bool(await redis.get(lease) == token)

        await eventually(
            retaken, timeout_s=34 * cfg.heartbeat_s, interval_s=cfg.heartbeat_s / 3,
            what="the lapsed name lease taken again",
        )  # fmt: skip
    finally:
        await consumer.close()
    assert await redis.get(lease) is None


async def test_taken_over_delivery_is_fenced(redis: aioredis.Redis, cfg: QueueConfig) -> None:
    """A delivery claimed by another consumer while its handler runs (its worker was cut off)
    is fenced: the handler's ownership check raises before it writes, and the entry is
    neither retried nor acknowledged (it stays with its new owner)."""
    producer = Producer(redis, cfg)
    await producer.enqueue("runs", {}, job_id="f1")
    (sk,) = cfg.shard_keys("runs")
    go = asyncio.Event()
    outcome: list[str] = []

    async def handler(job: Job) -> None:
        await go.wait()
        try:
            await job.ensure_owned()
        except Exception as exc:
            outcome.append(type(exc).__name__)
            raise
        outcome.append("wrote")

    async with Consumer(redis, handler, no_scan(cfg), name="cut-off") as consumer:
        await eventually(lambda: consumer.busy == 1, timeout_s=5)
        # Another worker takes the entry over, as after this one's silence.
        (entry,) = await redis.xpending_range(sk.stream, k.GROUP, "-", "+", 10)
        await redis.xclaim(sk.stream, k.GROUP, "rescuer", 0, [entry["message_id"]])
        await eventually(
            lambda: all(j.lost for s in consumer._streams for j in s.inflight.values()), timeout_s=5
        )
        go.set()
        await eventually(lambda: outcome and consumer.busy == 0, timeout_s=5)
    assert outcome == ["_EntryLost"]
    assert consumer.processed == 0 and consumer.failed == 0
    (entry,) = await redis.xpending_range(sk.stream, k.GROUP, "-", "+", 10)
    assert entry["consumer"] == b"rescuer"
    assert (await redis.zcard(sk.delayed)) == 0


async def test_owned_delivery_passes_the_fence(redis: aioredis.Redis, cfg: QueueConfig) -> None:
    """A handler that outlives several visibility timeouts still owns its delivery (the
    heartbeat confirms it): the ownership check returns and the job is acknowledged."""
    checks: list[str] = []

    async def handler(job: Job) -> None:
        for _ in range(3):
            await asyncio.sleep(cfg.visibility_timeout_s)  # the job: outlives the timeout
            await job.ensure_owned()
            checks.append(job.id)

    await Producer(redis, cfg).enqueue("runs", {}, job_id="o1")
    async with Consumer(redis, handler, cfg, name="owner") as consumer:
        await eventually(lambda: consumer.processed == 1, timeout_s=15)
    assert checks == ["o1"] * 3


async def test_outage_past_visibility_takes_no_live_entry(
    redis_server: RedisServer, cfg: QueueConfig
) -> None:
    """Redis unreachable longer than the visibility timeout (a partition: the server and its
    clock run on) while a live consumer holds entries: once Redis is back another consumer
    takes none of them over, not even when it looks right away (every consumer looked silent
    meanwhile); each job runs once."""
    four = dataclasses.replace(cfg, concurrency=4)
    calls: dict[str, int] = {}
    release = asyncio.Event()

    async def handler(job: Job) -> None:
        calls[job.id] = calls.get(job.id, 0) + 1
        await release.wait()
        await job.ensure_owned()

    proxy = TcpProxy(redis_server.port)
    await proxy.start()
    client = aioredis.Redis.from_url(proxy.url(), decode_responses=False)
    try:
        async with Consumer(client, handler, four, name="owner") as owner:
            for i in range(4):
                await Producer(client, four).enqueue("runs", {}, job_id=f"o{i}")
            await eventually(lambda: owner.busy == 4, timeout_s=10)
            async with Consumer(client, handler, four, name="other") as other:
                await proxy.cut()
                # Fault schedule: Redis away for three visibility timeouts, then back.
                await asyncio.sleep(3 * four.visibility_timeout_s)
                await proxy.restore()
                # The earliest look possible, before the owner's first touch after the outage.
                assert await other._take_over() == 0
                # Negative check: three takeover periods later still nothing was taken over.
                await asyncio.sleep(3 * (four.visibility_timeout_s + four.heartbeat_s))
                assert calls == {f"o{i}": 1 for i in range(4)}
                release.set()
                await eventually(lambda: owner.processed == 4, timeout_s=15)
    finally:
        await client.aclose()
        await proxy.close()
    assert calls == {f"o{i}": 1 for i in range(4)}
    assert owner.failed == other.processed == 0


async def test_close_is_bounded_while_redis_is_away(
    redis_server: RedisServer, cfg: QueueConfig
) -> None:
    """Shutdown with Redis unreachable (an acknowledgement and the hand-back cannot go out)
    ends within the drain plus HANDOFF_S and a second, so drain + that fits the orchestrator's
    kill grace; what could not go out stays pending for the takeover."""
    proxy = TcpProxy(redis_server.port)
    await proxy.start()
    client = aioredis.Redis.from_url(proxy.url(), decode_responses=False)
    finish, stuck = asyncio.Event(), asyncio.Event()

    async def handler(job: Job) -> None:
        await (stuck if job.id == "stuck" else finish).wait()

    consumer = Consumer(client, handler, cfg, name="leaving", concurrency=2)
    try:
        await Producer(client, cfg).enqueue("runs", {}, job_id="quick")
        await Producer(client, cfg).enqueue("runs", {}, job_id="stuck")
        await consumer.start()
        await eventually(lambda: consumer.busy == 2, timeout_s=10)
        await proxy.cut()
        finish.set()  # its acknowledgement now cannot go out
        await eventually(lambda: consumer.processed == 1, timeout_s=10)
        began = time.monotonic()
        await consumer.close(timeout_s=0.2)
        assert time.monotonic() - began < 0.2 + HANDOFF_S + 1 + 1  # one second of slack
        await proxy.restore()
        (sk,) = cfg.shard_keys("runs")
        pending = await client.xpending(sk.stream, k.GROUP)
        assert pending["pending"] == 2  # both stay for the takeover (the run resumes)
    finally:
        await client.aclose()
        await proxy.close()


async def test_dead_consumers_entries_are_taken_in_one_round(
    redis: aioredis.Redis, cfg: QueueConfig
) -> None:
    """A busy survivor claims all of a dead consumer's entries at once, not a few per round
    (takeover time must not grow with how much the dead worker held)."""
    busy_cfg = no_scan(cfg)
    producer = Producer(redis, busy_cfg)
    sk = k.ShardKeys("runs", 0)
    for i in range(12):
        await producer.enqueue("runs", {}, job_id=f"dead{i}")
    await redis.xreadgroup(k.GROUP, "ghost", {sk.stream: ">"}, count=12)
    for i in range(busy_cfg.concurrency):
        await producer.enqueue("runs", {}, job_id=f"busy{i}")
    release = asyncio.Event()
    started: list[str] = []

    async def hold(job: Job) -> None:
        started.append(job.id)
        await release.wait()

    async def ghost_pending() -> int:
        summary = await redis.xpending(sk.stream, k.GROUP)
        owners = {c["name"]: int(c["pending"]) for c in summary["consumers"]}
        return owners.get(b"ghost", 0)

    async with Consumer(redis, hold, busy_cfg, queues=["runs"]) as consumer:
        # Every slot busy with new work before the ghost goes silent long enough.
        await eventually(lambda: len(started) == busy_cfg.concurrency, timeout_s=10)
        assert consumer.busy == busy_cfg.concurrency
        seen: list[int] = []

        async def first_claim() -> bool:
            seen.append(await ghost_pending())
            return seen[-1] < 12

        await eventually(first_claim, timeout_s=15, interval_s=0.02)
        assert seen[-1] == 0, f"the ghost's entries went {seen[0]} -> {seen[-1]} in one round"
        release.set()
