"""Database pools: reads routed to replicas, falling back to the primary when one is down."""

from __future__ import annotations

from urllib.parse import urlsplit

from conveyor.settings import Settings
from conveyor.store.db import Database, PoolOptions
from tests.processes import free_port


def _dbname(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


async def test_reads_go_to_replica_writes_to_primary(
    postgres_url: str, empty_database_url: str
) -> None:
    """With a healthy replica (another database here), reads use it; writes the primary."""
    replica_url = empty_database_url
    db = await Database.connect(postgres_url, PoolOptions(max_size=2), (replica_url,))
    try:
        rows = await db.fetch_read("SELECT current_database() AS name")
        assert rows[0]["name"] == _dbname(replica_url)
        async with db.writer() as conn:
            primary_name = await conn.fetchval("SELECT current_database()")
        assert primary_name == _dbname(postgres_url)
    finally:
        await db.close()


async def test_replica_down_falls_back_to_primary(postgres_url: str) -> None:
    """A replica URL nobody listens on: start-up succeeds and reads go to the primary."""
    down = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
    db = await Database.connect(postgres_url, PoolOptions(max_size=2, connect_timeout_s=1), (down,))
    try:
        rows = await db.fetch_read("SELECT current_database() AS name")
        assert rows[0]["name"] == _dbname(postgres_url)
        async with db.reader() as conn:
            assert await conn.fetchval("SELECT 1") == 1
    finally:
        await db.close()


async def test_pool_honours_settings(postgres_url: str) -> None:
    """Pool size, idle timeout and the PgBouncer switch come from the settings."""
    settings = Settings.from_env(
        {
            "AP_POSTGRES_URL": postgres_url,
            "AP_ENCRYPTION_KEY": "ab" * 16,
            "AP_POSTGRES_POOL_SIZE": "3",
            "AP_POSTGRES_IDLE_TIMEOUT_MS": "1500",
            "AP_POSTGRES_USE_PGBOUNCER": "true",
        }
    )
    opts = PoolOptions.from_settings(settings)
    assert (opts.max_size, opts.idle_timeout_s, opts.statement_cache) == (3, 1.5, False)
    db = await Database.from_settings(settings)
    try:
        assert db.primary.get_max_size() == 3
        async with db.writer() as conn:
            # No statement cache: safe behind PgBouncer in transaction mode.
            assert conn._stmt_cache.get_max_size() == 0
            assert await conn.fetchval("SELECT $1::jsonb", {"a": [1, 2]}) == {"a": [1, 2]}
    finally:
        await db.close()
