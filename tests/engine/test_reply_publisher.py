"""Coalesced sync replies (ReplyPublisher): many runs answering at once share one Redis round
trip, every message still reaches its own channel, and Redis away makes each publish return
False after its retries instead of raising (real Redis; a private server for the outage)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from conveyor.engine.replies import ReplyPublisher
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
