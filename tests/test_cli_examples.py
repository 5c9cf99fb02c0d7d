"""The CLI and the examples against a real `conveyor up`: apply, webhook, runs show."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.polling import eventually
from tests.processes import conveyor_env, free_port, start_conveyor, stop_conveyor

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


class Server:
    """A `conveyor up` subprocess and the environment its CLI calls need."""

    def __init__(self, env: dict[str, str], port: int) -> None:
        self.env = env
        self.base = f"http://127.0.0.1:{port}"

    async def cli(self, *args: str, stdin: bytes | None = None) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "conveyor",
            *args,
            env=self.env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate(stdin)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()


@pytest.fixture
async def notify_sink() -> AsyncIterator[tuple[str, list[Any]]]:
    """A loopback HTTP endpoint that records what the flow's http step posts."""
    received: list[Any] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/notify", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}/notify", received
    await runner.cleanup()


@pytest.fixture
async def server(db: Any, redis: Any, postgres_url: str, redis_url: str) -> AsyncIterator[Server]:
    """`conveyor up` (WORKER_AND_APP) on a free loopback port against the test servers."""
    port = free_port()
    env = conveyor_env(
        postgres_url,
        redis_url,
        AP_PORT=str(port),
        AP_SSRF_ALLOW_LIST="127.0.0.1",
        AP_WORKER_CONCURRENCY="4",
    )
    proc = await start_conveyor(env, port)
    try:
        yield Server(env, port)
    finally:
        await stop_conveyor(proc)


async def test_order_example_from_cli_to_step_log(
    server: Server, notify_sink: tuple[str, list[Any]]
) -> None:
    """Apply with the CLI, call the sync webhook, read the step log with `runs show`."""
    url, received = notify_sink
    code, out, err = await server.cli("secrets", "set", "NOTIFY_URL", stdin=url.encode() + b"\n")
    assert code == 0, err
    code, out, err = await server.cli("flows", "apply", str(EXAMPLES / "order-alert.yaml"))
    assert code == 0, err
    assert out.startswith("created flow 'order-alert'")
    sync_url = next(line.split()[-1] for line in out.splitlines() if "sync webhook:" in line)
    async with (
        aiohttp.ClientSession() as http,
        http.post(sync_url, json={"amount": 250, "customer": {"email": "a@example.com"}}) as resp,
    ):
        assert resp.status == 200
        assert await resp.json() == {"big": True, "total": 250}
        run_id = resp.headers["x-run-id"]
    assert received == [{"email": "a@example.com", "total": 250}]

    async def shown_succeeded() -> tuple[int, str, str] | None:
        answer = await server.cli("runs", "show", run_id)
        return answer if "SUCCEEDED" in answer[1].splitlines()[0] else None

    code, out, err = await eventually(shown_succeeded, what=f"run {run_id} shown SUCCEEDED")
    assert code == 0, err
    lines = out.splitlines()
    assert "SUCCEEDED" in lines[0]
    for step in ("parse", "score", "route", "notify", "reply"):
        assert any(line.split()[0] == step for line in lines[2:]), out
    code, out, _ = await server.cli("flows", "apply", str(EXAMPLES / "order-alert.yaml"))
    assert code == 0 and out.startswith("updated flow 'order-alert'") and "version=2" in out
    code, out, _ = await server.cli("runs", "list", "--status", "SUCCEEDED")
    assert code == 0 and run_id in out


async def test_loop_and_code_examples(server: Server) -> None:
    """The loop example returns one entry per item; the code example computes word stats."""
    results = {}
    for name in ("invoice-lines.json", "word-stats.yaml"):
        code, out, err = await server.cli("flows", "apply", str(EXAMPLES / name))
        assert code == 0, err
        results[name] = next(
            line.split()[-1] for line in out.splitlines() if "sync webhook:" in line
        )
    async with aiohttp.ClientSession() as http:
        lines = [{"sku": "a", "qty": 1}, {"sku": "b", "qty": 3}]
        async with http.post(results["invoice-lines.json"], json={"lines": lines}) as resp:
            assert resp.status == 200, await resp.text()
            body = await resp.json()
        assert body == {
            "lines": [
                {"line": {"n": 0, "sku": "a", "qty": 1}},
                {"line": {"n": 1, "sku": "b", "qty": 3}},
            ]
        }
        async with http.post(
            results["word-stats.yaml"], json={"text": "the cat and the hat and the bat"}
        ) as resp:
            assert resp.status == 200
            stats = await resp.json()
    assert stats["words"] == 8 and stats["top"][0] == ["the", 3]


async def test_cli_reports_api_errors(server: Server, tmp_path: Path) -> None:
    """An invalid flow file: exit 1 and the 422 details, one per line; no traceback."""
    bad = tmp_path / "bad.json"
    bad.write_text(
        '{"name": "x", "trigger": {"type": "webhook"}, "steps": [{"name": "s", "type": "nope"}]}'
    )
    code, _out, err = await server.cli("flows", "apply", str(bad))
    assert code == 1
    lines = err.splitlines()
    assert lines[0] == "conveyor: 422 FLOW_INVALID: 1 problem:", err
    assert len(lines) == 2 and lines[1].startswith("  steps[0].type: "), err
    assert "Traceback" not in err
