"""The executor over every step type, with the real subprocess sandbox and an in-memory sink."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from conveyor.engine.context import RunOutcome, Services, StepRecord
from conveyor.engine.executor import Executor
from conveyor.engine.flow import parse_flow
from conveyor.status import TERMINAL, RunStatus, StepStatus
from tests.engine.local_sandbox import LocalSandbox
from tests.engine.support import MemorySink, flow_doc, make_ctx

RECORD_KEYS = {
    "name",
    "type",
    "status",
    "input",
    "output",
    "error",
    "logs",
    "started_at",
    "duration_ms",
    "attempt",
    "parent",
    "iteration",
}


def tr(name: str, **input: Any) -> dict[str, Any]:
    return {"name": name, "type": "transform", "input": input}


def code(name: str, src: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": "code", "code": src, **extra}


async def run(
    sink: MemorySink,
    *steps: dict[str, Any],
    body: Any = None,
    sandbox: LocalSandbox | None = None,
    responses: list[tuple[int, Any, Any]] | None = None,
    **kw: Any,
) -> RunOutcome:
    ctx_kw = {k: kw.pop(k) for k in ("secrets", "checkpoints") if k in kw}
    services = Services(sink=sink, sandbox=sandbox, **kw)
    flow = parse_flow(flow_doc(*steps))

    async def on_respond(status: int, headers: Any, body: Any) -> None:
        sink.events.append("respond")
        if responses is not None:
            responses.append((status, headers, body))

    return await Executor(services).run(flow, make_ctx(body, **ctx_kw), on_respond=on_respond)


async def test_transform_then_respond(sink: MemorySink) -> None:
    """transform renders its input; respond answers at once; output is the last step's."""
    responses: list[tuple[int, Any, Any]] = []
    out = await run(
        sink,
        tr("parse", total="{{trigger.body.amount}}", note="n={{trigger.body.amount}}"),
        {
            "name": "reply",
            "type": "respond",
            "input": {"status": 201, "headers": {"x-a": 1}, "body": {"t": "{{parse.total}}"}},
        },
        body={"amount": 7},
        responses=responses,
    )
    assert out.status is RunStatus.SUCCEEDED and out.status in TERMINAL
    assert responses == [(201, {"x-a": "1"}, {"t": 7})]
    assert out.output == {"status": 201, "headers": {"x-a": "1"}, "body": {"t": 7}}
    assert sink.one("parse")["output"] == {"total": 7, "note": "n=7"}
    for rec in sink.records:
        assert set(rec) == RECORD_KEYS
        assert rec["parent"] is None and rec["iteration"] is None and rec["attempt"] == 1


async def test_respond_goes_out_before_later_steps_finish(sink: MemorySink) -> None:
    """The respond callback fires when the step runs; the steps after it still run."""
    out = await run(
        sink,
        {"name": "reply", "type": "respond", "input": {"body": "early"}},
        {"name": "wait", "type": "delay", "input": {"seconds": 0.05}},
        tr("after", x=1),
    )
    assert out.status is RunStatus.SUCCEEDED
    assert sink.events == ["respond", "step:reply", "step:wait", "step:after"]
    assert "resumed_at" in sink.one("wait")["output"]


async def test_code_step_output_and_logs(sink: MemorySink, sandbox: LocalSandbox) -> None:
    """A code step's output is exactly run()'s return value; prints go to its logs."""
    src = "def run(input):\n    print('seen', input['n'])\n    return [input['n'] * 2, None]"
    asrc = (
        "import asyncio\nasync def run(input):\n    await asyncio.sleep(0)\n    return 'async ok'"
    )
    out = await run(
        sink,
        code("c", src, input={"n": "{{trigger.body.n}}"}),
        code("a", asrc),
        body={"n": 21},
        sandbox=sandbox,
    )
    assert out.status is RunStatus.SUCCEEDED
    rec = sink.one("c")
    assert rec["output"] == [42, None]
    assert rec["logs"] == "seen 21\n"
    assert rec["input"] == {"n": 21}
    assert out.output == "async ok"


async def test_code_step_exception_fails_run(sink: MemorySink, sandbox: LocalSandbox) -> None:
    """A raising code step fails the run with the exception type and message, no traceback."""
    src = "def run(input):\n    raise ValueError('bad total')\n"
    out = await run(sink, code("c", src), tr("never", x=1), sandbox=sandbox)
    assert out.status is RunStatus.FAILED
    assert out.error is not None and out.error["step"] == "c"
    assert out.error["message"].startswith("ValueError: bad total")
    assert "Traceback" not in out.error["message"]
    assert sink.one("c")["status"] == StepStatus.FAILED
    assert sink.by_name("never") == []


async def test_code_step_timeout(sink: MemorySink, sandbox: LocalSandbox) -> None:
    """timeout_s on a code step ends it as TIMEOUT and the run as TIMEOUT."""
    src = "import time\ndef run(input):\n    time.sleep(30)\n"
    out = await run(sink, code("slow", src, timeout_s=0.5), sandbox=sandbox)
    assert out.status is RunStatus.TIMEOUT
    assert sink.one("slow")["status"] == StepStatus.TIMEOUT


async def test_code_step_memory_limit(sink: MemorySink) -> None:
    """Exceeding the sandbox memory limit ends the run MEMORY_LIMIT_EXCEEDED."""
    src = "def run(input):\n    x = bytearray(1024 * 1024 * 1024)\n    return len(x)\n"
    out = await run(sink, code("big", src), sandbox=LocalSandbox(memory_kb=256 * 1024))
    assert out.status is RunStatus.MEMORY_LIMIT_EXCEEDED
    assert sink.one("big")["status"] == StepStatus.MEMORY_LIMIT_EXCEEDED


async def test_broken_sandbox_is_an_internal_error(sink: MemorySink) -> None:
    """A sandbox that cannot start ends the run INTERNAL_ERROR, not FAILED."""
    broken = LocalSandbox(python="/nonexistent/python3")
    out = await run(sink, code("c", "def run(i):\n    return 1"), sandbox=broken)
    assert out.status is RunStatus.INTERNAL_ERROR
    assert out.error is not None and out.error["step"] == "c"
    assert "cannot start sandbox" in out.error["message"]


async def test_code_step_without_sandbox_fails(sink: MemorySink) -> None:
    """With no sandbox configured a code step fails clearly instead of running in-process."""
    out = await run(sink, code("c", "def run(i):\n    return 1"))
    assert out.status is RunStatus.FAILED
    assert out.error is not None and "no sandbox" in out.error["message"]


async def test_retry_until_success(sink: MemorySink, sandbox: LocalSandbox, tmp_path: Path) -> None:
    """retry.attempts re-runs a failing step; the record carries the attempt that succeeded."""
    counter = tmp_path / "count"
    counter.write_text("0")
    src = (
        "def run(input):\n"
        "    p = input['path']\n"
        "    n = int(open(p).read()) + 1\n"
        "    open(p, 'w').write(str(n))\n"
        "    if n < 3:\n"
        "        raise RuntimeError(f'try {n}')\n"
        "    return n\n"
    )
    step = code(
        "flaky", src, input={"path": str(counter)}, retry={"attempts": 3, "backoff_s": 0.01}
    )
    out = await run(sink, step, sandbox=sandbox)
    assert out.status is RunStatus.SUCCEEDED and out.output == 3
    assert sink.one("flaky")["attempt"] == 3


async def test_retry_exhausted(sink: MemorySink, sandbox: LocalSandbox) -> None:
    """After the last attempt the step fails with the last error."""
    step = code("bad", "def run(i):\n    raise KeyError('k')", retry={"attempts": 2})
    out = await run(sink, step, sandbox=sandbox)
    assert out.status is RunStatus.FAILED
    rec = sink.one("bad")
    assert rec["attempt"] == 2 and rec["error"] is not None and "KeyError" in rec["error"]


async def test_continue_on_failure(sink: MemorySink) -> None:
    """A failing step with continue_on_failure is recorded FAILED and the run goes on."""
    out = await run(
        sink,
        tr("bad", x="{{trigger.body.missing}}") | {"continue_on_failure": True},
        tr("after", ok=True),
        body={},
    )
    assert out.status is RunStatus.SUCCEEDED
    assert sink.one("bad")["status"] == StepStatus.FAILED
    assert out.output == {"ok": True}


async def test_missing_key_fails_with_path(sink: MemorySink) -> None:
    """A template to a missing key fails the step with a message naming the path."""
    out = await run(
        sink,
        tr("parse", t="{{trigger.body.amount}}"),
        tr("use", x="{{parse.totl}}"),
        body={"amount": 1},
    )
    assert out.status is RunStatus.FAILED
    assert out.error == {
        "step": "use",
        "message": 'template {{parse.totl}}: key "totl" not found in step "parse"',
    }


def _branch(**extra: Any) -> dict[str, Any]:
    return {
        "name": "route",
        "type": "branch",
        "when": {"all": [{"left": "{{trigger.body.n}}", "op": "gt", "right": 10}]},
        "then": [tr("big", v="{{trigger.body.n}}")],
        "else": [tr("small", v="{{route.branch}}")],
        **extra,
    }


async def test_branch_then_and_else(sink: MemorySink) -> None:
    """The branch records its arm; only that arm's steps run, with parent = branch name."""
    out = await run(sink, _branch(), body={"n": 50})
    assert out.status is RunStatus.SUCCEEDED
    assert sink.one("route")["output"] == {"branch": "then"}
    big = sink.one("big")
    assert (big["parent"], big["iteration"]) == ("route", 0)
    assert sink.by_name("small") == []
    sink2 = MemorySink()
    await run(sink2, _branch(), body={"n": "3"})
    assert sink2.one("route")["output"] == {"branch": "else"}
    assert sink2.one("small")["output"] == {"v": "else"}


async def test_reference_to_untaken_arm_fails(sink: MemorySink) -> None:
    """Referencing a step of the untaken arm fails the step with its path."""
    out = await run(sink, _branch(), tr("after", v="{{big.v}}"), body={"n": 1})
    assert out.status is RunStatus.FAILED
    assert out.error is not None and out.error["step"] == "after"
    assert out.error["message"] == 'template {{big.v}}: step "big" did not run or has no output'


async def test_branch_condition_error_fails(sink: MemorySink) -> None:
    """A condition that cannot be evaluated (gt on text) fails the branch step."""
    out = await run(sink, _branch(), body={"n": "lots"})
    assert out.status is RunStatus.FAILED
    assert out.error is not None and "gt compares numbers" in out.error["message"]


async def test_loop_outputs_and_records(sink: MemorySink) -> None:
    """A loop outputs one {inner: output} per item; inner records carry parent and iteration."""
    loop = {
        "name": "each",
        "type": "loop",
        "items": "{{trigger.body.items}}",
        "steps": [
            tr("double", v="{{loop.item.n}}", i="{{loop.index}}"),
            {
                "name": "check",
                "type": "branch",
                "when": {"any": [{"left": "{{loop.index}}", "op": "eq", "right": 0}]},
                "then": [tr("first", f="{{double.v}}")],
            },
        ],
    }
    out = await run(
        sink, loop, tr("after", first="{{each[0].first.f}}"), body={"items": [{"n": 1}, {"n": 2}]}
    )
    assert out.status is RunStatus.SUCCEEDED
    assert sink.one("each")["output"] == [
        {"double": {"v": 1, "i": 0}, "check": {"branch": "then"}, "first": {"f": 1}},
        {"double": {"v": 2, "i": 1}, "check": {"branch": "else"}},
    ]
    assert [(r["parent"], r["iteration"]) for r in sink.by_name("double")] == [
        ("each", 0),
        ("each", 1),
    ]
    assert (sink.one("first")["parent"], sink.one("first")["iteration"]) == ("check", 0)
    assert out.output == {"first": 1}


async def test_loop_items_must_be_a_list(sink: MemorySink) -> None:
    """Loop items that are not a list fail the loop step."""
    loop = {"name": "each", "type": "loop", "items": "{{trigger.body}}", "steps": [tr("x", a=1)]}
    out = await run(sink, loop, body={"not": "a list"})
    assert out.status is RunStatus.FAILED
    assert out.error is not None and "must be a list, got dict" in out.error["message"]


async def test_loop_inner_failure(sink: MemorySink) -> None:
    """An inner failure fails the loop (recorded) and the run, naming the inner step."""
    loop = {
        "name": "each",
        "type": "loop",
        "items": [1, 2],
        "steps": [tr("x", a="{{loop.item.k}}")],
    }
    out = await run(sink, loop)
    assert out.status is RunStatus.FAILED
    assert out.error is not None and out.error["step"] == "x"
    assert sink.one("each")["error"] == (
        'iteration 0: step "x": template {{loop.item.k}}: loop.item is a number, cannot look up "k"'
    )
    assert sink.one("each")["status"] == StepStatus.FAILED


async def test_long_delay_pauses_and_resumes(sink: MemorySink) -> None:
    """A delay ≥ 5 s pauses with resume_at; resuming with the checkpoints goes on after it."""
    steps = (
        tr("first", n="{{trigger.body.n}}"),
        {"name": "wait", "type": "delay", "input": {"seconds": 60}},
        tr("after", n="{{first.n}}", w="{{wait.resumed_at}}"),
    )
    before = datetime.now(UTC)
    out = await run(sink, *steps, body={"n": 5})
    assert out.status is RunStatus.PAUSED
    assert out.resume_at is not None
    assert before + timedelta(seconds=59) < out.resume_at < before + timedelta(seconds=61)
    paused = sink.one("wait")
    assert paused["status"] == StepStatus.PAUSED
    assert sink.by_name("after") == []

    # Woken too early: still paused, nothing new recorded.
    sink2 = MemorySink()
    again = await run(sink2, *steps, body={"n": 5}, checkpoints=list(sink.records))
    assert again.status is RunStatus.PAUSED and again.resume_at == out.resume_at
    assert sink2.records == []

    # Woken after resume_at: the delay completes and later steps run; earlier are not re-run.
    due: StepRecord = {**paused, "output": {"resume_at": before.isoformat()}}
    sink3 = MemorySink()
    done = await run(sink3, *steps, body={"n": 5}, checkpoints=[sink.one("first"), due])
    assert done.status is RunStatus.SUCCEEDED
    assert [r["name"] for r in sink3.records] == ["wait", "after"]
    assert sink3.one("wait")["status"] == StepStatus.SUCCEEDED
    assert done.output["n"] == 5


def _past_due(rec: StepRecord) -> StepRecord:
    past = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    return {**rec, "output": {"resume_at": past}}


async def test_pause_inside_a_loop_resumes_per_iteration(sink: MemorySink) -> None:
    """A long delay inside a loop pauses once per iteration and resumes where it stopped."""
    loop = {
        "name": "each",
        "type": "loop",
        "items": [1, 2],
        "steps": [
            tr("a", v="{{loop.item}}"),
            {"name": "w", "type": "delay", "input": {"seconds": 30}},
        ],
    }
    first = await run(sink, loop)
    assert first.status is RunStatus.PAUSED
    stored = [r if r["status"] != "PAUSED" else _past_due(r) for r in sink.records]
    sink2 = MemorySink()
    second = await run(sink2, loop, checkpoints=stored)
    assert second.status is RunStatus.PAUSED
    assert [(r["name"], r["iteration"], r["status"]) for r in sink2.records] == [
        ("w", 0, "SUCCEEDED"),
        ("a", 1, "SUCCEEDED"),
        ("w", 1, "PAUSED"),
    ]
    stored += [r if r["status"] != "PAUSED" else _past_due(r) for r in sink2.records]
    sink3 = MemorySink()
    third = await run(sink3, loop, checkpoints=stored)
    assert third.status is RunStatus.SUCCEEDED
    assert [r["name"] for r in sink3.records] == ["w", "each"]
    assert [it["a"] for it in third.output] == [{"v": 1}, {"v": 2}]


async def test_long_delay_in_nested_loop_fails(sink: MemorySink) -> None:
    """A pausing delay two loops deep is refused at run time (it could not be resumed)."""
    inner = {
        "name": "inner",
        "type": "loop",
        "items": [1],
        "steps": [{"name": "w", "type": "delay", "input": {"seconds": 30}}],
    }
    out = await run(sink, {"name": "outer", "type": "loop", "items": [1], "steps": [inner]})
    assert out.status is RunStatus.FAILED
    assert out.error is not None and "nested loop" in out.error["message"]


async def test_restored_respond_is_sent_again(sink: MemorySink) -> None:
    """On redelivery a checkpointed respond is handed to the (maybe still waiting) caller."""
    steps = (
        {"name": "reply", "type": "respond", "input": {"status": 202, "body": "x"}},
        tr("b", v=1),
    )
    first = MemorySink()
    await run(first, *steps)
    responses: list[tuple[int, Any, Any]] = []
    out = await run(sink, *steps, checkpoints=[first.one("reply")], responses=responses)
    assert out.status is RunStatus.SUCCEEDED
    assert responses == [(202, {}, "x")]
    assert [r["name"] for r in sink.records] == ["b"]


async def test_context_timeout_overrides_flow_timeout(sink: MemorySink) -> None:
    """RunContext.timeout_s (the budget left) takes precedence over Services.flow_timeout_s."""
    flow = parse_flow(flow_doc({"name": "slow", "type": "delay", "input": {"seconds": 2}}))
    ctx = dataclasses.replace(make_ctx(), timeout_s=0.1)
    out = await Executor(Services(sink=sink, flow_timeout_s=600)).run(flow, ctx)
    assert out.status is RunStatus.TIMEOUT


async def test_redelivery_skips_completed_steps(sink: MemorySink, sandbox: LocalSandbox) -> None:
    """Checkpointed steps are not run again; their stored outputs feed later steps."""
    steps = (
        code("expensive", "def run(i):\n    raise SystemError('must not run again')"),
        tr("after", v="{{expensive.value}}"),
    )
    stored: StepRecord = {
        "name": "expensive",
        "type": "code",
        "status": "SUCCEEDED",
        "input": {},
        "output": {"value": 99},
        "error": None,
        "logs": "",
        "started_at": datetime.now(UTC),
        "duration_ms": 1,
        "attempt": 1,
        "parent": None,
        "iteration": None,
    }
    out = await run(sink, *steps, sandbox=sandbox, checkpoints=[stored])
    assert out.status is RunStatus.SUCCEEDED and out.output == {"v": 99}
    assert [r["name"] for r in sink.records] == ["after"]


async def test_redelivery_inside_a_loop(sink: MemorySink) -> None:
    """Loop iterations already checkpointed are restored by (name, iteration)."""
    loop = {"name": "each", "type": "loop", "items": [1, 2], "steps": [tr("x", v="{{loop.item}}")]}
    first = MemorySink()
    await run(first, loop)
    kept = [r for r in first.records if r["name"] == "x" and r["iteration"] == 0]
    kept[0] = {**kept[0], "output": {"v": "restored"}}  # records are frozen: a changed copy
    out = await run(sink, loop, checkpoints=kept)
    assert out.status is RunStatus.SUCCEEDED
    assert [r["iteration"] for r in sink.by_name("x")] == [1]
    assert sink.one("each")["output"] == [{"x": {"v": "restored"}}, {"x": {"v": 2}}]


async def test_replayed_failure_stays_failed(sink: MemorySink) -> None:
    """A checkpoint that recorded a failure fails the redelivered run the same way."""
    failed: StepRecord = {
        "name": "a",
        "type": "transform",
        "status": "FAILED",
        "input": None,
        "output": None,
        "error": "boom",
        "logs": "",
        "started_at": datetime.now(UTC),
        "duration_ms": 0,
        "attempt": 1,
        "parent": None,
        "iteration": None,
    }
    out = await run(sink, tr("a", x=1), tr("b", y=1), checkpoints=[failed])
    assert out.status is RunStatus.FAILED and out.error == {"step": "a", "message": "boom"}
    assert sink.records == []


async def test_flow_timeout(sink: MemorySink) -> None:
    """A run over the flow time limit ends TIMEOUT; the in-flight step is recorded TIMEOUT."""
    out = await run(
        sink,
        tr("a", x=1),
        {"name": "slow", "type": "delay", "input": {"seconds": 3}},
        flow_timeout_s=0.2,
    )
    assert out.status is RunStatus.TIMEOUT
    assert out.error is not None and out.error["step"] == "slow"
    assert sink.one("slow")["status"] == StepStatus.TIMEOUT


async def test_log_size_cap(sink: MemorySink, sandbox: LocalSandbox) -> None:
    """Step logs of a run are capped at max_log_bytes in total, with a truncation note."""
    src = "def run(i):\n    print('x' * 1000)\n    return 1"
    out = await run(sink, code("a", src), code("b", src), sandbox=sandbox, max_log_bytes=300)
    assert out.status is RunStatus.SUCCEEDED
    a, b = sink.one("a")["logs"], sink.one("b")["logs"]
    assert a.startswith("x" * 300) and "logs truncated" in a
    assert b.startswith("\n[logs truncated")


async def test_secrets_are_redacted_in_records(sink: MemorySink, sandbox: LocalSandbox) -> None:
    """Secret values never reach step records or the outcome, but steps see the real value."""
    responses: list[tuple[int, Any, Any]] = []
    out = await run(
        sink,
        tr("auth", h="Bearer {{secrets.TOKEN}}"),
        code("echo", "def run(i):\n    print(i['h'])\n    return i", input={"h": "{{auth.h}}"}),
        {"name": "reply", "type": "respond", "input": {"body": "{{echo.h}}"}},
        sandbox=sandbox,
        secrets={"TOKEN": "tok-123456", "OTHER": "unused"},
        responses=responses,
    )
    assert out.status is RunStatus.SUCCEEDED
    assert responses[0][2] == "Bearer tok-123456"
    for rec in sink.records:
        assert "tok-123456" not in repr(rec)
    assert sink.one("echo")["logs"] == "Bearer ***\n"
    assert out.output == {"status": 200, "headers": {}, "body": "Bearer ***"}


async def test_failing_sink_is_an_internal_error() -> None:
    """If checkpoints cannot be written the run ends INTERNAL_ERROR (the worker retries it)."""

    class BrokenSink:
        async def step_finished(self, run_id: str, record: StepRecord) -> None:
            raise ConnectionError("postgres went away")

    flow = parse_flow(flow_doc(tr("a", x=1)))
    out = await Executor(Services(sink=BrokenSink())).run(flow, make_ctx())
    assert out.status is RunStatus.INTERNAL_ERROR
    assert out.error is not None and "postgres went away" in out.error["message"]


async def test_concurrent_runs_share_one_executor(sink: MemorySink) -> None:
    """One executor serves many runs at once without mixing their data."""
    flow = parse_flow(
        flow_doc(
            tr("a", n="{{trigger.body}}"),
            {"name": "d", "type": "delay", "input": {"seconds": 0.01}},
            tr("b", n="{{a.n}}"),
        )
    )
    ex = Executor(Services(sink=sink))
    outs = await asyncio.gather(*(ex.run(flow, make_ctx(i, run_id=f"r{i}")) for i in range(50)))
    assert [o.output for o in outs] == [{"n": i} for i in range(50)]
