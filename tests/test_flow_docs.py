"""docs/flows.md: every example flow is accepted by the API and runs as the page says.

The page marks each complete flow with ``<!-- example: NAME -->`` before a ```yaml block. The
```bash blocks that follow it (up to the next example or heading) holding one ``curl`` command
are sent to a real server (API and worker in one process, embedded sandbox) and the ```http
block after each is the answer asserted: status line, the headers shown, and the body — JSON
compared exactly except strings written ``"<...>"``, which stand for per-run values. Examples
whose requests the page describes in prose (signatures, retries, http) get their own checks.
Schedule flows are only validated. The http examples talk to a loopback server started here.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import shlex
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from conveyor.app import create_app
from conveyor.engine.conditions import OPS, UNARY_OPS, ConditionError, compile_condition
from conveyor.engine.errors import FlowInvalid
from conveyor.engine.flow import STEP_TYPES, Trigger, load_document, parse_flow
from conveyor.engine.scheduler import scheduled_trigger
from conveyor.engine.templating import render
from conveyor.store.db import Database, PoolOptions
from tests.api.conftest import make_settings
from tests.polling import eventually
from tests.processes import free_port

DOC = Path(__file__).resolve().parent.parent / "docs" / "flows.md"
ORDERS_TOKEN = "tok-doc-123"
PING_SECRET = "whsec-doc-456"
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
_MARKER = re.compile(r"<!-- example: ([\w-]+) -->")
_WILDCARD = re.compile(r"<[^<>]+>")


@dataclass
class Exchange:
    """One ```bash block of an example and the ```http answer shown after it (if any)."""

    bash: str
    answer: str | None = None


@dataclass
class Example:
    """A marked flow document and the exchanges the page shows for it."""

    name: str
    document: str
    exchanges: list[Exchange] = field(default_factory=list)


def parse_doc(text: str) -> dict[str, Example]:
    """Every marked example with its requests and answers, in page order."""
    examples: dict[str, Example] = {}
    current: Example | None = None
    pending: str | None = None
    pos = 0
    for m in _FENCE.finditer(text):
        prose = text[pos : m.start()]
        pos = m.end()
        if re.search(r"^#{1,6} ", prose, re.MULTILINE):
            current = None
        markers = _MARKER.findall(prose)
        if markers:
            current, pending = None, markers[-1]
        lang, body = m.group(1), m.group(2)
        if pending is not None:
            assert lang == "yaml", f"example {pending}: the marker must precede a yaml block"
            assert pending not in examples, f"example {pending} is marked twice"
            current = examples[pending] = Example(pending, body)
            pending = None
        elif current is not None and lang == "bash":
            current.exchanges.append(Exchange(body))
        elif current is not None and lang == "http":
            assert current.exchanges, f"example {current.name}: an answer without a request"
            current.exchanges[-1].answer = body
    return examples


EXAMPLES = parse_doc(DOC.read_text())


@dataclass
class Request:
    """A curl command line as the request it sends."""

    method: str
    path: str
    headers: dict[str, str]
    data: bytes | None


def parse_curl(bash: str) -> Request:
    """The request of a one-command ``curl`` block (``-X``, ``-H``, ``-d``, URL)."""
    args = shlex.split(bash.replace("\\\n", " "), comments=True)
    assert args[0] == "curl", bash
    method, headers, data, url = None, {}, None, None
    it = iter(args[1:])
    for arg in it:
        if arg == "-X":
            method = next(it)
        elif arg == "-H":
            key, _, value = next(it).partition(":")
            headers[key.strip()] = value.strip()
        elif arg == "-d":
            data = next(it).encode()
        elif arg.startswith("http"):
            url = arg
        else:
            assert arg in ("-s", "-i"), f"unsupported curl option {arg}"
    assert url is not None, bash
    if data is not None and not any(k.lower() == "content-type" for k in headers):
        headers["Content-Type"] = "application/x-www-form-urlencoded"  # what curl -d sends
    path = url.split("://", 1)[1].partition("/")[2]
    return Request(method or ("POST" if data is not None else "GET"), "/" + path, headers, data)


@dataclass
class Answer:
    """An ```http block: status, the headers it shows, the body text."""

    status: int
    headers: dict[str, str]
    body: str


def parse_answer(block: str) -> Answer:
    """Split an ```http block into status line, headers and body."""
    head, _, body = block.partition("\n\n")
    lines = head.splitlines()
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip()] = value.strip()
    return Answer(status, headers, body.strip())


def matches(expected: Any, actual: Any) -> bool:
    """JSON equality where an expected string ``"<...>"`` (a per-run value) matches anything."""
    if isinstance(expected, str) and _WILDCARD.fullmatch(expected):
        return True
    if isinstance(expected, dict):
        return (
            isinstance(actual, dict)
            and expected.keys() == actual.keys()
            and all(matches(v, actual[k]) for k, v in expected.items())
        )
    if isinstance(expected, list):
        return (
            isinstance(actual, list)
            and len(expected) == len(actual)
            and all(matches(e, a) for e, a in zip(expected, actual, strict=True))
        )
    return type(expected) is type(actual) and expected == actual


# --- offline checks -------------------------------------------------------------------------


def test_every_step_type_has_one_example() -> None:
    """The page documents each step type under its own heading with one example flow of it."""
    text = DOC.read_text()
    for typ in STEP_TYPES:
        assert f"\n### {typ}\n" in text, typ
        doc = load_document(EXAMPLES[typ].document, "application/yaml")
        types = {s["type"] for s in doc["steps"]}
        assert typ in types, f"example {typ} has no {typ} step"


def test_every_branch_operator_is_documented() -> None:
    """The operator table names every operator the engine knows, and no other."""
    text = DOC.read_text()
    table = text.split("| op | true when |", 1)[1].split("\n\n", 1)[0]
    first_column = re.findall(r"^\| ([^|]+) \|", table, re.MULTILINE)
    ops = {op for cell in first_column for op in re.findall(r"`(\w+)`", cell)}
    assert ops == set(OPS)


def test_examples_validate_offline() -> None:
    """Every marked example is a valid flow for the engine's parser."""
    assert len(EXAMPLES) >= 10
    for ex in EXAMPLES.values():
        parse_flow(load_document(ex.document, "application/yaml"))


def test_scheduled_trigger_shape_is_as_documented() -> None:
    """A schedule run's trigger is what the page shows (method SCHEDULE, body keys)."""
    flow = parse_flow(load_document(EXAMPLES["schedule"].document, "application/yaml"))
    trig = scheduled_trigger(flow.trigger, datetime(2026, 1, 5, 6, 30, tzinfo=UTC))
    assert trig == {
        "method": "SCHEDULE",
        "headers": {},
        "query": {},
        "body": {
            "scheduled_at": "2026-01-05T06:30:00+00:00",
            "cron": "30 7 * * 1-5",
            "timezone": "Europe/Berlin",
        },
    }
    assert flow.trigger == Trigger("schedule", cron="30 7 * * 1-5", timezone="Europe/Berlin")


def test_template_rules_are_as_documented() -> None:
    """Whole values keep their type, text interpolates JSON, the path forms all resolve, keys
    stay literal, and an expression is refused when the flow is saved."""
    scope = {"trigger": {"body": {"amount": 250, "items": ["tea", "cups"], "unit price": 3}}}
    b = "trigger.body"
    assert render({"t": f"{{{{{b}.amount}}}}"}, scope) == {"t": 250}
    assert render(f"n={{{{{b}.items}}}} {{{{{b}.amount}}}}", scope) == 'n=["tea","cups"] 250'
    assert render(f"{{{{{b}.items[-1]}}}}", scope) == "cups"
    assert render(f"{{{{{b}.items.0}}}}", scope) == "tea"
    assert render(f'{{{{{b}["unit price"]}}}}', scope) == 3
    assert render({"{{trigger.body.amount}}": 1}, scope) == {"{{trigger.body.amount}}": 1}
    for expression in ("{{trigger.body.amount + 1}}", "{{trigger.body | upper}}"):
        flow_step = {"name": "s", "type": "transform", "input": {"v": expression}}
        doc = {"name": "x", "trigger": {"type": "manual"}, "steps": [flow_step]}
        with pytest.raises(FlowInvalid, match="expressions are not supported"):
            parse_flow(doc)


def _holds(left: Any, op: str, right: Any = None) -> bool:
    item = {"left": left, "op": op} | ({} if op in UNARY_OPS else {"right": right})
    return compile_condition({"all": [item]}).evaluate({})


def test_operator_coercions_are_as_documented() -> None:
    """Each coercion rule the operator table states, and the comparisons it says fail."""
    assert (
        _holds(5, "eq", "5")
        and _holds(5, "eq", "5.0")
        and _holds([1, {"a": 2}], "eq", [1, {"a": 2}])
    )
    assert _holds(True, "ne", "true") and _holds(1, "ne", True)
    assert _holds(" 10 ", "gt", 9) and _holds("3", "lte", 3.0)
    for bad in (True, None, "ten"):
        with pytest.raises(ConditionError):
            _holds(bad, "gt", 1)
    assert _holds("a tea cup", "contains", "tea") and _holds([1, 2], "contains", "2")
    assert _holds({"k": 1}, "contains", "k") and _holds(None, "not_contains", "x")
    with pytest.raises(ConditionError):
        _holds(12, "contains", 1)
    assert _holds("x@bigcorp.com", "matches", r"corp\.com$") and _holds(None, "matches", "^$")
    assert _holds(1234, "matches", "^12")
    assert _holds("{{run.nothing}}", "not_exists") and not _holds(None, "exists")
    assert _holds(" TRUE ", "is_true") and _holds("false", "is_false")
    assert not _holds(1, "is_true") and not _holds("yes", "is_true") and not _holds(0, "is_false")


def _anchors(markdown: str) -> set[str]:
    """GitHub's anchors for the headings of a markdown text."""
    headings = re.findall(r"^#{1,6} (.+)$", _FENCE.sub("", markdown), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings}


def test_links_resolve() -> None:
    """Every relative link of the page names an existing file and, if given, heading."""
    text = DOC.read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links
    for link in links:
        if link.startswith(("http://", "https://")):
            continue
        path, _, anchor = link.partition("#")
        target = (DOC.parent / path).resolve() if path else DOC
        assert target.is_file(), link
        if anchor:
            assert anchor in _anchors(target.read_text()), link


def test_answer_matching_is_strict() -> None:
    """The comparison used below fails on a changed value, a missing key or an extra key."""
    assert matches({"a": "<any>", "b": [1]}, {"a": {"x": 1}, "b": [1]})
    assert not matches({"a": 1}, {"a": 1, "b": 2})
    assert not matches({"a": 1}, {"a": "1"})
    assert not matches([1, 2], [1])


# --- against a running server ---------------------------------------------------------------


@dataclass
class Remote:
    """The loopback endpoints the http examples call, and what they received."""

    base: str
    orders: list[tuple[dict[str, str], Any]] = field(default_factory=list)
    crm_calls: dict[str, int] = field(default_factory=dict)


@pytest.fixture(scope="module")
async def remote() -> AsyncIterator[Remote]:
    """An orders endpoint (201 {"id": "A-1001"}) and a CRM that is flaky or down by email."""
    port = free_port()
    state = Remote(f"http://127.0.0.1:{port}")

    async def orders(request: web.Request) -> web.Response:
        state.orders.append((dict(request.headers) | dict(request.query), await request.json()))
        if request.headers.get("Authorization") != f"Bearer {ORDERS_TOKEN}":
            return web.json_response({"error": "unauthorised"}, status=401)
        return web.json_response({"id": "A-1001"}, status=201)

    async def crm(request: web.Request) -> web.Response:
        email = request.query.get("email", "")
        n = state.crm_calls[email] = state.crm_calls.get(email, 0) + 1
        if email.startswith("down") or n <= 2:
            return web.json_response({"error": "overloaded"}, status=503)
        return web.json_response({"tier": "gold"})

    app = web.Application()
    app.router.add_post("/orders", orders)
    app.router.add_get("/crm", crm)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield state
    await runner.cleanup()


@pytest.fixture(scope="module")
async def server(
    postgres_url: str, redis_url: str, remote: Remote
) -> AsyncIterator[TestClient[Any, Any]]:
    """One API + worker process for every example (the sandbox starts once), on empty stores."""
    client = aioredis.Redis.from_url(redis_url)
    await client.flushdb()
    await client.aclose()
    database = await Database.connect(postgres_url, PoolOptions(max_size=2))
    async with database.writer() as conn:
        await conn.execute("TRUNCATE step_runs, runs, flow_versions, flows, secrets CASCADE")
    await database.close()
    settings = make_settings(
        postgres_url,
        redis_url,
        AP_CONTAINER_TYPE="WORKER_AND_APP",
        AP_WORKER_CONCURRENCY="4",
        AP_SSRF_ALLOW_LIST="127.0.0.1",
    )
    test_client: TestClient[Any, Any] = TestClient(
        TestServer(create_app(settings), host="127.0.0.1")
    )
    await test_client.start_server()
    secrets = {
        "ORDERS_API": f"{remote.base}/orders",
        "ORDERS_TOKEN": ORDERS_TOKEN,
        "CRM_URL": f"{remote.base}/crm",
        "PING_SECRET": PING_SECRET,
    }
    for name, value in secrets.items():
        resp = await test_client.put(f"/api/v1/secrets/{name}", json={"value": value})
        assert resp.status in (200, 201), await resp.text()
    yield test_client
    await test_client.close()


async def create(server: TestClient[Any, Any], name: str) -> str:
    """Submit an example as YAML; returns the new flow's id."""
    resp = await server.post(
        "/api/v1/flows",
        data=EXAMPLES[name].document.encode(),
        headers={"Content-Type": "application/yaml"},
    )
    assert resp.status == 201, await resp.text()
    flow_id: str = (await resp.json())["id"]
    return flow_id


async def run_record(server: TestClient[Any, Any], run_id: str, done: Any = None) -> dict[str, Any]:
    """The run's record once ``done(record)`` holds (default: the run ended), within 15 s."""
    record: dict[str, Any] = {}

    async def there() -> dict[str, Any] | None:
        record.update(await (await server.get(f"/api/v1/flow-runs/{run_id}")).json())
        ok = done(record) if done else record["status"] not in ("QUEUED", "RUNNING", "PAUSED")
        return dict(record) if ok else None

    try:
        return await eventually(there, timeout_s=15, interval_s=0.05)
    except AssertionError:
        raise AssertionError(f"run {run_id} did not get there: {record}") from None


async def ensure(server: TestClient[Any, Any], name: str) -> str:
    """The id of the example's flow, created if an earlier test did not."""
    flow_name = load_document(EXAMPLES[name].document, "application/yaml")["name"]
    found = await (await server.get("/api/v1/flows", params={"name": flow_name})).json()
    return str(found["data"][0]["id"]) if found["data"] else await create(server, name)


def step(record: dict[str, Any], name: str) -> dict[str, Any]:
    """The record's entry for step ``name``."""
    found: dict[str, Any] = next(s for s in record["steps"] if s["name"] == name)
    return found


async def play(server: TestClient[Any, Any], name: str, flow_id: str) -> int:
    """Send the example's curl requests; assert every answer shown. Returns how many ran."""
    run_id = ""
    played = 0
    for ex in EXAMPLES[name].exchanges:
        if not ex.bash.lstrip().startswith("curl"):
            continue
        req = parse_curl(ex.bash.replace("<flow id>", flow_id).replace("<run id>", run_id))
        expected = parse_answer(ex.answer) if ex.answer else None
        polling = req.method == "GET" and "/flow-runs/" in req.path

        async def answer(
            req: Any = req, expected: Any = expected, polling: bool = polling
        ) -> tuple[Any, str, str] | None:
            resp = await server.request(req.method, req.path, headers=req.headers, data=req.data)
            text = await resp.text()
            this_run = resp.headers.get("x-run-id") or req.path.rsplit("/", 1)[-1]
            if polling and expected is not None:
                body = expected.body.replace("<flow id>", flow_id).replace("<run id>", this_run)
                if not matches(json.loads(body), json.loads(text)):
                    return None  # a run record the docs show finished: not there yet
            return resp, text, this_run

        resp, text, this_run = await eventually(answer, timeout_s=15, interval_s=0.05, what=name)
        played += 1
        if "x-run-id" in resp.headers:
            run_id = resp.headers["x-run-id"]
        if expected is None:
            assert resp.status < 300, text
            continue
        assert resp.status == expected.status, f"{name}: {req.method} {req.path}: {text}"
        for key, value in expected.headers.items():
            assert resp.headers.get(key) == value, f"{name}: header {key}: {resp.headers}"
        want = expected.body.replace("<flow id>", flow_id).replace("<run id>", this_run)
        try:
            want_json = json.loads(want)
        except json.JSONDecodeError:
            assert text == want, f"{name}: {text!r}"
        else:
            assert matches(want_json, json.loads(text)), f"{name}: got {text}"
    return played


@pytest.mark.parametrize(
    "name",
    ["transform", "code", "branch", "loop", "delay", "respond", "manual", "failed-run"],
)
async def test_example_answers_as_documented(server: TestClient[Any, Any], name: str) -> None:
    """The example's requests get exactly the answers the page shows."""
    flow_id = await create(server, name)
    assert await play(server, name, flow_id) >= 1


async def test_manual_run_sees_the_posted_body(server: TestClient[Any, Any]) -> None:
    """A manual run: the JSON body is trigger.body, trigger.method is MANUAL; the flow's
    webhook URL answers too."""
    fid = await ensure(server, "manual")
    resp = await server.post(f"/api/v1/flows/{fid}/run", json={"index": "orders"})
    assert resp.status == 202
    record = await run_record(server, resp.headers["x-run-id"])
    assert record["status"] == "SUCCEEDED"
    assert record["output"] == {"index": "orders", "requested_by": "MANUAL"}
    resp = await server.post(f"/api/v1/webhooks/{fid}", json={"index": "users"})
    assert resp.status == 202
    record = await run_record(server, resp.headers["x-run-id"])
    assert record["output"] == {"index": "users", "requested_by": "POST"}


async def test_idempotency_and_request_data(server: TestClient[Any, Any]) -> None:
    """A repeated Idempotency-Key gets the first status, the same run and idempotent_replay;
    the same key with another body 422; templates in a body stay text; credentials are ***."""
    fid = await ensure(server, "transform")
    url = f"/api/v1/webhooks/{fid}"
    body = {"id": 1, "customer": {"email": "b@example.com"}, "items": ["pot"]}
    key = {"Idempotency-Key": "order-1"}
    first = await server.post(url, json=body, headers=key)
    assert first.status == 202
    run_id = first.headers["x-run-id"]
    again = await server.post(url, json=body, headers=key)
    assert again.status == 202
    replay = await again.json()
    assert replay.pop("status") in ("QUEUED", "RUNNING", "SUCCEEDED")
    assert replay == {"run_id": run_id, "idempotent_replay": True}
    other = await server.post(url, json=body | {"id": 2}, headers=key)
    assert other.status == 422
    assert (await other.json())["error"]["code"] == "IDEMPOTENCY_KEY_REUSED"
    assert (await run_record(server, run_id))["output"]["id"] == 1
    # A template arriving as data is substituted as text, never rendered.
    body |= {"id": "{{secrets.PING_SECRET}}"}
    resp = await server.post(url, json=body, headers={"Authorization": "Bearer caller-token"})
    assert resp.status == 202
    record = await run_record(server, resp.headers["x-run-id"])
    assert record["output"]["id"] == "{{secrets.PING_SECRET}}"
    assert record["trigger"]["headers"]["authorization"] == "***"


async def test_step_records_are_as_documented(server: TestClient[Any, Any]) -> None:
    """A code step's prints are its logs; loop steps record parent and iteration, and a
    branch inside a loop records the loop's index."""
    fid = await ensure(server, "code")
    lines = [{"price": 1, "qty": 1}, {"price": 2, "qty": 1}]
    resp = await server.post(f"/api/v1/webhooks/{fid}", json={"lines": lines})
    record = await run_record(server, resp.headers["x-run-id"])
    assert step(record, "total")["logs"] == "lines: 2\n"
    fid = await ensure(server, "loop")
    items: list[dict[str, Any]] = [{"sku": "a", "qty": 20}, {"sku": "b", "qty": 1}]
    resp = await server.post(f"/api/v1/webhooks/{fid}", json={"lines": items})
    record = await run_record(server, resp.headers["x-run-id"])
    placed = [(s["name"], s["parent"], s["iteration"]) for s in record["steps"]]
    assert placed == [
        ("line", "each", 0),
        ("bulk", "each", 0),
        ("discount", "bulk", 0),
        ("line", "each", 1),
        ("bulk", "each", 1),
        ("each", None, None),
        ("reply", None, None),
    ]


async def test_schedule_example_is_accepted(server: TestClient[Any, Any]) -> None:
    """The schedule example is stored with its trigger (not waited on)."""
    resp = await server.post(
        "/api/v1/flows",
        data=EXAMPLES["schedule"].document.encode(),
        headers={"Content-Type": "application/yaml"},
    )
    assert resp.status == 201, await resp.text()
    body = await resp.json()
    assert body["trigger"] == {
        "type": "schedule",
        "cron": "30 7 * * 1-5",
        "timezone": "Europe/Berlin",
    }
    assert (await server.delete(f"/api/v1/flows/{body['id']}")).status == 204


async def test_http_example_calls_the_endpoint(
    server: TestClient[Any, Any], remote: Remote
) -> None:
    """The http example answers as shown, sends the idempotency key, and redacts secrets."""
    flow_id = await create(server, "http")
    assert await play(server, "http", flow_id) == 1
    (headers, payload) = remote.orders[-1]
    assert payload == {"sku": "tea", "qty": 2} and headers["source"] == "webhook"
    runs = await (await server.get("/api/v1/flow-runs", params={"flow_id": flow_id})).json()
    run_id = runs["data"][0]["id"]
    assert headers["Idempotency-Key"] == f"{run_id}:create"
    record = await run_record(server, run_id, lambda r: len(r["steps"]) == 2)
    sent = step(record, "create")["input"]
    assert sent["url"] == "***" and sent["headers"] == {"Authorization": "Bearer ***"}
    assert ORDERS_TOKEN not in json.dumps(record)


async def test_retry_example_retries_then_falls_back(server: TestClient[Any, Any]) -> None:
    """Two 503s then an answer: gold, attempt 3; always 503: FAILED, and the fallback answers."""
    flow_id = await create(server, "retry")
    resp = await server.post(f"/api/v1/webhooks/{flow_id}/sync", json={"email": "flaky@x.io"})
    assert resp.status == 200 and await resp.json() == {"tier": "gold"}
    record = await run_record(server, resp.headers["x-run-id"])
    lookup = step(record, "lookup")
    assert (lookup["status"], lookup["attempt"]) == ("SUCCEEDED", 3)
    resp = await server.post(f"/api/v1/webhooks/{flow_id}/sync", json={"email": "down@x.io"})
    assert resp.status == 200 and await resp.json() == {"tier": "unknown"}
    record = await run_record(server, resp.headers["x-run-id"])
    assert record["status"] == "SUCCEEDED"
    lookup = step(record, "lookup")
    assert (lookup["status"], lookup["attempt"]) == ("FAILED", 3)
    assert [s["name"] for s in record["steps"]] == ["lookup", "pick", "fallback"]


def _signed(body: bytes, secret: str, t: int) -> str:
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


async def test_signed_webhook_example(server: TestClient[Any, Any]) -> None:
    """Unsigned 401; signed as the page shows 200 {"pong": 1}; the same signature again 409;
    a literal trigger secret is refused with 422."""
    flow_id = await create(server, "signed-webhook")
    url = f"/api/v1/webhooks/{flow_id}/sync"
    body = b'{"ping": 1}'
    json_type = {"Content-Type": "application/json"}
    assert (await server.post(url, data=body, headers=json_type)).status == 401
    signature = {"X-Conveyor-Signature": _signed(body, PING_SECRET, int(time.time()))}
    resp = await server.post(url, data=body, headers=json_type | signature)
    assert resp.status == 200, await resp.text()
    assert await resp.json() == {"pong": 1}
    assert (await server.post(url, data=body, headers=json_type | signature)).status == 409
    literal = EXAMPLES["signed-webhook"].document.replace('"{{secrets.PING_SECRET}}"', "hunter2")
    literal = literal.replace("signed-ping", "signed-literal")
    resp = await server.post(
        "/api/v1/flows", data=literal.encode(), headers={"Content-Type": "application/yaml"}
    )
    assert resp.status == 422 and "trigger.secret" in await resp.text()


def test_every_example_is_checked() -> None:
    """No marked example escapes the checks above (a new one must be added to them)."""
    checked = {"transform", "code", "branch", "loop", "delay", "respond", "manual", "failed-run"}
    checked |= {"schedule", "http", "retry", "signed-webhook"}
    assert set(EXAMPLES) == checked
