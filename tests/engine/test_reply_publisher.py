"""Coalesced sync replies (ReplyPublisher): many runs answering at once share one Redis round
trip, every message still reaches its own channel, and Redis away makes each publish return
False after its retries instead of raising (real Redis; a private server for the outage); a
reply for a hub of the same process is handed over in memory."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from conveyor.engine.replies import ReplyHub, ReplyPublisher, publish_reply
from tests.polling import eventually
from tests.queue.servers import RedisServer


@pytest.fixture
def own_redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server this test may kill (never the shared one)."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.kill()


async def test_concurrent_replies_share_round_trips_and_all_arrive(
    redis: aioredis.Redis,
) -> None:
    """Thirty replies published at once, to three channels: fewer round trips than replies,
    each message received once on its own channel."""
    channels = [f"h5-reply-test-{i}" for i in range(3)]
    pubsub = redis.pubsub()
    await pubsub.subscribe(*channels)
    received: list[tuple[str, dict[str, Any]]] = []

    async def collect() -> None:
        async for msg in pubsub.listen():
            if msg["type"] == "message":
                received.append((msg["channel"].decode(), orjson.loads(msg["data"])))

    reader = asyncio.create_task(collect())
    publisher = ReplyPublisher(redis)
    try:
        sent = await asyncio.gather(
            *(publisher.publish(channels[i % 3], {"run_id": f"r{i}", "n": i}) for i in range(30))
        )
        assert sent == [True] * 30
        assert publisher.round_trips < 30
        await eventually(lambda: len(received) >= 30, what="30 replies received")
    finally:
        reader.cancel()
        await publisher.close()
        await pubsub.aclose()
    assert sorted(m["n"] for _, m in received) == list(range(30))
    assert all(ch == channels[m["n"] % 3] for ch, m in received)


async def test_replies_with_redis_away_return_false(
    own_redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed batch is retried message by message and gives up without raising; once
    Redis is back the same publisher sends again."""
    from conveyor.engine import replies  # noqa: PLC0415

    monkeypatch.setattr(replies, "jittered", lambda delay: 0.01)
    client = aioredis.Redis.from_url(own_redis_server.url, socket_connect_timeout=1)
    publisher = ReplyPublisher(client)
    try:
        assert await publisher.publish("c", {"run_id": "r"}) is True
        own_redis_server.kill()
        results = await asyncio.gather(
            *(publisher.publish("c", {"run_id": f"r{i}"}) for i in range(5))
        )
        assert results == [False] * 5
        own_redis_server.start()
        assert await publisher.publish("c", {"run_id": "again"}) is True
    finally:
        await publisher.close()
        await client.aclose()


async def test_a_reply_for_a_hub_of_this_process_is_handed_over_in_memory(
    redis: aioredis.Redis,
) -> None:
    """The worker and the waiting request in one process: the reply reaches the waiter with
    the content a trip through Redis gives it (values JSON-encoded the same way), and
    nothing is published; once the hub is closed, replies to its channel go to Redis
    again."""
    hub = ReplyHub(redis, "local")
    await hub.start()
    spy = redis.pubsub()
    await spy.subscribe(hub.channel)
    publisher = ReplyPublisher(redis)
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    message = {"run_id": "r1", "kind": "respond", "status": 201, "body": {"at": at, "n": (1, 2)}}
    try:
        waiter = hub.register("r1")
        other = hub.register("r2")
        assert await publisher.publish(hub.channel, message) is True
        assert await publish_reply(redis, hub.channel, {"run_id": "r2", "kind": "final"})
        assert waiter.done() and other.done()
        assert waiter.result() == orjson.loads(orjson.dumps(message, default=str))
        assert waiter.result()["body"] == {"at": "2026-01-02T03:04:05+00:00", "n": [1, 2]}
        assert other.result() == {"run_id": "r2", "kind": "final"}
        assert publisher.round_trips == 0
        await hub.close()
        assert await publisher.publish(hub.channel, {"run_id": "r3"}) is True
        got = []
        async with asyncio.timeout(5):
            async for msg in spy.listen():
                if msg["type"] == "message":
                    got.append(orjson.loads(msg["data"]))
                    break
        assert got == [{"run_id": "r3"}]
    finally:
        await hub.close()
        await publisher.close()
        await spy.aclose()


async def test_a_hub_of_another_event_loop_gets_its_replies_through_redis(
    redis: aioredis.Redis,
) -> None:
    """In-memory hand-over only on the hub's own loop (its waiters' futures belong there)."""
    hub = ReplyHub(redis, "otherloop")
    await hub.start()
    try:
        hub.loop = asyncio.new_event_loop()  # as if started on another thread's loop
        waiter = hub.register("r1")
        publisher = ReplyPublisher(redis)
        try:
            assert await publisher.publish(hub.channel, {"run_id": "r1"}) is True
            assert publisher.round_trips == 1
        finally:
            await publisher.close()
        hub.loop.close()
        # The listener, on this loop, still delivers what came through Redis.
        assert await asyncio.wait_for(waiter, 5) == {"run_id": "r1"}
    finally:
        await hub.close()


async def test_hub_wait_wakes_on_the_reply_polls_the_store_and_cleans_up(
    redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ReplyHub.wait returns the reply as soon as it comes; without one it looks at the
    store every STORE_POLL_S and once more at the deadline; a cancelled wait leaves the
    waiter alone; no wake-up callbacks stay behind on the hub's gap future."""
    from conveyor.engine import replies  # noqa: PLC0415

    monkeypatch.setattr(replies, "STORE_POLL_S", 0.05)
    hub = ReplyHub(redis, "wait")
    await hub.start()
    reads: list[str] = []
    stored: dict[str, Any] = {}

    async def load_final() -> dict[str, Any] | None:
        reads.append("read")
        return stored.get("final")

    publisher = ReplyPublisher(redis)
    try:
        waiter = hub.register("r1")
        wait = asyncio.ensure_future(hub.wait(waiter, 30, load_final))
        await asyncio.sleep(0.01)
        assert await publisher.publish(hub.channel, {"run_id": "r1", "kind": "final"})
        assert await asyncio.wait_for(wait, 5) == {"run_id": "r1", "kind": "final"}
        assert reads == []

        waiter = hub.register("r2")
        assert await hub.wait(waiter, 0.12, load_final) is None
        assert len(reads) >= 2  # the polls and the last look at the deadline

        stored["final"] = {"run_id": "r3", "kind": "final", "run_status": "FAILED"}
        waiter = hub.register("r3")
        assert await asyncio.wait_for(hub.wait(waiter, 30, load_final), 5) == stored["final"]

        waiter = hub.register("r4")
        wait = asyncio.ensure_future(hub.wait(waiter, 30, load_final))
        await asyncio.sleep(0.01)
        wait.cancel()
        with pytest.raises(asyncio.CancelledError):
            await wait
        assert not waiter.done()
        gap = hub._gap_future()
        assert not gap._callbacks  # type: ignore[attr-defined]
    finally:
        await publisher.close()
        await hub.close()
