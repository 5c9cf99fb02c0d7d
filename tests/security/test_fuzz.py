"""Issue 10: property-based fuzzing of what callers control — never a 5xx, never a hang.

Hypothesis generates flow documents (flow-shaped and arbitrary, as JSON and YAML text),
templates, and webhook bodies, headers, query strings and signatures, and sends them to a
real app on a loopback port backed by the test Redis and PostgreSQL. Every answer must be
below 500 and arrive within :data:`REQUEST_TIMEOUT_S`. The engine-level properties (parse,
compile, render) run without a server and so afford more examples. Bounded (``max_examples``
per property, no deadline) so the module stays within a couple of minutes in CI.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import os
import time
from typing import Any
from urllib.parse import quote

import orjson
import pytest
import yaml
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conveyor.engine.context import Services
from conveyor.engine.errors import FlowInvalid
from conveyor.engine.executor import Executor
from conveyor.engine.flow import STEP_TYPES, load_document, parse_flow
from conveyor.engine.templating import TemplateError, TemplateSyntaxError, compile_value
from conveyor.status import RunStatus
from tests.api.conftest import make_client
from tests.engine.support import MemorySink, make_ctx

__all__ = ["make_client"]

Client = TestClient[Any, Any]
REQUEST_TIMEOUT_S = 15.0
#: CI explores the same inputs every run (a red CI run is then a regression, not luck);
#: local runs keep exploring new ones.
DERANDOMIZE = bool(os.environ.get("CONVEYOR_CI"))
SERVER = settings(
    max_examples=120,
    deadline=None,
    database=None,
    derandomize=DERANDOMIZE,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
ENGINE = settings(
    max_examples=200,
    deadline=None,
    database=None,
    derandomize=DERANDOMIZE,
    suppress_health_check=[HealthCheck.too_slow],
)

# --- strategies ---------------------------------------------------------------------------

text = st.text(max_size=40)
nasty_text = st.one_of(
    text,
    st.sampled_from(["\x00", "\ud800", "\n", "{{", "}}", "{{ }}", "$", "\u202e", "\ufeff"]),
)
paths = st.one_of(
    st.from_regex(r"[a-z_]{1,8}(\.[a-z0-9_-]{1,6}|\[-?[0-9]{1,3}\]){0,4}", fullmatch=True),
    st.sampled_from(["trigger.body", "secrets.X", "loop.item", "run.id", "a.__class__"]),
    text,
)
templates = st.one_of(
    paths.map(lambda p: "{{" + p + "}}"),
    st.tuples(text, paths, text).map(lambda t: f"{t[0]}{{{{{t[1]}}}}}{t[2]}"),
    nasty_text,
)
json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), templates
)
json_values = st.recursive(
    json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(nasty_text, inner, max_size=4)
    ),
    max_leaves=20,
)


@st.composite
def steps(draw: st.DrawFn, depth: int = 0) -> dict[str, Any]:
    """A step that is usually almost valid: the interesting failures are near the shape."""
    typ = draw(st.sampled_from([*STEP_TYPES, "bogus"]))
    step: dict[str, Any] = {
        "name": draw(st.one_of(st.from_regex(r"[a-z]{1,6}", fullmatch=True), nasty_text)),
        "type": typ,
    }
    if draw(st.booleans()):
        step["input"] = draw(st.one_of(st.dictionaries(text, json_values, max_size=4), json_values))
    if typ == "code":
        step["code"] = draw(
            st.one_of(st.just("def run(input):\n    return input\n"), text, st.just("(" * 500))
        )
    if typ == "branch":
        step["when"] = draw(
            st.one_of(
                json_values,
                st.fixed_dictionaries(
                    {
                        "all": st.lists(
                            st.fixed_dictionaries(
                                {
                                    "left": templates,
                                    "op": st.sampled_from(["eq", "matches", "gt", "x"]),
                                    "right": json_values,
                                }
                            ),
                            max_size=2,
                        )
                    }
                ),
            )
        )
        if depth < 2:
            step["then"] = draw(st.lists(steps(depth + 1), max_size=2))
    if typ == "loop":
        step["items"] = draw(st.one_of(templates, st.lists(json_leaf, max_size=3)))
        if depth < 2:
            step["steps"] = draw(st.lists(steps(depth + 1), max_size=2))
    for key in ("retry", "timeout_s", "continue_on_failure"):
        if draw(st.integers(0, 5)) == 0:
            step[key] = draw(json_values)
    return step


flow_docs = st.one_of(
    st.fixed_dictionaries(
        {
            "name": nasty_text,
            "trigger": st.one_of(
                st.fixed_dictionaries(
                    {"type": st.sampled_from(["webhook", "schedule", "manual", "x"])},
                    optional={
                        "secret": templates,
                        "cron": st.sampled_from(["* * * * *", "61 * * * *", "x"]),
                        "timezone": st.sampled_from(["UTC", "Mars/Base", "../../etc"]),
                    },
                ),
                json_values,
            ),
            "steps": st.one_of(st.lists(steps(), max_size=4), json_values),
        }
    ),
    json_values,
)


def _dump(doc: Any, as_yaml: bool) -> bytes:
    if as_yaml:
        try:
            return yaml.safe_dump(doc, allow_unicode=True).encode("utf-8", "surrogatepass")
        except yaml.YAMLError:
            return b"x: ["
    return orjson.dumps(doc, option=orjson.OPT_NON_STR_KEYS) if _encodable(doc) else b"{"


def _json_bytes(value: Any) -> bytes:
    return orjson.dumps(value) if _encodable(value) else b"["


def _encodable(doc: Any) -> bool:
    try:
        orjson.dumps(doc, option=orjson.OPT_NON_STR_KEYS)
    except orjson.JSONEncodeError:
        return False
    return True


async def _call(
    client: Client, method: str, path: str, *, json_errors: bool = True, **kw: Any
) -> int:
    """One request that must answer below 500 within the timeout (JSON errors on the API)."""
    async with asyncio.timeout(REQUEST_TIMEOUT_S):
        resp = await client.request(method, path, **kw)
        body = await resp.read()
    assert resp.status < 500, (resp.status, body[:500])
    if resp.status >= 400 and json_errors:
        error = orjson.loads(body)["error"]
        assert error["code"] and error["message"]
    return resp.status


# --- engine properties -------------------------------------------------------------------


@ENGINE
@given(doc=flow_docs)
def test_parse_flow_only_raises_flow_invalid(doc: Any) -> None:
    """Any document either compiles or raises FlowInvalid — nothing else."""
    try:
        parse_flow(doc)
    except FlowInvalid as exc:
        assert exc.details and all("path" in d and "message" in d for d in exc.details)


@ENGINE
@given(
    raw=st.one_of(st.binary(max_size=300), text.map(str.encode)),
    ctype=st.sampled_from([None, "application/json", "application/yaml", "text/plain"]),
)
def test_load_document_only_raises_flow_invalid(raw: bytes, ctype: str | None) -> None:
    """Arbitrary bytes as a flow document decode or raise FlowInvalid."""
    with contextlib.suppress(FlowInvalid):
        load_document(raw, ctype)


SCOPE = {
    "trigger": {
        "method": "POST",
        "headers": {"a-b": "1"},
        "query": {},
        "body": {"x": [1, {"y": None}]},
    },
    "run": {"id": "r", "flow_id": "f", "version": 1},
    "secrets": {"X": "s"},
    "a": {"b": [1, 2, 3]},
}


@ENGINE
@given(value=json_values)
def test_templates_compile_and_render_or_fail_cleanly(value: Any) -> None:
    """Templates raise only their own syntax/resolution errors, never anything else."""
    try:
        renderer = compile_value(value)
    except TemplateSyntaxError:
        return
    with contextlib.suppress(TemplateError):
        renderer.render(SCOPE)


# --- server properties -------------------------------------------------------------------

HOOK = {
    "name": "fuzz-hook",
    "trigger": {"type": "webhook"},
    "steps": [{"name": "t", "type": "transform", "input": {"b": "{{trigger.body}}"}}],
}
SIGNED = {**HOOK, "name": "fuzz-signed", "trigger": {"type": "webhook", "secret": "{{secrets.K}}"}}
_FRAMING = {"content-length", "transfer-encoding", "host", "connection", "expect"}
header_names = st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,20}", fullmatch=True).filter(
    lambda n: (
        n.lower() not in {"content-length", "transfer-encoding", "host", "connection", "expect"}
    )
)
header_values = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, blacklist_characters="\x7f"),
    max_size=60,
)


#: Flow ids of the current fuzz app, by flow name.
FLOW_IDS: dict[str, str] = {}


@pytest.fixture
async def fuzz_client(make_client: Any) -> Client:
    """An APP-role app (webhooks are recorded, not run) with a plain and a signed flow."""
    client: Client = await make_client(AP_CONTAINER_TYPE="APP", AP_WEBHOOK_TIMEOUT_SECONDS="1")
    await client.put("/api/v1/secrets/K", json={"value": "fuzz-secret"})
    for doc in (HOOK, SIGNED):
        resp = await client.post("/api/v1/flows", json=doc)
        assert resp.status == 201
        FLOW_IDS[doc["name"]] = (await resp.json())["id"]
    return client


@SERVER
@given(
    doc=flow_docs,
    as_yaml=st.booleans(),
    ctype=st.sampled_from(["application/json", "application/yaml", "text/plain", None]),
)
async def test_flow_documents_never_5xx(
    fuzz_client: Client, doc: Any, as_yaml: bool, ctype: str | None
) -> None:
    """POST and PUT of generated flow documents answer 2xx or a JSON 4xx."""
    body = _dump(doc, as_yaml)
    headers = {"Content-Type": ctype} if ctype else {}
    status = await _call(fuzz_client, "POST", "/api/v1/flows", data=body, headers=headers)
    if status == 201:
        assert isinstance(doc, dict)
    fid = FLOW_IDS["fuzz-hook"]
    await _call(fuzz_client, "PUT", f"/api/v1/flows/{fid}", data=body, headers=headers)


query_text = nasty_text.filter(lambda s: "\ud800" not in s)
CTYPES = [
    "application/json",
    "text/plain",
    "application/x-www-form-urlencoded",
    "application/json; charset=latin-1",
    "",
]


@SERVER
@given(
    body=st.one_of(st.binary(max_size=400), json_values.map(_json_bytes)),
    ctype=st.sampled_from(CTYPES),
    headers=st.dictionaries(header_names, header_values, max_size=5),
    query=st.dictionaries(query_text, query_text, max_size=4),
    method=st.sampled_from(["POST", "PUT", "GET", "DELETE", "PATCH"]),
    signed=st.sampled_from(["no", "valid", "random"]),
)
async def test_webhooks_never_5xx(  # noqa: PLR0917 - one parameter per strategy
    fuzz_client: Client,
    body: bytes,
    ctype: str,
    headers: dict[str, str],
    query: dict[str, str],
    method: str,
    signed: str,
) -> None:
    """Generated webhook bodies, headers, query strings and signatures: never a 5xx."""
    fid = FLOW_IDS["fuzz-hook" if signed == "no" else "fuzz-signed"]
    sent = {**headers, "Content-Type": ctype} if ctype else headers
    if signed == "valid":
        t = str(int(time.time()))
        mac = hmac.new(b"fuzz-secret", t.encode() + b"." + body, hashlib.sha256).hexdigest()
        sent = {**sent, "X-Conveyor-Signature": f"t={t},v1={mac}"}
    await _call(
        fuzz_client, method, f"/api/v1/webhooks/{fid}", data=body, headers=sent, params=query
    )


RAW_NAMES = [
    b"Idempotency-Key",
    b"X-Conveyor-Signature",
    b"Authorization",
    b"X-Any",
    b"Content-Type",
]


@SERVER
@given(
    raw_header=st.binary(min_size=1, max_size=40).filter(
        lambda b: b"\r" not in b and b"\n" not in b
    ),
    raw_path=st.binary(max_size=30).filter(lambda b: not any(c in b for c in b" \r\n#?")),
    name=st.sampled_from(RAW_NAMES),
)
async def test_raw_header_and_path_bytes_never_5xx(
    fuzz_client: Client, raw_header: bytes, raw_path: bytes, name: bytes
) -> None:
    """Raw non-UTF-8 bytes in headers and paths (sent on a socket) never get a 5xx."""
    fid = FLOW_IDS["fuzz-signed"].encode()
    for path in (
        b"/api/v1/webhooks/" + fid,
        b"/api/v1/webhooks/" + raw_path,
        b"/api/v1/flows?name=" + raw_path,
    ):
        request = b"\r\n".join(
            [
                b"POST " + path + b" HTTP/1.1",
                b"Host: 127.0.0.1",
                name + b": " + raw_header,
                b"Content-Length: 2",
                b"Connection: close",
                b"",
                b"{}",
            ]
        )
        async with asyncio.timeout(REQUEST_TIMEOUT_S):
            reader, writer = await asyncio.open_connection(fuzz_client.host, fuzz_client.port)
            try:
                writer.write(request)
                head = await reader.read(64)
            finally:
                writer.close()
        assert head.startswith(b"HTTP/1."), head
        assert int(head.split(b" ")[1]) < 500, (path, name, raw_header, head)


# --- every other route a caller can reach ---------------------------------------------------

segments = st.one_of(
    st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=30),
    st.uuids().map(str),
    st.sampled_from(["runs", "sync", "..", "%2e%2e", "%00", "00000000-0000-7000-8000-0000000000"]),
)
QUERY_ROUTES = [
    "/api/v1/flows",
    "/api/v1/flow-runs",
    "/api/v1/queues",
    "/api/v1/queues/runs",
    "/api/v1/queues/runs/jobs",
    "/api/v1/workers",
    "/api/v1/scaling",
    "/admin/queues/runs",
    "/admin/runs",
    "/admin/flows",
    "/admin/api/runs",
    "/admin/api/queues/sync",
]
PATH_ROUTES = [
    ("GET", "/api/v1/flows/{}"),
    ("GET", "/api/v1/flow-runs/{}"),
    ("POST", "/api/v1/flow-runs/{}/retry"),
    ("POST", "/api/v1/flow-runs/{}/cancel"),
    ("GET", "/api/v1/queues/{}/jobs"),
    ("DELETE", "/api/v1/queues/runs/jobs/{}"),
    ("PUT", "/api/v1/secrets/{}"),
    ("POST", "/api/v1/queues/{}/clean"),
    ("POST", "/api/v1/flows/{}/run"),
    ("GET", "/admin/runs/{}"),
    ("GET", "/admin/queues/{}"),
    ("GET", "/admin/api/runs/{}"),
]
params = st.dictionaries(
    st.sampled_from(["limit", "cursor", "status", "flow_id", "state", "name", "include_lost", "x"]),
    query_text,
    max_size=4,
)


@SERVER
@given(route=st.sampled_from(QUERY_ROUTES), query=params)
async def test_query_strings_never_5xx(
    fuzz_client: Client, route: str, query: dict[str, str]
) -> None:
    """Listing routes of the API and the board with generated query strings: never a 5xx."""
    await _call(fuzz_client, "GET", route, params=query, json_errors=route.startswith("/api/"))


@SERVER
@given(route=st.sampled_from(PATH_ROUTES), segment=segments, body=st.one_of(
    json_values.map(_json_bytes), st.binary(max_size=100),
    st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n)))  # fmt: skip
async def test_path_segments_and_bodies_never_5xx(
    fuzz_client: Client, route: tuple[str, str], segment: str, body: bytes
) -> None:
    """Detail and action routes with generated ids and bodies (manual runs, secrets): no 5xx."""
    method, template = route
    if "{}/run" in template and segment.startswith("0"):
        segment = FLOW_IDS["fuzz-hook"]
    elif "queues/{}/clean" in template and segment.startswith("0"):
        segment = "runs"
    path = template.format(quote(segment, safe=""))
    await _call(
        fuzz_client,
        method,
        path,
        data=body,
        headers={"Content-Type": "application/json"},
        json_errors=path.startswith("/api/"),
    )


# --- templates at run time --------------------------------------------------------------------

body_paths = st.from_regex(
    r"trigger\.(body|query|headers)(\.[a-z]{1,3}|\[-?[0-9]\]){0,3}", fullmatch=True
)
run_templates = st.one_of(
    body_paths.map(lambda p: "{{" + p + "}}"),
    st.tuples(text, body_paths).map(lambda t: f"{t[0]} {{{{{t[1]}}}}}"),
    json_leaf,
)
run_inputs = st.dictionaries(
    st.from_regex(r"[a-z]{1,4}", fullmatch=True),
    st.recursive(run_templates, lambda i: st.lists(i, max_size=3) | st.dictionaries(
        st.from_regex(r"[a-z]{1,3}", fullmatch=True), i, max_size=3), max_leaves=8),
    max_size=4,
)  # fmt: skip


@st.composite
def runnable_flows(draw: st.DrawFn) -> dict[str, Any]:
    """Valid flows of transform, branch, loop and respond steps over the trigger's data."""
    steps: list[dict[str, Any]] = []
    for i in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["transform", "branch", "loop", "respond"]))
        name = f"s{i}"
        if kind == "transform":
            steps.append({"name": name, "type": kind, "input": draw(run_inputs)})
        elif kind == "respond":
            steps.append({"name": name, "type": kind, "input": {"body": draw(run_templates)}})
        elif kind == "branch":
            op = draw(st.sampled_from(["eq", "gt", "contains", "matches", "exists", "is_true"]))
            cond: dict[str, Any] = {"left": draw(run_templates), "op": op}
            if op not in ("exists", "is_true"):
                cond["right"] = draw(run_templates)
            steps.append({"name": name, "type": kind, "when": {"any": [cond]},
                          "then": [{"name": f"{name}t", "type": "transform",
                                    "input": draw(run_inputs)}]})  # fmt: skip
        else:
            steps.append({"name": name, "type": kind, "items": draw(st.sampled_from(
                ["{{trigger.body}}", "{{trigger.body.a}}", "{{trigger.query}}"])),
                "steps": [{"name": f"{name}i", "type": "transform",
                           "input": {"v": "{{loop.item}}", "n": "{{loop.index}}"}}]})  # fmt: skip
    return {"name": "run-fuzz", "trigger": {"type": "webhook"}, "steps": steps}


@ENGINE
@given(
    doc=runnable_flows(),
    body=json_values.filter(_encodable),  # as ingest stores it: valid UTF-8 JSON
    query=st.dictionaries(query_text, query_text, max_size=3),
)
async def test_runs_end_in_a_status_never_an_exception(
    doc: dict[str, Any], body: Any, query: dict[str, str]
) -> None:
    """Any template over any (storable) trigger data ends the run in a status; records are
    storable."""
    try:
        flow = parse_flow(doc)
    except FlowInvalid:
        return
    sink = MemorySink()
    ctx = make_ctx(body)
    ctx.trigger["query"] = query
    async with asyncio.timeout(REQUEST_TIMEOUT_S):
        outcome = await Executor(Services(sink=sink)).run(flow, ctx)
    assert outcome.status in (RunStatus.SUCCEEDED, RunStatus.FAILED), outcome
    if outcome.status is RunStatus.FAILED:
        assert outcome.error is not None and outcome.error["message"]
    orjson.dumps([dict(r) for r in sink.records], default=str)
