"""Migrations: idempotent, recorded, and safe when several processes start at once."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from conveyor.store.migrations import available, migrate
from tests.conftest import replace_database


@pytest.fixture
async def fresh_db_url(postgres_server_url: str) -> AsyncIterator[str]:
    """An empty database, dropped after the test."""
    name = f"conveyor_mig_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(postgres_server_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    yield replace_database(postgres_server_url, name)
    admin = await asyncpg.connect(postgres_server_url)
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin.close()


async def test_migrate_applies_all_then_nothing(fresh_db_url: str) -> None:
    """A first migrate applies every file and records it; a second applies nothing."""
    conn = await asyncpg.connect(fresh_db_url)
    try:
        first = await migrate(conn)
        assert [m.version for m in first] == [m.version for m in available()]
        assert await migrate(conn) == []
        recorded = await conn.fetch("SELECT version FROM conveyor_migrations ORDER BY version")
        assert [r["version"] for r in recorded] == [m.version for m in available()]
        for table in ("flows", "flow_versions", "runs", "step_runs", "secrets"):
            assert await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", table)
    finally:
        await conn.close()


_SCRIPT = """
import asyncio, sys, asyncpg
from conveyor.store.migrations import migrate
async def main():
    conn = await asyncpg.connect(sys.argv[1])
    done = await migrate(conn)
    print(len(done))
    await conn.close()
asyncio.run(main())
"""


async def test_concurrent_migrate_from_four_processes(fresh_db_url: str) -> None:
    """Four processes migrating at once: exactly one applies each file, none fails."""
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _SCRIPT,
            fresh_db_url,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(4)
    ]
    outs = [await p.communicate() for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1].decode() for o in outs]
    applied = sorted(int(o[0]) for o in outs)
    assert applied == [0, 0, 0, len(available())]
    conn = await asyncpg.connect(fresh_db_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM conveyor_migrations") == len(available())
    finally:
        await conn.close()
