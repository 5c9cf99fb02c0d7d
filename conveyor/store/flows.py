"""Flows and their immutable versions in PostgreSQL.

Every save of a flow document inserts a new ``flow_versions`` row and moves
``flows.current_version``; old versions stay so runs can say which version they ran and a
retry can run "on latest version" or on the one it started with.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from conveyor.errors import Conflict, NotFound
from conveyor.ids import uuid7
from conveyor.store.db import Database


@dataclass(frozen=True, slots=True)
class FlowRecord:
    """A flow at its current version: ``document`` is the validated flow document."""

    id: uuid.UUID
    name: str
    enabled: bool
    version: int
    document: dict[str, Any]
    created_at: datetime
    updated_at: datetime


_SELECT = """
SELECT f.id, f.name, f.enabled, f.current_version AS version, v.document,
       f.created_at, f.updated_at
FROM flows f JOIN flow_versions v ON v.flow_id = f.id AND v.version = f.current_version
"""


def _record(row: asyncpg.Record) -> FlowRecord:
    return FlowRecord(**dict(row))


async def create_flow(db: Database, name: str, document: dict[str, Any]) -> FlowRecord:
    """Insert a new, enabled flow at version 1; :class:`Conflict` if the name is taken."""
    flow_id = uuid7()
    async with db.writer() as conn, conn.transaction():
        try:
            await conn.execute(
                "INSERT INTO flows (id, name, current_version) VALUES ($1, $2, 1)", flow_id, name
            )
        except asyncpg.UniqueViolationError:
            raise Conflict(f"a flow named {name!r} already exists") from None
        await conn.execute(
            "INSERT INTO flow_versions (flow_id, version, document) VALUES ($1, 1, $2)",
            flow_id,
            document,
        )
        row = await conn.fetchrow(_SELECT + " WHERE f.id = $1", flow_id)
    return _record(row)


async def update_flow(
    db: Database, flow_id: uuid.UUID, name: str, document: dict[str, Any]
) -> FlowRecord:
    """Save ``document`` as the next version of ``flow_id``."""
    async with db.writer() as conn, conn.transaction():
        version = await conn.fetchval(
            "SELECT current_version FROM flows WHERE id = $1 FOR UPDATE", flow_id
        )
        if version is None:
            raise NotFound(f"flow {flow_id} not found")
        try:
            await conn.execute(
                "UPDATE flows SET name = $2, current_version = $3, updated_at = now() "
                "WHERE id = $1",
                flow_id,
                name,
                version + 1,
            )
        except asyncpg.UniqueViolationError:
            raise Conflict(f"a flow named {name!r} already exists") from None
        await conn.execute(
            "INSERT INTO flow_versions (flow_id, version, document) VALUES ($1, $2, $3)",
            flow_id,
            version + 1,
            document,
        )
        row = await conn.fetchrow(_SELECT + " WHERE f.id = $1", flow_id)
    return _record(row)


async def get_flow(db: Database, flow_id: uuid.UUID) -> FlowRecord:
    async with db.writer() as conn:
        row = await conn.fetchrow(_SELECT + " WHERE f.id = $1", flow_id)
    if row is None:
        raise NotFound(f"flow {flow_id} not found")
    return _record(row)


async def get_flow_by_name(db: Database, name: str) -> FlowRecord | None:
    async with db.writer() as conn:
        row = await conn.fetchrow(_SELECT + " WHERE f.name = $1", name)
    return None if row is None else _record(row)


async def get_version(db: Database, flow_id: uuid.UUID, version: int) -> dict[str, Any]:
    """The document of one version (what a run of that version executes)."""
    async with db.writer() as conn:
        doc = await conn.fetchval(
            "SELECT document FROM flow_versions WHERE flow_id = $1 AND version = $2",
            flow_id,
            version,
        )
    if doc is None:
        raise NotFound(f"flow {flow_id} version {version} not found")
    result: dict[str, Any] = doc
    return result


async def list_flows(
    db: Database, *, limit: int = 100, cursor: uuid.UUID | None = None
) -> list[FlowRecord]:
    """Newest first; ``cursor`` is the last id of the previous page."""
    rows = await db.fetch_read(
        _SELECT + " WHERE ($1::uuid IS NULL OR f.id < $1) ORDER BY f.id DESC LIMIT $2",
        cursor,
        limit,
    )
    return [_record(r) for r in rows]


async def set_enabled(db: Database, flow_id: uuid.UUID, enabled: bool) -> FlowRecord:
    async with db.writer() as conn:
        done = await conn.fetchval(
            "UPDATE flows SET enabled = $2, updated_at = now() WHERE id = $1 RETURNING id",
            flow_id,
            enabled,
        )
    if done is None:
        raise NotFound(f"flow {flow_id} not found")
    return await get_flow(db, flow_id)


async def delete_flow(db: Database, flow_id: uuid.UUID) -> None:
    async with db.writer() as conn:
        done = await conn.fetchval("DELETE FROM flows WHERE id = $1 RETURNING id", flow_id)
    if done is None:
        raise NotFound(f"flow {flow_id} not found")


async def ingest_info(db: Database, flow_id: uuid.UUID) -> tuple[bool, int] | None:
    """``(enabled, current_version)`` of a flow, or ``None`` — the webhook's one lookup."""
    async with db.writer() as conn:
        row = await conn.fetchrow(
            "SELECT enabled, current_version FROM flows WHERE id = $1", flow_id
        )
    return None if row is None else (row["enabled"], row["current_version"])


@dataclass(frozen=True, slots=True)
class ScheduledFlow:
    """An enabled flow whose current version has a ``schedule`` trigger (``trigger`` is the
    trigger's document; ``updated_at`` is when it was last saved, enabled or disabled)."""

    id: uuid.UUID
    version: int
    trigger: dict[str, Any]
    updated_at: datetime


async def list_schedule_flows(db: Database) -> list[ScheduledFlow]:
    """Every enabled schedule flow — the scheduler's periodic refresh (only the trigger is
    read, never the steps). Reads the primary: a replica's lag would delay a disable."""
    async with db.writer() as conn:
        rows = await conn.fetch(
            """SELECT f.id, f.current_version AS version, v.document -> 'trigger' AS trigger,
                      f.updated_at
               FROM flows f
               JOIN flow_versions v ON v.flow_id = f.id AND v.version = f.current_version
               WHERE f.enabled AND v.document -> 'trigger' ->> 'type' = 'schedule'"""
        )
    return [ScheduledFlow(**dict(r)) for r in rows]


async def last_schedule_keys(db: Database, flow_ids: list[uuid.UUID]) -> dict[uuid.UUID, str]:
    """The greatest ``schedule:<flow>:<tick>`` idempotency key among each flow's runs — its
    last fired tick, so a new scheduler leader neither fires it again nor replays older ones.
    One backward scan of the ``(flow_id, idempotency_key)`` index per flow."""
    if not flow_ids:
        return {}
    async with db.writer() as conn:
        rows = await conn.fetch(
            """SELECT u.id, (SELECT r.idempotency_key FROM runs r
                             WHERE r.flow_id = u.id
                               AND r.idempotency_key LIKE 'schedule:' || u.id::text || ':%'
                               AND r.trigger ->> 'method' = 'SCHEDULE'
                             ORDER BY r.idempotency_key DESC LIMIT 1) AS key
               FROM unnest($1::uuid[]) AS u(id)""",
            flow_ids,
        )
    return {r["id"]: r["key"] for r in rows if r["key"] is not None}
