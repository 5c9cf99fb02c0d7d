"""The CLI's flow and run commands against a real `conveyor up`: names, --json, exit codes."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from conveyor.cli import build_parser
from tests.polling import eventually
from tests.processes import free_port
from tests.test_cli_examples import Server, server

__all__ = ["server"]

ECHO = """name: echo
trigger: {type: webhook}
steps:
  - name: t
    type: transform
    input: {x: "{{trigger.body.x}}"}
"""

BROKEN = """name: broken
trigger: {type: webhook}
steps:
  - name: boom
    type: code
    code: |
      def run(input):
          raise ValueError("refused by upstream")
"""

NIGHTLY = """name: nightly
trigger: {type: schedule, cron: "0 2 * * *", timezone: Europe/Paris}
steps:
  - {name: t, type: transform, input: {at: "{{trigger.body.scheduled_at}}"}}
"""

SLOW = """name: slow
trigger: {type: webhook}
steps:
  - name: wait
    type: delay
    input: {seconds: 600}
"""


async def apply(server: Server, tmp_path: Path, name: str, doc: str) -> None:
    path = tmp_path / f"{name}.yaml"
    path.write_text(doc)
    code, _out, err = await server.cli("flows", "apply", str(path))
    assert code == 0, err


async def cli_json(server: Server, *args: str) -> Any:
    code, out, err = await server.cli(*args, "--json")
    assert code == 0, err
    return orjson.loads(out)


async def wait_for_status(server: Server, run_id: str, status: str) -> None:
    async def reached() -> bool:
        return bool((await cli_json(server, "runs", "show", run_id))["status"] == status)

    await eventually(reached, timeout_s=10, interval_s=0.05, what=f"run {run_id} {status}")


async def test_run_by_name_sync_and_list_with_names(server: Server, tmp_path: Path) -> None:
    """`flows run NAME --sync` prints the output, exit 0; `runs list` names flows and filters."""
    await apply(server, tmp_path, "echo", ECHO)
    await apply(server, tmp_path, "broken", BROKEN)
    code, out, err = await server.cli("flows", "run", "echo", "--data", '{"x": 41}', "--sync")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].endswith(" SUCCEEDED") and orjson.loads(lines[-1]) == {"x": 41}
    ok_id = lines[0].split()[1]
    code, out, err = await server.cli("flows", "run", "broken")
    assert code == 0 and out.endswith(" QUEUED (flow 'broken')\n"), err
    bad_id = out.split()[1]
    code, out, err = await server.cli("runs", "follow", bad_id, "--interval", "0.1")
    assert code == 1, (out, err)
    assert "step boom  FAILED" in out and f"run {bad_id} FAILED" in out
    assert "refused by upstream" in out
    runs = await cli_json(server, "runs", "list")
    assert {(r["id"], r["flow_name"]) for r in runs} == {(ok_id, "echo"), (bad_id, "broken")}
    echo_runs = await cli_json(server, "runs", "list", "--flow", "echo")
    assert [r["id"] for r in echo_runs] == [ok_id]
    failed = await cli_json(server, "runs", "list", "--status", "FAILED")
    assert [r["id"] for r in failed] == [bad_id]
    code, out, _ = await server.cli("runs", "list")
    table = {line.split()[0]: line.split()[1] for line in out.splitlines()[1:]}
    assert table == {ok_id: "echo", bad_id: "broken"}
    flows = await cli_json(server, "flows", "list")
    assert sorted(f["name"] for f in flows) == ["broken", "echo"]
    code, out, err = await server.cli("flows", "run", "broken", "--sync", "--json")
    assert code == 1, err
    assert orjson.loads(out.splitlines()[-1])["status"] == "FAILED"
    code, out, err = await server.cli("runs", "retry", bad_id, "--follow", "--interval", "0.1")
    assert code == 1 and f"run {bad_id} FAILED" in out, (out, err)
    assert (await cli_json(server, "runs", "show", bad_id))["attempt"] == 2


async def test_enable_disable_cancel_delete(server: Server, tmp_path: Path) -> None:
    """Flows are enabled, disabled and deleted by name; a paused run is cancelled."""
    await apply(server, tmp_path, "slow", SLOW)
    code, out, err = await server.cli("flows", "disable", "slow")
    assert code == 0 and out == "flow 'slow' disabled\n", err
    assert [f["enabled"] for f in await cli_json(server, "flows", "list")] == [False]
    code, out, err = await server.cli("flows", "enable", "slow")
    assert code == 0 and out == "flow 'slow' enabled\n", err
    assert [f["enabled"] for f in await cli_json(server, "flows", "list")] == [True]
    started = await cli_json(server, "flows", "run", "slow", "--data", "{}")
    run_id = started["run_id"]
    await wait_for_status(server, run_id, "PAUSED")
    cancelled = await cli_json(server, "runs", "cancel", run_id)
    assert cancelled["status"] == "CANCELED"
    code, out, _ = await server.cli("runs", "follow", run_id)
    assert code == 1 and f"run {run_id} CANCELED" in out
    code, out, err = await server.cli("flows", "delete", "slow")
    assert code == 0 and out == "flow 'slow' deleted\n", err
    assert await cli_json(server, "flows", "list") == []
    code, _, err = await server.cli("flows", "delete", "slow")
    assert code == 3 and "no flow named 'slow'" in err


async def test_exit_codes(server: Server) -> None:
    """Not found is 3, usage 2, a refused request 1, each one line on stderr, no traceback."""
    code, _, err = await server.cli("flows", "run", "nope")
    assert (code, err) == (3, "conveyor: no flow named 'nope'\n")
    code, _, err = await server.cli("runs", "show", str(uuid.uuid4()))
    assert code == 3 and "NOT_FOUND" in err
    code, _, err = await server.cli("runs", "follow", "not-a-uuid")
    assert code == 3 and "run ids are UUIDs" in err
    code, _, err = await server.cli("flows", "run", "nope", "--data", "{not json")
    assert code == 2 and "--data is not valid JSON" in err
    code, _, err = await server.cli("runs", "list", "--status", "BOGUS")
    assert code == 2 and "invalid choice" in err
    code, _, err = await server.cli("runs", "list", "--limit", "500")
    assert code == 2 and "500 is not between 1 and 200" in err and "Traceback" not in err
    code, _, err = await server.cli("runs", "list", "--limit", "ten")
    assert code == 2 and "'ten' is not an integer" in err


async def test_follow_json_prints_only_json(server: Server, tmp_path: Path) -> None:
    """`runs follow --json` of a run that has already ended: JSON lines only, the last the run."""
    await apply(server, tmp_path, "echo", ECHO)
    run_id = (await cli_json(server, "flows", "run", "echo", "--data", '{"x": 1}'))["run_id"]
    await wait_for_status(server, run_id, "SUCCEEDED")
    code, out, err = await server.cli("runs", "follow", run_id, "--json")
    assert code == 0, err
    lines = [orjson.loads(line) for line in out.splitlines()]
    assert lines[-1]["id"] == run_id and lines[-1]["output"] == {"x": 1}
    assert [step["name"] for step in lines[-1]["steps"]] == ["t"]


async def test_show_and_list_speak_names(server: Server, tmp_path: Path) -> None:
    """`runs show` names the run's flow; `flows list` shows a schedule's cron and zone."""
    await apply(server, tmp_path, "echo", ECHO)
    await apply(server, tmp_path, "nightly", NIGHTLY)
    run_id = (await cli_json(server, "flows", "run", "echo", "--data", '{"x": 2}'))["run_id"]
    await wait_for_status(server, run_id, "SUCCEEDED")
    code, out, err = await server.cli("runs", "show", run_id)
    assert code == 0 and out.startswith(f"run {run_id}  flow 'echo' v1  SUCCEEDED"), (out, err)
    assert (await cli_json(server, "runs", "show", run_id))["flow_name"] == "echo"
    code, out, err = await server.cli("flows", "list")
    rows = {line.split()[1]: line for line in out.splitlines()[1:]}
    assert rows["nightly"].endswith("schedule '0 2 * * *' Europe/Paris"), out
    assert rows["echo"].endswith("webhook"), out


async def test_closed_stdout_ends_quietly(server: Server, tmp_path: Path) -> None:
    """Output piped into a reader that has gone (`| head`): exit 141, no traceback."""
    await apply(server, tmp_path, "echo", ECHO)
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "conveyor",
            "flows",
            "list",
            env=server.env,
            stdout=write_end,
            stderr=asyncio.subprocess.PIPE,
        )
    finally:
        os.close(write_end)
    _out, err = await proc.communicate()
    assert proc.returncode == 141 and err == b"", err


async def test_unreachable_api_is_exit_4() -> None:
    """With nothing listening on the API port, every API command exits 4 in one line."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "conveyor",
        "runs",
        "list",
        "--url",
        f"http://127.0.0.1:{port}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 4, err
    assert out == b"" and err.decode().count("\n") == 1 and b"UNREACHABLE" in err
    assert f"cannot reach the API at http://127.0.0.1:{port} (".encode() in err
    assert b"conveyor up" in err and b"<urlopen" not in err


@pytest.fixture
async def refusing_api() -> AsyncIterator[str]:
    """A loopback server answering every request as Conveyor does without the API key."""

    async def refuse(request: web.Request) -> web.Response:
        error = {"code": "UNAUTHORIZED", "message": "missing or wrong Authorization"}
        return web.json_response({"error": error}, status=401)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", refuse)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_unauthorized_names_the_api_key(refusing_api: str) -> None:
    """A 401: exit 1, and the second line says the CLI sends AP_API_KEY."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AP_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "conveyor",
        "flows",
        "list",
        "--url",
        refusing_api,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 1 and out == b""
    assert err.decode().splitlines() == [
        "conveyor: 401 UNAUTHORIZED: missing or wrong Authorization",
        "  the CLI sends AP_API_KEY from its environment: set it to the server's key",
    ]


def test_help_lists_exit_codes_and_api_key() -> None:
    """`conveyor --help` and each group's help end with the exit codes and AP_API_KEY."""
    for argv in ([], ["flows"], ["runs"], ["secrets"]):
        text = _help(*argv)
        assert "exit codes (every command): 0 done" in text, argv
        assert "4 the API cannot be reached" in text and "AP_API_KEY" in text, argv


def test_help_says_what_run_and_follow_print() -> None:
    """`flows run` says it runs disabled flows too; follow and run describe their JSON lines;
    `runs retry` explains both strategies."""
    run_help = " ".join(_help("flows", "run").split())
    assert "any trigger type, enabled or not" in run_help
    for argv in (("flows", "run"), ("runs", "follow")):
        text = " ".join(_help(*argv).split())
        assert 'one JSON object per line as things happen, {"status": S} or {"step"' in text
        assert "the last line the whole run record" in text
    retry = " ".join(_help("runs", "retry").split())
    assert "FROM_FAILED_STEP (default): same flow version" in retry
    assert "ON_LATEST_VERSION: start over on the flow's current version" in retry


def _help(*names: str) -> str:
    """The help text of ``conveyor NAMES…``, without running the parser."""
    parser = build_parser()
    for name in names:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return str(parser.format_help())
