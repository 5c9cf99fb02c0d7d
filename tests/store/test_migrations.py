"""Migrations: idempotent, recorded, and safe when several processes start at once."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import asyncpg

from conveyor.store.migrations import available, migrate


async def test_migrate_applies_all_then_nothing(empty_database_url: str) -> None:
    """A first migrate applies every file and records it; a second applies nothing."""
    conn = await asyncpg.connect(empty_database_url)
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


async def test_concurrent_migrate_from_four_processes(empty_database_url: str) -> None:
    """Four processes migrating at once: exactly one applies each file, none fails."""
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _SCRIPT,
            empty_database_url,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(4)
    ]
    outs = [await p.communicate() for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1].decode() for o in outs]
    applied = sorted(int(o[0]) for o in outs)
    assert applied == [0, 0, 0, len(available())]
    conn = await asyncpg.connect(empty_database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM conveyor_migrations") == len(available())
    finally:
        await conn.close()
