"""A first delivery starts lazily: a flow without effects (only transform, branch, respond) runs
in memory and is committed once — no RUNNING transition, the steps and the final state in one
statement, the attempt counted, a sync caller answered with the respond step; a run canceled
while queued stays CANCELED; before the first step with effects, RUNNING is written together
with the checkpoints held so far. A contained code step starts before RUNNING, which follows
within LAZY_RUNNING_S of its code starting unless the step is done by then. Real PostgreSQL,
Redis and the real engine worker."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from conveyor.engine import worker as worker_module
from conveyor.engine.registry import FlowRegistry
from conveyor.engine.replies import ReplyHub
from conveyor.engine.submit import OnFull, RunJob, Submitter
from conveyor.engine.worker import RunWorker
from conveyor.ids import uuid7
from conveyor.queue.job import Job, _EntryLost
from conveyor.sandbox.client import Sandbox
from conveyor.sandbox.config import SandboxConfig
from conveyor.status import RunStatus
from conveyor.store import flows as flow_store
from conveyor.store import runs as run_store
from conveyor.store.db import Database
from conveyor.store.runs import Finish, NewRun, RunWriter, Transition
from conveyor.store.secrets import SecretBox
from tests.api.conftest import ENCRYPTION_KEY, make_settings

PURE = {
    "name": "pure",
    "trigger": {"type": "webhook"},
    "steps": [
        {"name": "parse", "type": "transform", "input": {"total": "{{trigger.body.n}}"}},
        {
            "name": "route",
            "type": "branch",
            "when": {"all": [{"left": "{{parse.total}}", "op": "gt", "right": 1}]},
            "then": [{"name": "big", "type": "transform", "input": {"big": True}}],
            "else": [],
        },
        {"name": "reply", "type": "respond", "input": {"status": 201, "body": "{{parse}}"}},
    ],
}


class _CountingWriter(RunWriter):
    """A RunWriter noting every state written and the steps written with it (the real
    writes happen)."""

    def __init__(self, db: Database) -> None:
        super().__init__(db)
        self.statuses: list[str] = []
        self.writes: list[tuple[str, list[str]]] = []

    async def transition(self, change: Transition) -> bool:
        self.statuses.append(change.status.value)
        return await super().transition(change)

    async def finish(self, done: Finish) -> bool:
        self.writes.append((done.change.status.value, [r.record.name for r in done.steps]))
        return await super().finish(done)


def _worker(
    db: Database, redis: aioredis.Redis, urls: tuple[str, str], sandbox: Sandbox | None = None
) -> RunWorker:
    """A real worker on ``db`` and ``redis`` with a :class:`_CountingWriter` (``urls``: the
    PostgreSQL and Redis URLs its settings name)."""
    return RunWorker(
        make_settings(*urls, AP_CONTAINER_TYPE="WORKER"),
        writer=_CountingWriter(db),
        registry=FlowRegistry(db),
        box=SecretBox(ENCRYPTION_KEY),
        redis=redis,
        sandbox=sandbox,
        http=None,
    )


async def _close(w: RunWorker) -> None:
    await w.replies.close()
    await w.producer.close()
    await w.writer.close()


@pytest.fixture
async def worker(
    db: Database, redis: aioredis.Redis, postgres_url: str, redis_url: str
) -> AsyncIterator[RunWorker]:
    w = _worker(db, redis, (postgres_url, redis_url))
    yield w
    await _close(w)


async def _submit(
    db: Database, w: RunWorker, doc: dict[str, Any], reply: str | None = None, n: int = 5
) -> uuid.UUID:
    flow = await flow_store.create_flow(db, f"{doc['name']}-{uuid.uuid4().hex[:6]}", doc)
    new = NewRun(uuid7(), flow.id, flow.version, {"body": {"n": n}}, queue="sync")
    sub = await Submitter(w.writer, w.producer).submit(new, on_full=OnFull.REFUSE, reply=reply)
    return sub.run_id


async def test_pure_run_answers_and_commits_once(
    db: Database, redis: aioredis.Redis, worker: RunWorker
) -> None:
    """The sync caller gets the respond step's answer; no RUNNING transition; SUCCEEDED with
    attempt 1, started_at set and every step stored, in execution order."""
    hub = ReplyHub(redis, "inmem")
    await hub.start()

    async def nothing_stored() -> dict[str, Any] | None:
        return None  # the answer must come from the worker, not from reading the store

    # The run id is chosen by _submit: submit first, then register (nothing runs before the
    # drain below starts the consumer).
    rid = await _submit(db, worker, PURE, reply=hub.channel)
    waiter = hub.register(str(rid))
    try:
        drained = asyncio.create_task(worker.consumer.drain())
        message = await hub.wait(waiter, 20, nothing_stored)
        assert message is not None and message["kind"] == "respond"
        assert message["status"] == 201 and message["body"] == {"total": 5}
        await asyncio.wait_for(drained, 30)
        run = await run_store.get_run(db, rid)
        assert run["status"] == "SUCCEEDED"
    finally:
        hub.forget(str(rid))
        await hub.close()
    assert isinstance(worker.writer, _CountingWriter)
    assert "RUNNING" not in worker.writer.statuses
    assert worker.writer.writes == [("SUCCEEDED", ["parse", "route", "big", "reply"])]
    assert run["attempt"] == 1 and run["started_at"] is not None
    assert run["finished_at"] is not None
    steps = await run_store.get_steps(db, rid)
    assert [(s.seq, s.name, s.parent) for s in steps] == [
        (0, "parse", None),
        (1, "route", None),
        (2, "big", "route"),
        (3, "reply", None),
    ]


async def test_pure_run_canceled_before_it_starts_stays_canceled(
    db: Database, worker: RunWorker
) -> None:
    """A cancel that lands first wins: the run stays CANCELED with no step stored."""
    rid = await _submit(db, worker, PURE)
    assert await worker.writer.transition(Transition(rid, RunStatus.CANCELED))
    await asyncio.wait_for(worker.consumer.drain(), 30)
    run = await run_store.get_run(db, rid)
    assert run["status"] == "CANCELED"
    assert await run_store.get_steps(db, rid) == []


async def test_running_goes_with_the_held_steps_before_a_step_with_effects(
    db: Database, worker: RunWorker
) -> None:
    """transform → code (no sandbox here, so the code step fails): RUNNING is written together
    with the transform's record before the code step starts, then the code step's record,
    then the final state; the attempt is counted once."""
    doc = {
        "name": "effects",
        "trigger": {"type": "webhook"},
        "steps": [
            {"name": "parse", "type": "transform", "input": {"n": "{{trigger.body.n}}"}},
            {"name": "c", "type": "code", "code": "def run(input):\n    return 1\n"},
        ],
    }
    rid = await _submit(db, worker, doc)
    await asyncio.wait_for(worker.consumer.drain(), 30)
    assert isinstance(worker.writer, _CountingWriter)
    assert worker.writer.writes[0] == ("RUNNING", ["parse"])
    assert worker.writer.writes[-1][0] in ("FAILED", "INTERNAL_ERROR")
    run = await run_store.get_run(db, rid)
    assert run["status"] == worker.writer.writes[-1][0] and run["attempt"] == 1
    assert [s.name for s in await run_store.get_steps(db, rid)] == ["parse", "c"]


async def test_a_run_canceled_while_queued_runs_no_step_with_effects(
    db: Database, worker: RunWorker
) -> None:
    """transform → code, canceled before its first delivery: the transform runs in memory,
    the start is refused before the code step, nothing is stored and the run stays
    CANCELED."""
    doc = {
        "name": "effects2",
        "trigger": {"type": "webhook"},
        "steps": [
            {"name": "parse", "type": "transform", "input": {"n": "{{trigger.body.n}}"}},
            {"name": "c", "type": "code", "code": "def run(input):\n    return 1\n"},
        ],
    }
    rid = await _submit(db, worker, doc)
    assert await worker.writer.transition(Transition(rid, RunStatus.CANCELED))
    await asyncio.wait_for(worker.consumer.drain(), 30)
    run = await run_store.get_run(db, rid)
    assert run["status"] == "CANCELED" and run["attempt"] == 0
    assert await run_store.get_steps(db, rid) == []


async def test_a_delivery_taken_over_mid_run_writes_no_final_state(
    db: Database, worker: RunWorker
) -> None:
    """Another worker took this delivery over (the fence raises at the first durable write,
    before the delay): the handler stops with the fence's error and writes nothing — the run
    stays QUEUED for its new owner, never INTERNAL_ERROR."""
    doc = {
        "name": "fenced",
        "trigger": {"type": "webhook"},
        "steps": [
            {"name": "a", "type": "transform", "input": {"x": 1}},
            {"name": "wait", "type": "delay", "input": {"seconds": 0}},
            {"name": "b", "type": "transform", "input": {"y": 2}},
        ],
    }
    flow = await flow_store.create_flow(db, f"fenced-{uuid.uuid4().hex[:6]}", doc)
    rid = uuid7()
    await worker.writer.insert(NewRun(rid, flow.id, flow.version, {"body": {}}))
    payload = RunJob(run_id=str(rid), flow_id=str(flow.id), version=flow.version).to_payload()
    job = Job(str(rid), "runs", payload, 1, "1-0", 0, 0)

    async def taken_over(j: Job) -> None:
        raise _EntryLost(j.entry_id)

    job.fence = taken_over
    with pytest.raises(_EntryLost):
        await worker.handle(job)
    run = await run_store.get_run(db, rid)
    assert (run["status"], run["error"]) == ("QUEUED", None)
    assert await run_store.get_steps(db, rid) == []


FOUR = {
    "name": "four",
    "trigger": {"type": "webhook"},
    "steps": [
        {"name": "parse", "type": "transform", "input": {"n": "{{trigger.body.n}}"}},
        {
            "name": "score",
            "type": "code",
            "input": {"n": "{{parse.n}}"},
            "code": "def run(input):\n    return {'big': input['n'] > 1}\n",
        },
        {
            "name": "route",
            "type": "branch",
            "when": {"all": [{"left": "{{score.big}}", "op": "is_true"}]},
            "then": [],
            "else": [],
        },
        {"name": "reply", "type": "respond", "input": {"status": 200, "body": "{{score}}"}},
    ],
}


@pytest.mark.parametrize("locked", [True, False], ids=["contained", "unsandboxed"])
async def test_a_code_step_is_held_only_in_a_sandbox_that_contains_it(
    db: Database,
    redis: aioredis.Redis,
    postgres_url: str,
    redis_url: str,
    *,
    locked: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """transform → code → branch → respond with the real sandbox. Contained (locked down,
    safe isolation: no network, no writes outside the sandbox) the code step has no effect
    outside its output, so its record waits for the final state — and so does RUNNING, the
    code step being done before it was due (LAZY_RUNNING_S): one statement after the insert,
    the attempt counted. Unsandboxed (``AP_EXECUTION_MODE=UNSANDBOXED``: the step could reach
    the network) RUNNING goes with the transform's record before the code step starts, and the
    step stays one with effects: its own record is written before the branch runs."""
    monkeypatch.setattr(worker_module, "LAZY_RUNNING_S", 30.0)
    sandbox = Sandbox(SandboxConfig(locked=locked, launcher="auto" if locked else "direct"))
    await sandbox.start()
    w = _worker(db, redis, (postgres_url, redis_url), sandbox)
    try:
        if locked and not sandbox.contained:
            pytest.skip(f"this host cannot contain code steps: {sandbox.report}")
        assert sandbox.contained is locked
        rid = await _submit(db, w, FOUR)
        await asyncio.wait_for(w.consumer.drain(), 60)
    finally:
        await _close(w)
        await sandbox.close()
    run = await run_store.get_run(db, rid)
    assert run["status"] == "SUCCEEDED", run["error"]
    assert run["output"]["body"] == {"big": True} and run["attempt"] == 1
    assert isinstance(w.writer, _CountingWriter)
    if locked:
        assert w.writer.writes == [("SUCCEEDED", ["parse", "score", "route", "reply"])]
        assert "RUNNING" not in w.writer.statuses
    else:
        assert w.writer.writes == [("RUNNING", ["parse"]), ("SUCCEEDED", ["route", "reply"])]
    steps = await run_store.get_steps(db, rid)
    assert [(s.name, s.output) for s in steps][:2] == [
        ("parse", {"n": 5}),
        ("score", {"big": True}),
    ]


async def test_a_contained_code_step_of_a_run_canceled_while_queued_leaves_nothing(
    db: Database, contained: RunWorker
) -> None:
    """Canceled before its first delivery: its quick code step may run (RUNNING is not due
    before LAZY_RUNNING_S), but the guarded final write is refused — the run stays CANCELED
    with no step stored and its attempt not counted."""
    rid = await _submit(db, contained, FOUR)
    assert await contained.writer.transition(Transition(rid, RunStatus.CANCELED))
    await asyncio.wait_for(contained.consumer.drain(), 60)
    run = await run_store.get_run(db, rid)
    assert run["status"] == "CANCELED" and run["attempt"] == 0
    assert await run_store.get_steps(db, rid) == []


RANDOM_REPLY = {
    "name": "rnd",
    "trigger": {"type": "webhook"},
    "steps": [
        {
            "name": "score",
            "type": "code",
            "input": {},
            "code": "import os\ndef run(input):\n    return {'token': os.urandom(8).hex()}\n",
        },
        {"name": "reply", "type": "respond", "input": {"status": 200, "body": "{{score}}"}},
    ],
}


async def _contained_reply(
    db: Database,
    redis: aioredis.Redis,
    urls: tuple[str, str],
    doc: dict[str, Any],
    *,
    crash_first_final: bool = False,
) -> tuple[dict[str, Any] | None, dict[str, Any], _CountingWriter]:
    """Run ``doc`` for a waiting sync caller with the real contained sandbox; the caller's
    first message, the stored run and the writer (what it wrote). ``crash_first_final``: the
    first final write raises (a worker dying before its last statement): a redelivery."""
    sandbox = Sandbox(SandboxConfig())
    await sandbox.start()
    w = _worker(db, redis, urls, sandbox)
    hub = ReplyHub(redis, "held")
    await hub.start()
    assert isinstance(w.writer, _CountingWriter)
    writer = w.writer
    fails = [crash_first_final]
    real_finish = writer.finish

    async def finish(done: Finish) -> bool:
        if fails.pop() if fails else False:
            if done.change.status is RunStatus.SUCCEEDED:
                raise RuntimeError("the worker died before its final write")
            fails.append(True)
        return await real_finish(done)

    writer.finish = finish  # type: ignore[method-assign]

    async def nothing_stored() -> dict[str, Any] | None:
        return None  # the answer must come from the worker

    try:
        if not sandbox.contained:
            pytest.skip(f"this host cannot contain code steps: {sandbox.report}")
        rid = await _submit(db, w, doc, reply=hub.channel)
        waiter = hub.register(str(rid))
        drained = asyncio.create_task(w.consumer.drain(wait_delayed_s=10))
        message = await hub.wait(waiter, 30, nothing_stored)
        await asyncio.wait_for(drained, 60)
    finally:
        await hub.close()
        await _close(w)
        await sandbox.close()
    return message, await run_store.get_run(db, rid), writer


async def test_a_held_code_output_reaches_the_caller_only_once_committed(
    db: Database,
    redis: aioredis.Redis,
    postgres_url: str,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """code (random output) → respond, the first final write failing: the first attempt's
    answer was never sent, the redelivery's is — the caller hears exactly what is stored."""
    monkeypatch.setattr(worker_module, "LAZY_RUNNING_S", 30.0)
    message, run, writer = await _contained_reply(
        db, redis, (postgres_url, redis_url), RANDOM_REPLY, crash_first_final=True
    )
    assert message is not None and message["kind"] == "respond"
    # The first delivery wrote nothing (its RUNNING was to ride with the final write that
    # failed); the redelivery moved the run to RUNNING first, then committed.
    assert run["status"] == "SUCCEEDED" and run["attempt"] == 1
    assert message["body"] == run["output"]["body"]
    assert writer.statuses == ["RUNNING"]
    assert writer.writes == [("SUCCEEDED", ["score", "reply"])]


async def test_a_respond_mid_flow_answers_after_the_held_code_output_is_committed(
    db: Database,
    redis: aioredis.Redis,
    postgres_url: str,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """code → respond → transform: the held answer goes out with the durable write before the
    transform (not at the end) — RUNNING with the code and respond records, the code step
    having been done before RUNNING was due — and matches the stored code output."""
    monkeypatch.setattr(worker_module, "LAZY_RUNNING_S", 30.0)
    doc = {
        **RANDOM_REPLY,
        "steps": [
            *RANDOM_REPLY["steps"],
            {"name": "after", "type": "transform", "input": {"t": "{{score.token}}"}},
        ],
    }
    message, run, writer = await _contained_reply(db, redis, (postgres_url, redis_url), doc)
    assert message is not None and message["kind"] == "respond"
    # RUNNING and the held records (then the answer) before the transform.
    assert writer.writes == [("RUNNING", ["score", "reply"]), ("SUCCEEDED", ["after"])]
    steps = await run_store.get_steps(db, uuid.UUID(str(run["id"])))
    assert [s.name for s in steps] == ["score", "reply", "after"]
    assert message["body"] == {"token": run["output"]["t"]}


def _slow(seconds: float) -> dict[str, Any]:
    """transform → code sleeping ``seconds`` → respond."""
    return {
        "name": "slow",
        "trigger": {"type": "webhook"},
        "steps": [
            {"name": "parse", "type": "transform", "input": {"n": "{{trigger.body.n}}"}},
            {
                "name": "score",
                "type": "code",
                "input": {},
                "code": f"import time\ndef run(input):\n    time.sleep({seconds})\n    return 7\n",
            },
            {"name": "reply", "type": "respond", "input": {"status": 200, "body": "{{score}}"}},
        ],
    }


async def _status_soon(db: Database, rid: uuid.UUID, want: str, within_s: float) -> bool:
    deadline = asyncio.get_running_loop().time() + within_s
    while asyncio.get_running_loop().time() < deadline:
        if (await run_store.get_run(db, rid))["status"] == want:
            return True
        await asyncio.sleep(0.01)
    return False


@pytest.fixture
async def contained(
    db: Database, redis: aioredis.Redis, postgres_url: str, redis_url: str
) -> AsyncIterator[RunWorker]:
    """A worker with the real sandbox, skipped where it cannot contain code steps."""
    sandbox = Sandbox(SandboxConfig())
    await sandbox.start()
    w = _worker(db, redis, (postgres_url, redis_url), sandbox)
    try:
        if not sandbox.contained:
            pytest.skip(f"this host cannot contain code steps: {sandbox.report}")
        yield w
    finally:
        await _close(w)
        await sandbox.close()


async def test_a_slow_contained_code_step_shows_its_run_running_while_it_runs(
    db: Database, contained: RunWorker
) -> None:
    """RUNNING (with the records held so far) is written while a slow code step still runs —
    LAZY_RUNNING_S after its code started — not only with the final state."""
    rid = await _submit(db, contained, _slow(1.5))
    drained = asyncio.create_task(contained.consumer.drain())
    try:
        assert await _status_soon(db, rid, "RUNNING", 1.0)
        assert [s.name for s in await run_store.get_steps(db, rid)] == ["parse"]
        assert not drained.done()
    finally:
        await asyncio.wait_for(drained, 30)
    run = await run_store.get_run(db, rid)
    assert run["status"] == "SUCCEEDED" and run["attempt"] == 1
    assert isinstance(contained.writer, _CountingWriter)
    assert contained.writer.writes == [("RUNNING", ["parse"]), ("SUCCEEDED", ["score", "reply"])]


async def test_a_slow_contained_code_step_of_a_run_canceled_while_queued_is_killed(
    db: Database, contained: RunWorker
) -> None:
    """Canceled while queued, its code step started: the RUNNING write finds the run ended, so
    the code step is killed at once (not left to sleep 20 s) and nothing is stored; the run
    stays CANCELED with its attempt not counted."""
    rid = await _submit(db, contained, _slow(20))
    assert await contained.writer.transition(Transition(rid, RunStatus.CANCELED))
    t0 = asyncio.get_running_loop().time()
    await asyncio.wait_for(contained.consumer.drain(), 10)
    assert asyncio.get_running_loop().time() - t0 < 5
    run = await run_store.get_run(db, rid)
    assert run["status"] == "CANCELED" and run["attempt"] == 0
    assert await run_store.get_steps(db, rid) == []
    assert isinstance(contained.writer, _CountingWriter)
    assert contained.writer.writes[0] == ("RUNNING", ["parse"])


async def test_a_run_canceled_while_its_slow_code_step_runs_keeps_only_what_was_committed(
    db: Database, contained: RunWorker
) -> None:
    """Canceled once RUNNING shows: the step in flight ends, its record and the rest are not
    stored, CANCELED stays."""
    rid = await _submit(db, contained, _slow(1.0))
    drained = asyncio.create_task(contained.consumer.drain())
    try:
        assert await _status_soon(db, rid, "RUNNING", 1.0)
        assert await contained.writer.transition(Transition(rid, RunStatus.CANCELED))
    finally:
        await asyncio.wait_for(drained, 30)
    run = await run_store.get_run(db, rid)
    assert run["status"] == "CANCELED"
    assert [s.name for s in await run_store.get_steps(db, rid)] == ["parse"]


@pytest.mark.parametrize("lazy_s", [0.005, 30.0], ids=["running-written", "not-yet-due"])
async def test_a_flow_timeout_in_a_lazy_code_step_is_recorded(
    db: Database,
    redis: aioredis.Redis,
    postgres_url: str,
    redis_url: str,
    *,
    monkeypatch: pytest.MonkeyPatch,
    lazy_s: float,
) -> None:
    """The flow's time limit ends a slow first code step either way: with RUNNING written
    meanwhile, or (not yet due) RUNNING riding with the TIMEOUT state; the attempt counted
    once."""
    monkeypatch.setattr(worker_module, "LAZY_RUNNING_S", lazy_s)
    sandbox = Sandbox(SandboxConfig())
    await sandbox.start()
    w = RunWorker(
        make_settings(
            postgres_url, redis_url, AP_CONTAINER_TYPE="WORKER", AP_FLOW_TIMEOUT_SECONDS="1"
        ),
        writer=_CountingWriter(db),
        registry=FlowRegistry(db),
        box=SecretBox(ENCRYPTION_KEY),
        redis=redis,
        sandbox=sandbox,
        http=None,
    )
    try:
        if not sandbox.contained:
            pytest.skip(f"this host cannot contain code steps: {sandbox.report}")
        rid = await _submit(db, w, _slow(10))
        await asyncio.wait_for(w.consumer.drain(), 20)
    finally:
        await _close(w)
        await sandbox.close()
    run = await run_store.get_run(db, rid)
    assert run["status"] == "TIMEOUT" and run["attempt"] == 1
    assert [(s.name, s.status) for s in await run_store.get_steps(db, rid)] == [
        ("parse", "SUCCEEDED"),
        ("score", "TIMEOUT"),
    ]
    assert isinstance(w.writer, _CountingWriter)
    if lazy_s < 1:
        assert w.writer.writes == [("RUNNING", ["parse"]), ("TIMEOUT", ["score"])]
    else:
        assert w.writer.writes == [("TIMEOUT", ["parse", "score"])]


async def test_a_run_handed_back_before_its_running_was_due_stays_queued(
    db: Database, contained: RunWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker stopping (its drain time spent) while a first code step runs, RUNNING not yet
    due: the step is canceled, nothing is written — the run stays QUEUED for the worker that
    takes its entry over — and no RUNNING write follows later (the timer is disarmed)."""
    monkeypatch.setattr(worker_module, "LAZY_RUNNING_S", 0.5)
    rid = await _submit(db, contained, _slow(5))
    sandbox = contained.sandbox
    assert isinstance(sandbox, Sandbox)
    await contained.consumer.start()
    try:
        deadline = asyncio.get_running_loop().time() + 10
        while sandbox._busy == 0:
            assert asyncio.get_running_loop().time() < deadline, "the code step never started"
            await asyncio.sleep(0.01)
    finally:
        await contained.consumer.close(timeout_s=0.05)
    await asyncio.sleep(1.0)  # past LAZY_RUNNING_S
    run = await run_store.get_run(db, rid)
    assert run["status"] == "QUEUED" and run["attempt"] == 0
    assert await run_store.get_steps(db, rid) == []
    assert isinstance(contained.writer, _CountingWriter)
    assert contained.writer.writes == []
