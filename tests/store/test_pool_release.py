"""The pool hands a connection back without asyncpg's reset round trip, yet nothing a
statement or transaction did leaks to the next user (real PostgreSQL)."""

from __future__ import annotations

from typing import Any

from conveyor.store.db import Database, PoolOptions


async def test_release_sends_no_reset_query(postgres_url: str) -> None:
    """Only the caller's own statement reaches the server for one acquire/release."""
    db = await Database.connect(postgres_url, PoolOptions(max_size=1))
    seen: list[str] = []

    def log(record: Any) -> None:
        seen.append(record.query)

    try:
        async with db.writer() as conn:
            raw = conn._con  # the pooled connection itself, which outlives the proxy
            raw.add_query_logger(log)
            assert await conn.fetchval("SELECT 1") == 1
        async with db.writer() as conn:
            assert conn._con is raw
            raw.remove_query_logger(log)
    finally:
        await db.close()
    assert seen == ["SELECT 1"]


async def test_transaction_state_does_not_leak(postgres_url: str) -> None:
    """SET LOCAL and a transaction-level advisory lock end with their transaction; the
    next user of the same connection sees the defaults and can take the lock elsewhere."""
    db = await Database.connect(postgres_url, PoolOptions(max_size=1))
    try:
        async with db.writer() as conn:
            default = await conn.fetchval("SHOW statement_timeout")
            async with conn.transaction():
                await conn.execute("SET LOCAL statement_timeout = '1234ms'")
                await conn.execute("SELECT pg_advisory_xact_lock(424242)")
        async with db.writer() as conn:
            assert await conn.fetchval("SHOW statement_timeout") == default
            assert (
                await conn.fetchval(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 424242"
                )
                == 0
            )
    finally:
        await db.close()
