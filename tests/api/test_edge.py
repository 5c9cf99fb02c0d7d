"""The HTTP edge of webhook ingest made cheaper without changing what it answers: the one
middleware (timing, JSON errors, API key), cached header rules, block-drawn UUIDv7 ids, the
shared flow-head lookup, the 202 built from a template."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from conveyor import ids, metrics
from conveyor.api import payloads, webhooks
from conveyor.api.timing import api_middleware
from conveyor.engine.registry import FlowRegistry
from conveyor.queue.errors import QueueFull
from conveyor.store import flows as flow_store
from conveyor.store.db import Database

FLOW = {
    "name": "edge",
    "trigger": {"type": "webhook"},
    "steps": [{"name": "t", "type": "transform", "input": {"b": "{{trigger.body}}"}}],
}


async def _flow(client: TestClient[Any, Any]) -> str:
    resp = await client.post("/api/v1/flows", json=FLOW)
    assert resp.status == 201, await resp.text()
    return str((await resp.json())["id"])


def _count(route: str, method: str, status: int) -> float:
    metrics.fold()  # the tallied counts into the metric objects (a scrape does the same)
    value = metrics.HTTP_TOTAL.labels(route, method, str(status))._value.get()
    return float(value)


# --------------------------------------------------------------------------- the middleware
async def test_one_middleware_times_answers_and_guards(make_client: Any) -> None:
    """With AP_API_KEY: /api/v1 needs it (401 JSON + WWW-Authenticate), webhooks do not,
    404/405 are JSON; every answer is counted by route template with its final status."""
    client = await make_client(AP_CONTAINER_TYPE="APP", AP_API_KEY="k" * 32)
    auth = {"Authorization": "Bearer " + "k" * 32}
    before = _count("/api/v1/flows", "GET", 401)
    resp = await client.get("/api/v1/flows")
    assert resp.status == 401 and resp.headers["WWW-Authenticate"] == "Bearer"
    assert (await resp.json())["error"]["code"] == "UNAUTHORIZED"
    assert _count("/api/v1/flows", "GET", 401) == before + 1
    wrong = await client.get("/api/v1/flows", headers={"Authorization": "Bearer nope"})
    assert wrong.status == 401
    resp = await client.post("/api/v1/flows", json=FLOW, headers=auth)
    assert resp.status == 201
    fid = (await resp.json())["id"]
    hook = "/api/v1/webhooks/{flow_id}"
    before = _count(hook, "POST", 202)
    resp = await client.post(f"/api/v1/webhooks/{fid}", json={"a": 1})  # no key: exempt
    assert resp.status == 202 and _count(hook, "POST", 202) == before + 1
    before = _count("<unmatched>", "GET", 404)
    resp = await client.get("/nowhere", headers=auth)
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "NOT_FOUND"
    assert _count("<unmatched>", "GET", 404) == before + 1
    resp = await client.delete("/api/v1/flows", headers=auth)
    assert resp.status == 405 and (await resp.json())["error"]["code"] == "METHOD_NOT_ALLOWED"
    assert "POST" in resp.headers["Allow"]
    # Probes stay open and out of the API window.
    assert (await client.get("/healthz")).status == 200


async def test_webhook_rejections_are_counted_by_reason(client: TestClient[Any, Any]) -> None:
    """A 404 of a webhook counts in the rejections, as the timing middleware did."""
    rejected = metrics.WEBHOOKS_REJECTED.labels("flow_not_found")
    before = rejected._value.get()
    resp = await client.post("/api/v1/webhooks/not-a-uuid", json={})
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "FLOW_NOT_FOUND"
    resp = await client.post(f"/api/v1/webhooks/{uuid.uuid4()}", json={})
    assert resp.status == 404
    assert rejected._value.get() == before + 2


# --------------------------------------------------------------------------- the 202
async def test_async_202_is_what_orjson_would_write(client: TestClient[Any, Any]) -> None:
    """The templated body is byte for byte the JSON of {run_id, status}; x-run-id matches."""
    fid = await _flow(client)
    upper = fid.upper()  # the same flow, another spelling of its id
    for path in (f"/api/v1/webhooks/{fid}", f"/api/v1/webhooks/{upper}/"):
        resp = await client.post(path, json={"n": 1})
        assert resp.status == 202
        raw = await resp.read()
        run_id = resp.headers["x-run-id"]
        assert raw == orjson.dumps({"run_id": run_id, "status": "QUEUED"})
        assert resp.content_type == "application/json"
        assert uuid.UUID(run_id).version == 7


def test_flow_id_cache_stays_bounded() -> None:
    webhooks._FLOW_IDS.clear()

    class Req:
        def __init__(self, raw: str) -> None:
            self.match_info = {"flow_id": raw}

    for _ in range(webhooks._FLOW_IDS_MAX + 10):
        raw = str(uuid.uuid4())
        assert webhooks._flow_id(Req(raw)) == uuid.UUID(raw)  # type: ignore[arg-type]
    assert len(webhooks._FLOW_IDS) <= webhooks._FLOW_IDS_MAX
    with pytest.raises(webhooks.ApiError) as caught:
        webhooks._flow_id(Req("nope"))  # type: ignore[arg-type]
    assert caught.value.status == 404 and "nope" not in webhooks._FLOW_IDS


# --------------------------------------------------------------------------- headers
def test_cached_header_rule_redacts_the_same() -> None:
    """Cached or not, the same names are redacted; values become valid text."""
    items = [
        ("Authorization", "Bearer x"),
        ("X-Auth-Token", "t"),
        ("x_api_key", "k"),
        ("Content-Type", "application/json"),
        ("X-Caf\udce9", "caf\udce9"),  # undecodable bytes in name and value
        ("X-Plain", "ok"),
    ]
    for _ in range(3):  # first call fills the cache, later ones read it
        out = payloads.headers(items)
        assert out == {
            "authorization": "***",
            "x-auth-token": "***",
            "x_api_key": "***",
            "content-type": "application/json",
            "x-caf\ufffd": "caf\ufffd",
            "x-plain": "ok",
        }
        orjson.dumps(out)
    assert payloads.query([("API_KEY", "k"), ("page", "2"), ("page", "3")]) == {
        "API_KEY": "***",
        "page": "2",
    }
    assert payloads.is_sensitive_name("X-Webhook-Secret")
    assert not payloads.is_sensitive_name("X-Request-Id")


def test_header_name_cache_is_bounded() -> None:
    """A sender inventing header names cannot grow the cache without bound."""
    for i in range(payloads._NAMES_MAX + 100):
        name = f"X-Made-Up-{i}" if i % 2 else f"X-Secret-{i}"
        assert payloads.headers([(name, "v")]) == {name.lower(): "***" if i % 2 == 0 else "v"}
    assert len(payloads._NAMES) <= payloads._NAMES_MAX


# --------------------------------------------------------------------------- ids
def test_uuid7_fields_order_and_uniqueness() -> None:
    made = [ids.uuid7() for _ in range(5 * ids._BLOCK + 3)]  # crosses random blocks
    assert len(set(made)) == len(made)
    now_ms = time.time_ns() // 1_000_000
    for u in made:
        assert u.version == 7 and u.variant == uuid.RFC_4122
        again = uuid.UUID(str(u))
        assert again == u and hash(again) == hash(u) and again.int == u.int
        assert abs(ids.uuid7_time_ms(u) - now_ms) < 5_000
    stamps = [ids.uuid7_time_ms(u) for u in made]
    assert stamps == sorted(stamps)
    assert len({(u.int >> 64) & 0xFFF for u in made}) > 100  # rand_a varies
    assert orjson.dumps(made[0]) == b'"' + str(made[0]).encode() + b'"'


def test_uuid7_forked_child_draws_its_own_random() -> None:
    ids.uuid7()  # a block is drawn in the parent
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.write(write, str(ids.uuid7()).encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    os.close(read)
    os.close(write)
    mine = str(ids.uuid7())
    assert child[15:] != mine[15:]  # the random parts differ (not the same block position)


# --------------------------------------------------------------------------- flow heads
async def test_concurrent_head_lookups_share_one_query(
    db: Database, client: TestClient[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the cached head expires under load, one query answers every waiting request."""
    fid = uuid.UUID(await _flow(client))
    calls = 0
    real = flow_store.ingest_info

    async def counted(db_: Database, flow_id: uuid.UUID) -> Any:
        nonlocal calls
        calls += 1
        return await real(db_, flow_id)

    monkeypatch.setattr(flow_store, "ingest_info", counted)
    registry = FlowRegistry(db, head_ttl_s=60)
    heads = await asyncio.gather(*(registry.head(fid) for _ in range(50)))
    assert calls == 1 and all(h is heads[0] and h is not None and h.enabled for h in heads)
    assert await registry.head(fid) is heads[0] and calls == 1  # cached
    registry.invalidate(fid)
    assert (await registry.head(fid)) is not None and calls == 2
    missing = await asyncio.gather(*(registry.head(uuid.uuid4()) for _ in range(3)))
    assert missing == [None, None, None]


async def test_invalidate_during_a_lookup_is_not_undone(
    db: Database, client: TestClient[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lookup that started before this process changed the flow neither answers callers
    arriving after the change nor caches what it read."""
    fid = uuid.UUID(await _flow(client))
    gate = asyncio.Event()
    real = flow_store.ingest_info
    answers = iter([(True, 1), None])

    async def slow(db_: Database, flow_id: uuid.UUID) -> Any:
        await real(db_, flow_id)
        answer = next(answers)
        if answer is not None:
            await gate.wait()  # the first lookup reads "enabled, v1", then stalls
        return answer  # the second reads the flow gone

    monkeypatch.setattr(flow_store, "ingest_info", slow)
    registry = FlowRegistry(db, head_ttl_s=60)
    early = asyncio.ensure_future(registry.head(fid))
    await asyncio.sleep(0.05)
    registry.invalidate(fid)
    assert await registry.head(fid) is None  # a new lookup, not the stale one
    gate.set()
    assert (await early) is not None  # its own caller gets what it read
    assert await registry.head(fid) is None  # but the cache keeps the newer answer


async def test_a_caller_going_away_does_not_cancel_the_shared_lookup(
    db: Database, client: TestClient[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    fid = uuid.UUID(await _flow(client))
    gate = asyncio.Event()
    real = flow_store.ingest_info

    async def slow(db_: Database, flow_id: uuid.UUID) -> Any:
        await gate.wait()
        return await real(db_, flow_id)

    monkeypatch.setattr(flow_store, "ingest_info", slow)
    registry = FlowRegistry(db, head_ttl_s=60)
    first = asyncio.ensure_future(registry.head(fid))
    second = asyncio.ensure_future(registry.head(fid))
    await asyncio.sleep(0.01)
    first.cancel()
    gate.set()
    head = await second
    assert head is not None and head.flow_id == fid
    with pytest.raises(asyncio.CancelledError):
        await first


# --------------------------------------------------------------------------- the body
async def test_body_read_whole_or_streamed_and_limits_hold(make_client: Any, db: Database) -> None:
    """A body that came with the head is taken from the buffer; one that inflates (gzip) past
    AP_MAX_WEBHOOK_PAYLOAD_SIZE_MB is still a 413; within it, the run keeps the inflated body."""
    import gzip  # noqa: PLC0415

    from conveyor.store import runs as run_store  # noqa: PLC0415

    client = await make_client(AP_CONTAINER_TYPE="APP", AP_MAX_WEBHOOK_PAYLOAD_SIZE_MB="1")
    fid = await _flow(client)
    small = orjson.dumps({"n": 1, "text": "x" * 1000})
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    resp = await client.post(f"/api/v1/webhooks/{fid}", data=gzip.compress(small), headers=headers)
    assert resp.status == 202, await resp.text()
    row = await run_store.get_run(db, uuid.UUID(resp.headers["x-run-id"]))
    assert row["trigger"]["body"] == orjson.loads(small)
    bomb = gzip.compress(b'{"a":"' + b"0" * (2 * 1024 * 1024) + b'"}')
    resp = await client.post(f"/api/v1/webhooks/{fid}", data=bomb, headers=headers)
    assert resp.status == 413
    assert (await resp.json())["error"]["code"] == "PAYLOAD_TOO_LARGE"
    exact = b'"' + b"y" * (1024 * 1024 - 2) + b'"'  # exactly the limit: accepted
    resp = await client.post(
        f"/api/v1/webhooks/{fid}", data=exact, headers={"Content-Type": "application/json"}
    )
    assert resp.status == 202
    row = await run_store.get_run(db, uuid.UUID(resp.headers["x-run-id"]))
    assert row["trigger"]["body"] == "y" * (1024 * 1024 - 2)


# --------------------------------------------------------------------------- middleware alone
@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (RuntimeError("secret detail"), 500, "INTERNAL_ERROR"),
        (web.HTTPNotFound(), 404, "NOT_FOUND"),
        (web.HTTPRequestEntityTooLarge(max_size=1, actual_size=2), 413, "PAYLOAD_TOO_LARGE"),
        (QueueFull("runs", 10), 429, "QUEUE_FULL"),
        (web.HTTPFound("/elsewhere"), 302, None),
        (None, 200, None),
    ],
)
async def test_api_middleware_maps_errors_and_records_the_final_status(
    exc: BaseException | None, status: int, code: str | None
) -> None:
    """The one middleware answers as the error middleware did and counts what was sent."""

    async def handler(request: web.Request) -> web.StreamResponse:
        if exc is not None:
            raise exc
        return web.json_response({"ok": True})

    app = web.Application(middlewares=[api_middleware(None)])
    app.router.add_get("/api/v1/thing/{x}", handler)
    before = _count("/api/v1/thing/{x}", "GET", status)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        resp = await client.get("/api/v1/thing/1", allow_redirects=False)
        assert resp.status == status
        if code is not None:
            body = await resp.json()
            assert body["error"]["code"] == code
            assert "secret detail" not in body["error"]["message"]
        if status == 429:
            assert resp.headers["Retry-After"]
    assert _count("/api/v1/thing/{x}", "GET", status) == before + 1


async def test_api_middleware_with_a_key_guards_only_the_api() -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.json_response({"ok": True})

    app = web.Application(middlewares=[api_middleware("s3cret")])
    for path in ("/api/v1/flows", "/api/v1/webhooks/x", "/healthz", "/api/v2/x"):
        app.router.add_get(path, handler)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        assert (await client.get("/api/v1/flows")).status == 401
        bad = {"Authorization": "Bearer s3cre"}
        assert (await client.get("/api/v1/flows", headers=bad)).status == 401
        good = {"Authorization": "Bearer s3cret"}
        assert (await client.get("/api/v1/flows", headers=good)).status == 200
        assert (await client.get("/api/v1/webhooks/x")).status == 200
        assert (await client.get("/healthz")).status == 200
        assert (await client.get("/api/v2/x")).status == 200


async def test_started_process_has_its_start_up_heap_frozen(client: TestClient[Any, Any]) -> None:
    """Once up, an API-only process too has its start-up heap out of the collector's sight
    and gen0 runs less often; tuning again changes nothing."""
    import gc  # noqa: PLC0415

    from conveyor.engine import worker  # noqa: PLC0415

    assert gc.get_threshold()[0] >= worker.GC_GEN0_THRESHOLD
    frozen = gc.get_freeze_count()
    assert frozen > 0
    worker.tune_gc()
    assert gc.get_freeze_count() == frozen
    assert (await client.get("/healthz")).status == 200


async def test_json_declared_by_any_spelling_of_the_media_type(
    client: TestClient[Any, Any], db: Database
) -> None:
    """JSON bodies are parsed when the media type says json (cached per header value);
    other types, parameters mentioning json, and no type keep the text."""
    from conveyor.store import runs as run_store  # noqa: PLC0415

    fid = await _flow(client)
    cases = [
        ("application/json", {"a": 1}),
        ("Application/JSON; charset=utf-8", {"a": 1}),
        ("application/vnd.api+json", {"a": 1}),
        ("text/plain; profile=json", '{"a":1}'),
        (None, '{"a":1}'),
    ]
    for _ in range(2):  # the second round reads the cache
        for ctype, expected in cases:
            headers = {"Content-Type": ctype} if ctype else {}
            resp = await client.post(f"/api/v1/webhooks/{fid}", data=b'{"a":1}', headers=headers)
            assert resp.status == 202, ctype
            row = await run_store.get_run(db, uuid.UUID(resp.headers["x-run-id"]))
            assert row["trigger"]["body"] == expected, ctype


async def test_an_undecodable_authorization_header_is_a_401_not_a_500(make_client: Any) -> None:
    """Bytes that are not UTF-8 in Authorization (aiohttp keeps them as lone surrogates) are a
    wrong key: 401 JSON, never an encoding error answered 500."""
    client = await make_client(AP_CONTAINER_TYPE="APP", AP_API_KEY="k" * 32)
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    try:
        writer.write(
            b"GET /api/v1/flows HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Authorization: Bearer \xff\xfe\r\nConnection: close\r\n\r\n"
        )
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401"), head
    assert orjson.loads(body)["error"]["code"] == "UNAUTHORIZED"
