"""Sync replies are transport: publishing never raises for Redis, and a waiter whose channel
was lost in a Redis restart reads the stored outcome at once instead of waiting it out."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from conveyor.engine import replies
from conveyor.engine.replies import ReplyHub, publish_reply
from tests.queue.servers import RedisServer


@pytest.fixture
def own_redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server this test may kill (never the shared one)."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.kill()


async def test_publish_reply_gives_up_without_raising(own_redis_server: RedisServer) -> None:
    """With Redis gone, publishing retries a bounded number of times and returns False."""
    client = aioredis.Redis.from_url(own_redis_server.url, socket_connect_timeout=1)
    try:
        assert await publish_reply(client, "c", {"run_id": "r"}) is True
        own_redis_server.kill()
        assert await publish_reply(client, "c", {"run_id": "r"}) is False
    finally:
        await client.aclose()


async def test_waiter_reads_the_store_after_a_channel_gap(
    own_redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reply published while the hub was disconnected is lost; once the hub resubscribes,
    waiters read the stored final state long before their timeout (no periodic poll here)."""
    monkeypatch.setattr(replies, "STORE_POLL_S", 3600.0)
    client = aioredis.Redis.from_url(own_redis_server.url, socket_connect_timeout=1)
    hub = ReplyHub(client, "gap")
    await hub.start()
    stored: dict[str, Any] = {}
    reads = 0

    async def load_final() -> dict[str, Any] | None:
        nonlocal reads
        reads += 1
        return stored.get("final")

    try:
        waiter = hub.register("r1")
        timeout_s = 60.0
        started = time.monotonic()
        wait = asyncio.ensure_future(hub.wait(waiter, timeout_s, load_final))
        own_redis_server.kill()
        # The worker commits meanwhile; its reply cannot be delivered.
        stored["final"] = {"run_id": "r1", "kind": "final", "run_status": "SUCCEEDED"}
        await asyncio.sleep(0.5)
        own_redis_server.start()
        found = await asyncio.wait_for(wait, timeout_s)
        assert found == stored["final"]
        assert time.monotonic() - started < timeout_s / 2  # the gap, not the deadline, woke it
        assert reads >= 1
    finally:
        await hub.close()
        await client.aclose()
