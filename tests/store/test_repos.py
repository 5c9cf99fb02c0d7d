"""Flows, runs and secrets repositories against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from conveyor.errors import Conflict, InternalError, NotFound
from conveyor.ids import uuid7
from conveyor.status import RunStatus
from conveyor.store import flows, runs, secrets
from conveyor.store.db import Database

DOC = {"name": "f", "trigger": {"type": "webhook"}, "steps": []}


async def test_flow_versions_are_immutable(db: Database) -> None:
    """Each save makes a new version; old versions stay readable; names are unique."""
    f = await flows.create_flow(db, "f", DOC)
    assert (f.version, f.enabled) == (1, True)
    g = await flows.update_flow(db, f.id, "f", {**DOC, "steps": [{"name": "a"}]})
    assert g.version == 2
    assert await flows.get_version(db, f.id, 1) == DOC
    with pytest.raises(Conflict):
        await flows.create_flow(db, "f", DOC)
    assert (await flows.set_enabled(db, f.id, False)).enabled is False
    await flows.delete_flow(db, f.id)
    with pytest.raises(NotFound):
        await flows.get_flow(db, f.id)


async def test_group_commit_and_idempotency(db: Database) -> None:
    """Concurrent inserts commit together; a repeated key returns the first run."""
    f = await flows.create_flow(db, "f", DOC)
    writer = runs.RunWriter(db)
    trig = {"method": "POST", "headers": {}, "query": {}, "body": {"n": 1}}
    new = [runs.NewRun(uuid7(), f.id, 1, trig, response_status=202) for _ in range(50)]
    keyed = [
        runs.NewRun(uuid7(), f.id, 1, trig, idempotency_key="k1", response_status=202)
        for _ in range(3)
    ]
    results = await asyncio.gather(*(writer.insert(r) for r in new + keyed))
    assert all(r.created for r in results[:50])
    key_results = results[50:]
    assert sum(r.created for r in key_results) == 1
    assert len({r.run_id for r in key_results}) == 1
    assert all(r.response_status == 202 for r in key_results)
    listed = await runs.list_runs(db, flow_id=f.id, limit=100)
    assert len(listed) == 51
    assert [r["id"] for r in listed] == sorted((r["id"] for r in listed), reverse=True)
    await writer.close()


async def test_terminal_runs_never_change(db: Database) -> None:
    """A run that is CANCELED stays CANCELED when a worker later reports success or steps."""
    f = await flows.create_flow(db, "f", DOC)
    writer = runs.RunWriter(db)
    rid = uuid7()
    await writer.insert(runs.NewRun(rid, f.id, 1, {"body": None}))
    assert await writer.transition(runs.Transition(rid, RunStatus.RUNNING, bump_attempt=True))
    step = {
        "name": "a",
        "type": "transform",
        "status": "SUCCEEDED",
        "input": {"a": 1},
        "output": {"a": 1},
        "logs": "",
    }
    assert await writer.add_step(runs.StepRow(rid, 0, step))
    assert await writer.transition(runs.Transition(rid, RunStatus.CANCELED))
    assert not await writer.transition(runs.Transition(rid, RunStatus.SUCCEEDED, output={"x": 1}))
    assert not await writer.add_step(runs.StepRow(rid, 1, {**step, "name": "b"}))
    row = await runs.get_run(db, rid)
    assert row["status"] == "CANCELED" and row["output"] is None and row["finished_at"]
    steps = await runs.get_steps(db, rid)
    assert [s["name"] for s in steps] == ["a"]
    again = await runs.reset_for_retry(db, rid, flow_version=1, keep_steps=True)
    assert again["retried"] and again["status"] == "QUEUED" and again["attempt"] == 1
    assert await writer.transition(runs.Transition(rid, RunStatus.RUNNING, bump_attempt=True))
    assert (await runs.get_run(db, rid))["attempt"] == 2
    assert [s["name"] for s in await runs.get_steps(db, rid)] == ["a"]
    await writer.close()


async def test_secrets_encrypted_and_bound_to_name(db: Database) -> None:
    """Values are stored encrypted, decrypt only under their own name and key."""
    box = secrets.SecretBox("ab" * 32)
    assert await secrets.put_secret(db, box, "TOKEN", "s3cret")
    assert not await secrets.put_secret(db, box, "TOKEN", "s3cret2")
    async with db.writer() as conn:
        blob = await conn.fetchval("SELECT ciphertext FROM secrets WHERE name = 'TOKEN'")
    assert b"s3cret" not in blob
    assert await secrets.load_secrets(db, box, ["TOKEN", "MISSING"]) == {"TOKEN": "s3cret2"}
    kid, sealed = box.encrypt("A", "v")
    with pytest.raises(InternalError):
        box.decrypt("B", kid, sealed)
    rotated = secrets.SecretBox("cd" * 16, previous=["ab" * 32])
    assert await secrets.load_secrets(db, rotated, ["TOKEN"]) == {"TOKEN": "s3cret2"}
    assert [s["name"] for s in await secrets.list_secret_names(db)] == ["TOKEN"]
    await secrets.delete_secret(db, "TOKEN")
    with pytest.raises(NotFound):
        await secrets.delete_secret(db, "TOKEN")
    assert uuid.UUID(str(uuid7())).version == 7
