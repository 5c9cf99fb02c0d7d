"""Numbered SQL migrations, applied once, in order, under a PostgreSQL advisory lock.

Files are ``sql/NNNN_name.sql`` inside this package. Many processes may start at once
(a PM2 cluster, a scaled Deployment): each takes the same advisory lock, so one applies what
is missing while the others wait and then find nothing left to do. The files run in one
transaction together with the rows that record them in ``conveyor_migrations``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

import asyncpg

# Arbitrary constant shared by every Conveyor process: "conveyor" as a 63-bit number.
MIGRATION_LOCK_ID = 0x636F6E7665796F72

_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def available() -> list[Migration]:
    """Every migration shipped with this package, in version order."""
    found = []
    for entry in resources.files("conveyor.store").joinpath("sql").iterdir():
        m = _FILE.match(entry.name)
        if m:
            found.append(Migration(int(m.group(1)), m.group(2), entry.read_text()))
    return sorted(found, key=lambda mig: mig.version)


async def applied_versions(conn: asyncpg.Connection) -> set[int]:
    exists = await conn.fetchval("SELECT to_regclass('conveyor_migrations') IS NOT NULL")
    if not exists:
        return set()
    rows = await conn.fetch("SELECT version FROM conveyor_migrations")
    return {r["version"] for r in rows}


async def pending(conn: asyncpg.Connection) -> list[Migration]:
    done = await applied_versions(conn)
    return [m for m in available() if m.version not in done]


async def migrate(conn: asyncpg.Connection) -> list[Migration]:
    """Apply what is missing; returns the migrations this call applied (empty if none).

    Everything happens in one transaction holding a transaction-level advisory lock, so it is
    also safe behind PgBouncer's transaction pooling (a session lock could be taken on one
    server connection and released on another), and a failed file leaves nothing half done.
    """
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_ID)
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS conveyor_migrations (
                   version    integer PRIMARY KEY,
                   name       text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        todo = await pending(conn)
        for mig in todo:
            await conn.execute(mig.sql)
            await conn.execute(
                "INSERT INTO conveyor_migrations (version, name) VALUES ($1, $2)",
                mig.version,
                mig.name,
            )
    return todo
