"""`conveyor up`'s stderr: every line a JSON record (the sandbox's included); pretty for humans.

The process runs briefly against the test servers, takes a webhook whose code step logs through
the sandbox, and is stopped with SIGTERM; then every line it wrote to stderr is checked.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import warnings
from typing import Any

import aiohttp
import orjson
import pytest
import structlog

from conveyor import logging as conveyor_logging
from conveyor.settings import Settings
from tests.processes import conveyor_env, free_port, wait_ready

FLOW = {
    "name": "logs",
    "trigger": {"type": "webhook"},
    "steps": [
        {
            "name": "c",
            "type": "code",
            "code": "def run(input):\n    print('hello from a step')\n    return {'ok': True}\n",
        }
    ],
}


async def run_briefly(env: dict[str, str], port: int) -> tuple[int, list[str]]:
    """Start `conveyor up`, run one flow through its sync webhook, SIGTERM; stderr lines."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "conveyor", "up", env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        try:
            await wait_ready(base, proc)
        except AssertionError:
            if proc.returncode is not None:
                assert proc.stderr is not None
                pytest.fail(f"conveyor up exited early: {(await proc.stderr.read())!r}")
            raise
        async with aiohttp.ClientSession() as http:
            async with http.post(base + "/api/v1/flows", json=FLOW) as r:
                assert r.status == 201, await r.text()
                flow_id = (await r.json())["id"]
            async with http.post(f"{base}/api/v1/webhooks/{flow_id}/sync", json={}) as r:
                assert r.status == 200, await r.text()
            async with http.get(base + "/api/v1/flows/not-an-id") as r:
                assert r.status == 404
    finally:
        if proc.returncode is None:
            proc.terminate()
        assert proc.stderr is not None
        err = await asyncio.wait_for(proc.stderr.read(), 30)
        code = await asyncio.wait_for(proc.wait(), 30)
    return code, err.decode().splitlines()


async def test_every_stderr_line_is_json(
    db: Any, redis: Any, postgres_url: str, redis_url: str
) -> None:
    """At info level, every stderr line of a brief `conveyor up` is a JSON record with
    level, event, role and pid; the sandbox's start-up line is among them."""
    port = free_port()
    env = conveyor_env(postgres_url, redis_url, AP_PORT=str(port), AP_LOG_LEVEL="info")
    code, lines = await run_briefly(env, port)
    assert code == 0, lines
    records = []
    for line in lines:
        try:
            records.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            pytest.fail(f"not a JSON line: {line!r}\nall lines: {lines}")
    for rec in records:
        assert {"level", "event", "role", "pid", "timestamp"} <= rec.keys(), rec
    events = [rec["event"] for rec in records]
    assert "conveyor started" in events and "shutting down" in events
    sandbox = [r for r in records if "sandbox" in r["event"] or r.get("logger") == "sandbox"]
    assert sandbox, events


def test_stdlib_warnings_and_uncaught_are_structured(capsys: pytest.CaptureFixture[str]) -> None:
    """Library loggers, warnings and uncaught exceptions render as JSON with the process's
    role, and AP_LOG_PRETTY renders the same records without colour codes off a terminal."""
    old_hook = sys.excepthook
    root = logging.getLogger()
    old_handlers, old_level = list(root.handlers), root.level
    try:
        conveyor_logging.configure(Settings.from_env({"AP_LOG_LEVEL": "info"}), role="TEST")
        logging.getLogger("conveyor.sandbox").info("sandbox started: %s (%s)", "PARTIAL", "x")
        logging.getLogger("aiohttp.server").warning("library says %d", 7)
        warnings.warn("old thing", DeprecationWarning, stacklevel=1)
        try:
            raise ValueError("boom")
        except ValueError:
            sys.excepthook(*sys.exc_info())
        lines = capsys.readouterr().err.splitlines()
        records = [orjson.loads(line) for line in lines]
        assert records[0]["event"] == "sandbox started: PARTIAL (x)"
        assert records[0]["logger"] == "conveyor.sandbox" and records[0]["role"] == "TEST"
        assert records[1]["event"] == "library says 7" and records[1]["level"] == "warning"
        assert "old thing" in records[2]["event"]
        assert records[3]["event"] == "uncaught exception" and "boom" in records[3]["exception"]
        assert len(records) == 4

        settings = Settings.from_env({"AP_LOG_LEVEL": "info", "AP_LOG_PRETTY": "true"})
        conveyor_logging.configure(settings, role="TEST")
        structlog.get_logger("x").warning("pretty line", n=1)
        logging.getLogger("conveyor.sandbox").warning("from stdlib")
        pretty = capsys.readouterr().err.splitlines()
        assert len(pretty) == 2 and "\x1b[" not in "".join(pretty)
        assert "pretty line" in pretty[0] and "n=1" in pretty[0] and "warning" in pretty[0]
        assert "from stdlib" in pretty[1] and not pretty[1].startswith("{")
    finally:
        sys.excepthook = old_hook
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in old_handlers:
            root.addHandler(handler)
        root.setLevel(old_level)
        logging.captureWarnings(False)
        structlog.reset_defaults()
