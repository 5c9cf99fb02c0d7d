"""The CLI's flow and run commands against a real `conveyor up`: names, --json, exit codes."""

from __future__ import annotations

import asyncio
import sys
import uuid
from pathlib import Path
from typing import Any

import orjson

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
    assert code == 1 and "BAD_REQUEST" in err and "Traceback" not in err


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
