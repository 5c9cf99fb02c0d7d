"""Issue 10: a canary secret set at the start never shows up anywhere at the end.

A real ``conveyor up`` (debug logging, captured) runs flows that use the canary every way a
flow can: in step inputs and outputs, as a dict key coming back from a remote, in an http
header and body, in a code step's logs and return value, as an http method that fails, in a
sync webhook that fails, and as the caller's own ``Authorization``/``Cookie`` headers. Then
the process logs, every PostgreSQL row, every key of the Redis test DB and every board page
and live JSON view are searched for the canary (any case, plain, percent-encoded, base64).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from tests.conftest import throwaway_database
from tests.polling import eventually
from tests.processes import conveyor_env, free_port

CANARY = f"Canary-{uuid.uuid4().hex[:12]}/x+y"
KEY = "canary-test-api-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _forms(value: str) -> list[str]:
    """Forms the canary could leak in (compared lower-case)."""
    raw = value.encode()
    return [
        f.lower()
        for f in (
            value,
            quote(value, safe=""),
            quote(value),
            base64.b64encode(raw).decode(),
            base64.b64encode(b"u:" + raw).decode(),
            value.split("/", maxsplit=1)[0],  # the distinctive half alone
        )
    ]


def assert_clean(where: str, text: str) -> None:
    low = text.lower()
    for form in _forms(CANARY):
        assert form not in low, f"canary ({form}) found in {where}"


#: Every request the echo server received (proof the flows really used the canary).
RECEIVED: list[str] = []


@pytest.fixture
async def echo() -> AsyncIterator[str]:
    """A loopback server that echoes headers and body and also answers {value: key}."""

    async def handle(request: web.Request) -> web.Response:
        RECEIVED.append(f"{request.url} {dict(request.headers)} {await request.text()}")
        data = await request.json() if request.can_read_body else {}
        inverted = {str(v): k for k, v in data.items()} if isinstance(data, dict) else {}
        return web.json_response(
            {"headers": dict(request.headers), "body": data, "inverted": inverted}
        )

    app = web.Application()
    app.router.add_route("*", "/echo", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


FLOWS: list[dict[str, Any]] = [
    {
        "name": "canary-uses",
        "trigger": {"type": "webhook"},
        "steps": [
            {
                "name": "t",
                "type": "transform",
                "input": {"k": "{{secrets.CANARY}}", "msg": "token={{secrets.CANARY}}"},
            },
            {
                "name": "h",
                "type": "http",
                "input": {
                    "method": "POST",
                    "url": "ECHO/echo",
                    "headers": {"X-Api-Key": "{{secrets.CANARY}}"},
                    "query": {"q": "{{secrets.CANARY}}"},
                    "json": {"k": "{{secrets.CANARY}}"},
                },
            },
            {
                "name": "c",
                "type": "code",
                "input": {"s": "{{secrets.CANARY}}"},
                "code": (
                    "def run(input):\n"
                    "    print('secret is', input['s'], input['s'].upper())\n"
                    "    return {input['s']: input['s'].lower()}\n"
                ),
                "continue_on_failure": True,
            },
        ],
    },
    {
        "name": "canary-fails",
        "trigger": {"type": "webhook"},
        "steps": [
            {
                "name": "bad",
                "type": "http",
                "input": {"method": "{{secrets.CANARY}}", "url": "ECHO/echo"},
            }
        ],
    },
    {
        "name": "canary-missing",
        "trigger": {"type": "webhook"},
        "steps": [
            {
                "name": "m",
                "type": "transform",
                "input": {"x": "{{trigger.body.{{secrets.CANARY}}}}"},
            }
        ],
    },
]


async def _wait_ready(port: int, proc: asyncio.subprocess.Process) -> None:
    async with aiohttp.ClientSession() as http:

        async def ready() -> bool:
            assert proc.returncode is None, "conveyor up exited"
            async with http.get(f"http://127.0.0.1:{port}/readyz") as r:
                return r.status == 200

        await eventually(
            ready,
            timeout_s=20,
            interval_s=0.05,
            what="conveyor up ready",
            ignore=(aiohttp.ClientError,),
        )


async def _dump_postgres(url: str) -> str:
    conn = await asyncpg.connect(url)
    try:
        tables = await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1"
        )
        parts = []
        for t in tables:
            rows = await conn.fetch(f'SELECT row_to_json(x)::text AS j FROM "{t["tablename"]}" x')
            parts += [r["j"] for r in rows]
    finally:
        await conn.close()
    assert parts, "nothing stored"
    return "\n".join(parts)


async def _dump_redis(client: aioredis.Redis) -> str:
    out: list[str] = []
    async for key in client.scan_iter(count=500):
        kind = (await client.type(key)).decode()
        if kind == "string":
            value: Any = await client.get(key)
        elif kind == "hash":
            value = await client.hgetall(key)
        elif kind == "list":
            value = await client.lrange(key, 0, -1)
        elif kind == "set":
            value = await client.smembers(key)
        elif kind == "zset":
            value = await client.zrange(key, 0, -1, withscores=True)
        elif kind == "stream":
            value = await client.xrange(key)
        else:
            value = kind
        out.append(f"{key!r} {value!r}")
    assert out, "nothing in Redis"
    # repr escapes non-ASCII; the canary is ASCII, so it would show as itself.
    return "\n".join(out)


async def test_canary_secret_leaks_nowhere(
    echo: str, postgres_server_url: str, redis_url: str, redis: aioredis.Redis, tmp_path: Path
) -> None:
    """Logs, PostgreSQL rows, Redis entries and board pages never contain the canary."""
    port = free_port()
    log_path = tmp_path / "conveyor.log"
    async with throwaway_database(postgres_server_url, "conveyor_canary") as db_url:
        env = conveyor_env(
            db_url,
            redis_url,
            AP_PORT=str(port),
            AP_API_KEY=KEY,
            AP_LOG_LEVEL="debug",
            AP_SSRF_ALLOW_LIST="127.0.0.1",
            AP_WEBHOOK_TIMEOUT_SECONDS="20",
            AP_SANDBOX_ALLOW_PARTIAL_ISOLATION="true",
        )
        with log_path.open("wb") as log:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "conveyor", "up", env=env, stdout=log, stderr=log
            )
            try:
                await _wait_ready(port, proc)
                pages = await _exercise(f"http://127.0.0.1:{port}", echo)
            finally:
                proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), 30)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
        stored = await _dump_postgres(db_url)
    logs = log_path.read_text(errors="replace")
    assert logs.strip(), "no logs captured"
    assert_clean("logs", logs)
    assert_clean("PostgreSQL", stored)
    assert_clean("Redis", await _dump_redis(redis))
    for name, page in pages.items():
        assert_clean(name, page)
    # The detector works: the remote did receive the canary (header and body).
    assert any(CANARY in r for r in RECEIVED)
    with pytest.raises(AssertionError):
        assert_clean("self-check", f"x {CANARY.upper()} y")


async def _exercise(base: str, echo: str) -> dict[str, str]:
    """Drive the flows; return every board page and live view by path."""
    pages: dict[str, str] = {}
    async with aiohttp.ClientSession(base_url=base, headers=AUTH) as http:
        r = await http.put("/api/v1/secrets/CANARY", json={"value": CANARY})
        assert r.status == 201, await r.text()
        # A literal signing secret is refused without echoing it.
        literal = {**FLOWS[0], "name": "lit", "trigger": {"type": "webhook", "secret": CANARY}}
        r = await http.post("/api/v1/flows", json=literal)
        assert r.status == 422
        pages["literal-refusal"] = await r.text()
        ids = []
        for doc in FLOWS:
            text = orjson_dumps(doc).replace("ECHO", echo)
            r = await http.post(
                "/api/v1/flows", data=text, headers={"Content-Type": "application/json"}
            )
            if r.status == 422:
                pages[f"refusal {doc['name']}"] = await r.text()
                continue
            assert r.status == 201, await r.text()
            ids.append((await r.json())["id"])
        runs = []
        for fid in ids:
            caller = {
                "Authorization": f"Bearer {CANARY}",
                "Cookie": f"s={CANARY}",
                "X-Api-Key": CANARY,
            }
            r = await http.post(f"/api/v1/webhooks/{fid}/sync", json={"a": 1}, headers=caller)
            assert r.status < 600
            pages[f"sync {fid}"] = await r.text()
            runs.append(r.headers["x-run-id"])
        for run_id in runs:
            run: dict[str, Any] = {}

            async def settled(run_id: str = run_id, run: dict[str, Any] = run) -> bool:
                run.update(await (await http.get(f"/api/v1/flow-runs/{run_id}")).json())
                return run["status"] not in ("QUEUED", "RUNNING")

            # Scanned as it is after the wait, settled or not (the canary is in any state).
            with contextlib.suppress(AssertionError):
                await eventually(settled, timeout_s=20, interval_s=0.1)
            pages[f"api run {run_id}"] = orjson_dumps(run)
            for path in (f"/admin/runs/{run_id}", f"/admin/api/runs/{run_id}"):
                pages[path] = await (await http.get(path)).text()
        for path in (
            "/admin/queues", "/admin/queues/runs", "/admin/queues/sync", "/admin/runs",
            "/admin/flows", "/admin/workers", "/admin/api/queues", "/admin/api/runs",
            "/admin/queues/sync?state=completed", "/admin/queues/runs?state=failed",
            "/api/v1/flow-runs", "/api/v1/queues", "/api/v1/flows",
        ):  # fmt: skip
            r = await http.get(path)
            assert r.status == 200, (path, r.status)
            pages[path] = await r.text()
    assert any("***" in p for p in pages.values()), "redaction never happened"
    return pages


def orjson_dumps(value: Any) -> str:
    return orjson.dumps(value).decode()
