"""Fixtures of the queue tests: short timeouts, and private Redis servers for fault tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from conveyor.queue import QueueConfig
from tests.queue.servers import RedisServer


@pytest.fixture
def cfg() -> QueueConfig:
    """A configuration with sub-second timeouts so retries and reclaims finish quickly."""
    return QueueConfig(
        concurrency=8,
        visibility_timeout_s=0.6,
        heartbeat_s=0.15,
        backoff_base_s=0.01,
        backoff_cap_s=0.05,
        delayed_poll_s=0.02,
        pause_poll_s=0.05,
        trim_interval_s=0.2,
        block_ms=50,
    )


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server (AOF on) the test may kill and restart."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
async def own_redis(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A client on the private server."""
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=False)
    try:
        yield client
    finally:
        await client.aclose()
