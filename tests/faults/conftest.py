"""Fixtures of the fault tests: a private Redis and database, the flows' endpoint, and a
deployment whose processes are all killed at the end whatever happened."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.conftest import throwaway_database
from tests.faults.harness import Deployment, Endpoint
from tests.queue.servers import RedisServer


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server (AOF, fsync always) on a free loopback port that the test may kill."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
async def fault_db(postgres_server_url: str) -> AsyncIterator[str]:
    """An empty database of its own (Conveyor migrates it at start)."""
    async with throwaway_database(postgres_server_url, "conveyor_fault") as url:
        yield url


@pytest.fixture
async def endpoint() -> AsyncIterator[Endpoint]:
    """The HTTP service the flows call."""
    server = Endpoint()
    await server.start()
    try:
        yield server
    finally:
        await server.close()


@pytest.fixture
async def deployment(
    tmp_path: Path, private_redis: RedisServer, fault_db: str
) -> AsyncIterator[Deployment]:
    """APP/WORKER processes on the private Redis and the test's database."""
    deployed = Deployment(tmp_path, private_redis.url, fault_db)
    try:
        yield deployed
    finally:
        await deployed.kill_all()
