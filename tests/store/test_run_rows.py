"""What the batched run writes store: every JSON shape as itself, NUL replaced, timestamps
with their zone, "unchanged" fields kept, and plans that reach runs by primary key only."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from conveyor.ids import uuid7
from conveyor.records import StepRecord
from conveyor.status import RunStatus
from conveyor.store import flows, runs
from conveyor.store.db import Database
from conveyor.store.runs import Finish, NewRun, RunWriter, StepRow, Transition

DOC = {"name": "f", "trigger": {"type": "webhook"}, "steps": []}

# Every JSON shape a trigger, an output or a step input may take, a list at the top included
# (a loop's output) and strings that look like JSON or SQL.
SHAPES: list[Any] = [
    {"a": [1, 2.5, None, True], "b": {"c": "d"}},
    [1, [2, [3]], {"x": []}],
    "a string",
    '{"not": "an object"}',
    "it's $1 -- ; DROP TABLE runs",
    0,
    -1.25,
    True,
    False,
    [],
    {},
]


async def _flow(db: Database) -> uuid.UUID:
    return (await flows.create_flow(db, f"f-{uuid.uuid4().hex[:8]}", DOC)).id


@pytest.mark.parametrize("shape", SHAPES)
async def test_json_shapes_round_trip(db: Database, shape: Any) -> None:
    """A trigger, a run output and a step's input/output/error come back as they went in."""
    fid = await _flow(db)
    writer = RunWriter(db)
    rid = uuid7()
    try:
        assert (await writer.insert(NewRun(rid, fid, 1, shape))).created
        rec = StepRecord(
            name="s",
            type="code",
            status="SUCCEEDED",
            input=shape,
            output=shape,
            error=shape,
            logs="line\n",
        )
        assert await writer.add_step(StepRow(rid, 0, rec))
        assert await writer.finish(
            Finish(
                Transition(rid, RunStatus.SUCCEEDED, output=shape, bump_attempt=True),
                [StepRow(rid, 1, rec)],
            )
        )
    finally:
        await writer.close()
    row = await runs.get_run(db, rid)
    assert row["trigger"] == shape and row["output"] == shape
    assert (row["status"], row["attempt"]) == ("SUCCEEDED", 1)
    steps = await runs.get_steps(db, rid)
    assert [(s.input, s.output, s.error, s.logs) for s in steps] == [
        (shape, shape, shape, "line\n")
    ] * 2


async def test_nul_is_replaced_everywhere(db: Database) -> None:
    """NUL in a trigger, a key, an output, an error, a log or a step's name is stored as U+FFFD;
    its batch neighbours are stored unchanged."""
    fid = await _flow(db)
    writer = RunWriter(db)
    bad, good = uuid7(), uuid7()
    nul = {"k\x00": ["v\x00", {"deep": "x\x00y"}], "ok": "plain"}
    fixed = {"k\ufffd": ["v\ufffd", {"deep": "x\ufffdy"}], "ok": "plain"}
    try:
        await asyncio.gather(
            writer.insert(NewRun(bad, fid, 1, nul)), writer.insert(NewRun(good, fid, 1, {"n": 1}))
        )
        rec = StepRecord(
            name="s\x00",
            type="code",
            status="FAILED",
            output=nul,
            error={"message": "boom\x00"},
            logs="a\x00b",
        )
        assert await writer.finish(
            Finish(
                Transition(
                    bad, RunStatus.FAILED, output=nul, error={"m": "\x00"}, bump_attempt=True
                ),
                [StepRow(bad, 0, rec)],
            )
        )
    finally:
        await writer.close()
    row = await runs.get_run(db, bad)
    assert row["trigger"] == fixed and row["output"] == fixed
    assert row["error"] == {"m": "\ufffd"}
    (step,) = await runs.get_steps(db, bad)
    assert (step.name, step.output, step.error, step.logs) == (
        "s\ufffd",
        fixed,
        {"message": "boom\ufffd"},
        "a\ufffdb",
    )
    assert (await runs.get_run(db, good))["trigger"] == {"n": 1}


async def test_none_keeps_output_error_and_timestamps_keep_their_zone(db: Database) -> None:
    """A transition without output/error keeps the stored ones; resume_at and started_at are
    stored as the instants they name (a naive one is local time, as asyncpg reads it)."""
    fid = await _flow(db)
    writer = RunWriter(db)
    rid = uuid7()
    resume = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    naive = datetime(2029, 5, 6, 7, 8, 9, 123456)
    try:
        await writer.insert(NewRun(rid, fid, 1, {}))
        assert await writer.transition(Transition(rid, RunStatus.RUNNING, bump_attempt=True))
        assert await writer.transition(
            Transition(rid, RunStatus.RUNNING, output={"partial": 1}, error={"e": 1})
        )
        assert await writer.transition(Transition(rid, RunStatus.PAUSED, resume_at=resume))
        row = await runs.get_run(db, rid)
        assert (row["output"], row["error"], row["resume_at"]) == ({"partial": 1}, {"e": 1}, resume)
        assert row["attempt"] == 1 and row["started_at"] is not None
        rec = StepRecord(
            name="s",
            type="delay",
            status="SUCCEEDED",
            started_at=naive,
            duration_ms=1.5,
            attempt=3,
            parent="loop",
            iteration=7,
        )
        assert await writer.add_step(StepRow(rid, 0, rec))
        assert await writer.transition(Transition(rid, RunStatus.RUNNING, bump_attempt=True))
        assert (await runs.get_run(db, rid))["attempt"] == 1  # resuming a pause is no attempt
        assert await writer.transition(Transition(rid, RunStatus.SUCCEEDED, attempt=5))
    finally:
        await writer.close()
    row = await runs.get_run(db, rid)
    assert (row["status"], row["attempt"], row["resume_at"]) == ("SUCCEEDED", 5, None)
    assert row["finished_at"] is not None and row["output"] == {"partial": 1}
    (step,) = await runs.get_steps(db, rid)
    assert step.started_at == naive.astimezone(UTC)
    assert (step.duration_ms, step.attempt, step.parent, step.iteration) == (1.5, 3, "loop", 7)


async def test_batch_of_mixed_runs_and_missing_run(db: Database) -> None:
    """One batch: transitions of existing runs apply, one of a run that does not exist is
    False, a step for a missing run is not stored."""
    fid = await _flow(db)
    writer = RunWriter(db)
    ids = [uuid7() for _ in range(20)]
    ghost = uuid.uuid4()
    try:
        await asyncio.gather(*(writer.insert(NewRun(i, fid, 1, {"i": str(i)})) for i in ids))
        moved = await asyncio.gather(
            *(
                writer.transition(Transition(i, RunStatus.RUNNING, bump_attempt=True))
                for i in [*ids, ghost]
            )
        )
        rec = StepRecord(name="s", type="code", status="SUCCEEDED")
        stored = await asyncio.gather(*(writer.add_step(StepRow(i, 0, rec)) for i in [ghost, *ids]))
    finally:
        await writer.close()
    assert moved == [True] * 20 + [False]
    assert stored == [False] + [True] * 20
    for i in ids:
        row = await runs.get_run(db, i)
        assert (row["status"], row["trigger"]) == ("RUNNING", {"i": str(i)})


def _literal(value: Any) -> str:
    if isinstance(value, str):
        assert "$j$" not in value
        return f"$j${value}$j$"
    return "'{" + ",".join(str(v) for v in value) + "}'::uuid[]"


async def test_cached_plans_reach_runs_by_primary_key(db: Database) -> None:
    """The batched statements' cached (generic) plans never scan the runs table: a batch of
    one must not cost a pass over every run (the planner takes "not terminal" for very
    selective; on a table of a few thousand rows a scan is cheaper, and _replanned
    prepares the statement again as the table grows)."""
    fid = await _flow(db)
    step = StepRow(uuid7(), 0, StepRecord("s", "code", "OK"))
    move = Transition(uuid7(), RunStatus.SUCCEEDED)
    statements: list[tuple[str, list[Any]]] = [
        (runs._TRANSITION, [*runs._transition_args([move])]),
        (runs._STEPS, [runs._step_args([step])]),
        (runs._FINISH, [runs._step_args([step]), *runs._transition_args([move])]),
    ]
    async with db.writer() as conn:
        await conn.execute(
            """INSERT INTO runs (id, flow_id, flow_version, status, trigger)
               SELECT gen_random_uuid(), $1, 1, 'SUCCEEDED', '{}'
               FROM generate_series(1, 20000)""",
            fid,
        )
        await conn.execute("ANALYZE runs")
        async with conn.transaction():
            await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
            for i, (sql, params) in enumerate(statements):
                await conn.execute(f"PREPARE plan_probe_{i} AS {sql}")
                args = ", ".join(_literal(p) for p in params)
                rows = await conn.fetch(f"EXPLAIN EXECUTE plan_probe_{i}({args})")
                await conn.execute(f"DEALLOCATE plan_probe_{i}")
                plan = "\n".join(r[0] for r in rows)
                assert "Seq Scan on runs" not in plan, plan
                assert "runs_pkey" in plan, plan


async def test_updates_are_prepared_anew_as_runs_move(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every REPLAN_ROWS runs moved the UPDATE gets a new statement text (a new plan), and
    the writes across the change are all applied."""
    monkeypatch.setattr(runs, "REPLAN_ROWS", 2)
    fid = await _flow(db)
    writer = RunWriter(db)
    texts = set()
    original = writer._replanned

    def spy(sql: str, rows: int) -> str:
        text = original(sql, rows)
        texts.add(text)
        return text

    monkeypatch.setattr(writer, "_replanned", spy)
    ids = [uuid7() for _ in range(6)]
    try:
        for i in ids:
            await writer.insert(NewRun(i, fid, 1, {}))
            assert await writer.transition(Transition(i, RunStatus.RUNNING, bump_attempt=True))
            assert await writer.finish(
                Finish(
                    Transition(i, RunStatus.SUCCEEDED),
                    [StepRow(i, 0, StepRecord("s", "code", "SUCCEEDED"))],
                )
            )
    finally:
        await writer.close()
    assert len(texts) >= 6
    for i in ids:
        assert (await runs.get_run(db, i))["status"] == "SUCCEEDED"
