"""Shared fixtures: real Redis and PostgreSQL, from the environment or embedded.

``CONVEYOR_TEST_REDIS_URL`` / ``CONVEYOR_TEST_POSTGRES_URL`` point at servers to use (CI sets
them to the machine's services); when unset, the session starts Conveyor's embedded servers in a
throwaway directory. Each test gets a dedicated Redis DB index flushed before it runs, and the
session gets a throwaway PostgreSQL database, migrated once and truncated before each test that
asks for ``db``. No mocks: everything here is a real server.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import redis.asyncio as aioredis
import uvloop

from conveyor.embedded import EmbeddedPostgres, EmbeddedRedis
from conveyor.store.db import Database, PoolOptions
from conveyor.store.migrations import migrate

# CONVEYOR_TEST_REDIS_DB lets two test runs share one Redis server without flushing each other.
TEST_REDIS_DB = int(os.environ.get("CONVEYOR_TEST_REDIS_DB", "13"))


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Tests run on uvloop, like production."""
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture(scope="session")
def embedded_dir() -> Iterator[Path]:
    """A world-traversable scratch dir (the embedded PostgreSQL user must reach into it)."""
    path = Path(tempfile.mkdtemp(prefix="conveyor-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _with_db_index(url: str, index: int) -> str:
    parts = urlsplit(url)
    if parts.scheme == "unix":
        query = f"db={index}"
        return urlunsplit(parts._replace(query=query))
    if parts.path.strip("/"):
        return url
    return urlunsplit(parts._replace(path=f"/{index}"))


@pytest.fixture(scope="session")
def redis_url(embedded_dir: Path) -> Iterator[str]:
    """URL of the Redis DB index tests may flush (server from env, else embedded)."""
    env = os.environ.get("CONVEYOR_TEST_REDIS_URL")
    if env:
        yield _with_db_index(env, TEST_REDIS_DB)
        return
    server = EmbeddedRedis(embedded_dir / "redis")
    base = server.start()
    try:
        yield _with_db_index(base, TEST_REDIS_DB)
    finally:
        server.stop()


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A client on the test DB index, flushed before the test."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=False)
    await client.flushdb()
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture(scope="session")
def postgres_server_url(embedded_dir: Path) -> Iterator[str]:
    """A URL with rights to create databases (server from env, else embedded)."""
    env = os.environ.get("CONVEYOR_TEST_POSTGRES_URL")
    if env:
        yield env
        return
    server = EmbeddedPostgres(embedded_dir / "postgres")
    url = server.start()
    try:
        yield url
    finally:
        server.stop()


def replace_database(url: str, database: str) -> str:
    """``url`` with its database name replaced (works for unix-socket URLs too)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{database}"))


@contextlib.asynccontextmanager
async def throwaway_database(server_url: str, prefix: str) -> AsyncIterator[str]:
    """Create an empty database on ``server_url``; yields its URL and drops it afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield replace_database(server_url, name)
    finally:
        admin = await asyncpg.connect(server_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest.fixture(scope="session")
async def postgres_url(postgres_server_url: str) -> AsyncIterator[str]:
    """A throwaway, migrated database for this test session; dropped at the end."""
    async with throwaway_database(postgres_server_url, "conveyor_test") as url:
        conn = await asyncpg.connect(url)
        try:
            await migrate(conn)
        finally:
            await conn.close()
        yield url


@pytest.fixture
async def empty_database_url(postgres_server_url: str) -> AsyncIterator[str]:
    """An empty, unmigrated database for one test."""
    async with throwaway_database(postgres_server_url, "conveyor_empty") as url:
        yield url


_APP_TABLES = ("step_runs", "runs", "flow_versions", "flows", "secrets")


@pytest.fixture
async def db(postgres_url: str) -> AsyncIterator[Database]:
    """A :class:`Database` on the session database, with every app table emptied first."""
    database = await Database.connect(postgres_url, PoolOptions(max_size=4))
    async with database.writer() as conn:
        existing = [
            t for t in _APP_TABLES if await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", t)
        ]
        if existing:
            await conn.execute(f"TRUNCATE {', '.join(existing)} CASCADE")
    try:
        yield database
    finally:
        await database.close()
