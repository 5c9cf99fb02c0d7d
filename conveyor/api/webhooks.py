"""Webhook ingest: a durable run for every accepted request, answered 202 or synchronously.

Order matters for "a 2xx means durable": the run row is committed to PostgreSQL
(group commit across concurrent webhooks) *before* the job is added to Redis and before the
caller hears 2xx. If Redis is down after the commit, an async webhook still answers 202 — the
reconciler enqueues the run from PostgreSQL later; a sync webhook cancels its run and answers
503. A full backlog is checked by the queue's enqueue script: the just-inserted row is deleted
again and the caller gets 429 + ``Retry-After: 1`` — refused work, never dropped work.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
import uuid
from typing import Any

import orjson
import structlog
from aiohttp import web
from redis.exceptions import RedisError

from conveyor.api import payloads
from conveyor.api.errors import ApiError, json_response
from conveyor.backoff import Outage
from conveyor.engine.replies import stored_final
from conveyor.engine.submit import OnFull, Submission
from conveyor.ids import uuid7
from conveyor.keys import (
    DB,
    REDIS,
    REGISTRY,
    REPLIES,
    RUN_WRITER,
    SECRET_BOX,
    SETTINGS,
    SUBMITTER,
)
from conveyor.queue import QueueName
from conveyor.queue import keys as queue_keys
from conveyor.status import TERMINAL, RunStatus
from conveyor.store import runs as run_store
from conveyor.store.db import CONNECTION_ERRORS
from conveyor.store.secrets import load_secrets

log = structlog.get_logger(__name__)
#: Redis as seen by async ingest (the run is already committed when enqueueing fails).
_INGEST_OUTAGE = Outage("redis", "ingest")

#: Triggers smaller than this travel inside the job, saving the worker a read.
INLINE_TRIGGER_BYTES = 16 * 1024
SIGNATURE_HEADER = "X-Conveyor-Signature"
#: How far a signature's timestamp may be from our clock, either way.
SIGNATURE_TOLERANCE_S = 300
_SIGNATURE_HELP = (
    f"{SIGNATURE_HEADER} must be t=<unix seconds>,v1=<hex HMAC-SHA256 of "
    '"<t>.<raw body>"> (see the README)'
)
_IDEMPOTENCY_KEY = re.compile(r"[\x20-\x7e]{1,255}")
_MARKER = web.RequestKey("signature_marker", bytes)
TERMINAL_VALUES = frozenset(s.value for s in TERMINAL)


def _flow_id(request: web.Request) -> uuid.UUID:
    try:
        return uuid.UUID(request.match_info["flow_id"])
    except ValueError:
        raise ApiError(404, "FLOW_NOT_FOUND", "no such flow") from None


async def read_body(request: web.Request) -> bytes:
    """The raw body, refusing more than ``AP_MAX_WEBHOOK_PAYLOAD_SIZE_MB`` before reading it
    whole (by Content-Length when given, else while streaming a chunked body)."""
    limit = request.app[SETTINGS].max_webhook_payload_bytes
    length = request.content_length
    if length is not None:
        if length > limit:
            raise _too_large(limit)
        # Known and within the limit: one read, no chunk loop (aiohttp stops at the length).
        return await request.read()
    chunks = []
    size = 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "PAYLOAD_TOO_LARGE", f"webhook body exceeds {limit // (1024 * 1024)} MB")


def trigger_payload(request: web.Request, raw: bytes) -> dict[str, Any]:
    """``{method, headers, query, body}``: JSON parsed when declared, valid and storable,
    else text; sensitive headers redacted (:mod:`conveyor.api.payloads`)."""
    body: Any = None
    if raw:
        if "json" in request.content_type:
            body = payloads.json_body(raw)
        else:
            body = raw.decode("utf-8", errors="replace")
    return {
        "method": request.method,
        "headers": payloads.headers(request.headers.items()),
        "query": payloads.query(request.query.items()),
        "body": body,
    }


def _sign(secret: str, timestamp: str, raw: bytes) -> str:
    mac = hmac.new(secret.encode(), timestamp.encode() + b".", hashlib.sha256)
    mac.update(raw)
    return mac.hexdigest()


async def _check_signature(
    request: web.Request, flow_id: uuid.UUID, secret_name: str, raw: bytes
) -> None:
    """``t=<unix>,v1=<hex>`` within the tolerance, seen once; or, when allowed, the legacy
    untimed ``sha256=<hex>``. Replays are refused with 409 (see :func:`_seen_once`)."""
    box = request.app[SECRET_BOX]
    values = await load_secrets(request.app[DB], box, [secret_name])
    secret = values.get(secret_name)
    if secret is None:
        raise ApiError(401, "SIGNATURE_INVALID", f"secret {secret_name!r} is not set")
    given = payloads.text(request.headers.get(SIGNATURE_HEADER, "")).strip()
    if given.startswith("sha256="):
        if not request.app[SETTINGS].webhook_legacy_signatures:
            raise ApiError(
                401,
                "SIGNATURE_INVALID",
                "untimed sha256= signatures are not accepted (AP_WEBHOOK_LEGACY_SIGNATURES); "
                + _SIGNATURE_HELP,
            )
        expected = "sha256=" + hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise ApiError(401, "SIGNATURE_INVALID", _SIGNATURE_HELP)
        return
    fields: dict[str, list[str]] = {}
    for part in given.split(","):
        key, _, value = part.strip().partition("=")
        fields.setdefault(key, []).append(value)
    stamp = (fields.get("t") or [""])[0]
    # isascii(): str.isdigit() also accepts digits such as '²' that int() refuses.
    if not (stamp.isascii() and stamp.isdigit()) or len(stamp) > 12 or not fields.get("v1"):
        raise ApiError(
            401, "SIGNATURE_INVALID", f"{SIGNATURE_HEADER} missing or malformed; " + _SIGNATURE_HELP
        )
    skew = int(stamp) - time.time()
    if abs(skew) > SIGNATURE_TOLERANCE_S:
        raise ApiError(
            401,
            "SIGNATURE_EXPIRED",
            f"signature timestamp is more than {SIGNATURE_TOLERANCE_S} s from the server's "
            "clock: sign each request when it is sent",
        )
    expected = _sign(secret, stamp, raw)
    # Every candidate compared (a sender rotating secrets may send several v1 values).
    ok = [hmac.compare_digest(v.encode(), expected.encode()) for v in fields["v1"]]
    if not any(ok):
        raise ApiError(401, "SIGNATURE_INVALID", _SIGNATURE_HELP)
    await _seen_once(request, expected, ttl_s=int(skew) + SIGNATURE_TOLERANCE_S + 1)


async def _seen_once(request: web.Request, digest: str, ttl_s: int) -> None:
    """Record the signature until it expires; a second request with it is a replay (409).

    The marker is the digest alone, not scoped to the flow: the signature does not cover the
    URL, so a request captured for one flow would otherwise be accepted once more by every
    other flow sharing the secret.

    The marker holds the request's Idempotency-Key: a sender retrying the *same* request
    with the same key gets the idempotent answer instead of a 409. The marker is removed
    again when the request is not accepted (:func:`_forget_signature`), so a sender may
    retry a 429 or 503 with the same signature.
    """
    prefix = request.app[SETTINGS].redis_key_prefix
    key = queue_keys.webhook_signature(digest, prefix)
    idem = request.headers.get("Idempotency-Key", "").encode("utf-8", "surrogateescape")
    client = request.app[REDIS]
    try:
        fresh = await client.set(key, idem, nx=True, ex=max(1, ttl_s))
        if not fresh:
            held = await client.get(key)
            if idem and held == idem:
                return
            raise ApiError(
                409,
                "SIGNATURE_REPLAYED",
                "this signed request was already received; sign every request anew",
            )
    except RedisError:
        raise ApiError(
            503, "UNAVAILABLE", "Redis unavailable, retry later", headers={"Retry-After": "1"}
        ) from None
    request[_MARKER] = key


async def _forget_signature(request: web.Request) -> None:
    key = request.get(_MARKER)
    if key is not None:
        try:
            await request.app[REDIS].delete(key)
        except RedisError:
            log.warning("could not release a webhook signature marker")


def _idempotency_key(request: web.Request) -> str | None:
    header_key = request.headers.get("Idempotency-Key")
    if header_key is None:
        return None
    if not _IDEMPOTENCY_KEY.fullmatch(header_key):
        raise ApiError(
            400, "BAD_REQUEST", "Idempotency-Key must be 1–255 printable ASCII characters"
        )
    return header_key


def _canonical(body: Any) -> bytes:
    # As stored: key order irrelevant, NUL replaced (conveyor.store.runs).
    data = orjson.dumps(body, option=orjson.OPT_SORT_KEYS, default=str)
    return data.replace(b"\\u0000", "\ufffd".encode())


async def _same_request(request: web.Request, run_id: str, trigger: dict[str, Any]) -> None:
    """Refuse (422) an Idempotency-Key reused for a different body."""
    row = await run_store.get_run(request.app[DB], uuid.UUID(run_id))
    first = row.get("trigger") or {}
    if _canonical(first.get("body")) != _canonical(trigger["body"]):
        raise ApiError(
            422,
            "IDEMPOTENCY_KEY_REUSED",
            "this Idempotency-Key was already used for a request with a different body; "
            "use a new key for a new request",
            extra={"run_id": run_id},
        )


def _redis_unavailable(run_id: str) -> ApiError:
    # PostgreSQL outages need nothing here: the error middleware answers 503 + Retry-After: 5.
    return ApiError(
        503,
        "UNAVAILABLE",
        "Redis unavailable, retry later",
        headers={"Retry-After": "1", "x-run-id": run_id},
    )


async def _accept(request: web.Request, *, sync: bool) -> tuple[run_store.NewRun, bool]:
    """Validate the request and build its run; returns the run and whether its trigger is
    small enough to travel inside the job."""
    app = request.app
    flow_id = _flow_id(request)
    head = await app[REGISTRY].head(flow_id)
    if head is None or not head.enabled:
        raise ApiError(404, "FLOW_NOT_FOUND", f"flow {flow_id} not found or disabled")
    raw = await read_body(request)
    header_key = _idempotency_key(request)
    secret_name = head.flow.trigger.secret_name
    if head.flow.trigger.secret is not None and not secret_name:
        # Refused at validation; a stored flow from before must not run unverified.
        raise ApiError(401, "SIGNATURE_INVALID", "the flow's trigger.secret is not a reference")
    if secret_name:
        await _check_signature(request, flow_id, secret_name, raw)
    trigger = trigger_payload(request, raw)
    # Namespaced, so a caller's key can never collide with keys the scheduler (or any other
    # trigger) derives for the same flow.
    key = f"hook:{header_key}" if header_key else None
    queue = QueueName.SYNC if sync else QueueName.RUNS
    new = run_store.NewRun(
        id=uuid7(),
        flow_id=flow_id,
        flow_version=head.version,
        trigger=trigger,
        queue=queue.value,
        idempotency_key=key,
        response_status=None if sync else 202,
    )
    return new, len(raw) <= INLINE_TRIGGER_BYTES


async def _submit(
    request: web.Request, new: run_store.NewRun, inline: bool, reply: str | None = None
) -> tuple[Submission, web.Response | None]:
    """Insert and enqueue through the run submitter (a full backlog deletes the row and
    raises ``QueueFull``: 429). Returns the submission and, for a repeat of an
    Idempotency-Key, the first answer's status (nothing started)."""
    try:
        sub = await request.app[SUBMITTER].submit(
            new, on_full=OnFull.REFUSE, inline_trigger=inline, reply=reply
        )
    except BaseException:
        await _forget_signature(request)  # refused: the same signed request may come again
        raise
    if sub.created:
        return sub, None
    run_id = str(sub.run_id)
    await _same_request(request, run_id, new.trigger)
    early = json_response(
        {"run_id": run_id, "status": sub.status, "idempotent_replay": True},
        status=sub.response_status or 202,
        headers={"x-run-id": run_id},
    )
    return sub, early


async def webhook_async(request: web.Request) -> web.Response:
    new, inline = await _accept(request, sync=False)
    sub, early = await _submit(request, new, inline)
    if early is not None:
        return early
    if sub.outage is not None:
        # The run is committed: the reconciler will enqueue it once Redis is back. Logged
        # once per outage (and counted), not once per webhook of a failover window.
        _INGEST_OUTAGE.failed(sub.outage)
    else:
        _INGEST_OUTAGE.ok()
    run_id = str(sub.run_id)
    return json_response(
        {"run_id": run_id, "status": RunStatus.QUEUED.value},
        status=202,
        headers={"x-run-id": run_id},
    )


async def webhook_sync(request: web.Request) -> web.Response:
    new, inline = await _accept(request, sync=True)
    app = request.app
    hub = app[REPLIES]
    # Registered before the job is enqueued, so the reply cannot arrive before anyone listens.
    run_id = str(new.id)
    waiter = hub.register(run_id)
    try:
        sub, early = await _submit(request, new, inline, reply=hub.channel)
        if early is not None:
            return early
        if sub.outage is not None:
            rid = sub.run_id
            await app[RUN_WRITER].transition(
                run_store.Transition(
                    rid,
                    RunStatus.CANCELED,
                    error={"step": None, "message": "Redis unavailable at ingest"},
                )
            )
            # The caller retries after Retry-After; with the same key it must get a new run.
            await run_store.release_idempotency_key(app[DB], rid)
            await _forget_signature(request)  # and the signature may be sent again
            raise _redis_unavailable(run_id) from sub.outage
        timeout_s = app[SETTINGS].webhook_timeout_seconds
        try:
            # Pub/sub is at most once: a reply lost in a reconnect must not turn a finished
            # run into a 408. PostgreSQL knows (conveyor.engine.replies).
            found = await hub.wait(waiter, timeout_s, lambda: stored_final(app[DB], run_id))
        except CONNECTION_ERRORS:
            raise ApiError(
                503,
                "UNAVAILABLE",
                "the run's outcome cannot be read right now; poll the run",
                headers={"Retry-After": "5", "x-run-id": run_id},
                extra={"run_id": run_id},
            ) from None
        if found is None:
            response = ApiError(
                408,
                "WEBHOOK_TIMEOUT",
                f"flow did not answer within {timeout_s} s; the run goes on",
                headers={"x-run-id": run_id},
                extra={"run_id": run_id},
            ).response()
            await _remember(request, run_id, 408)
            return response
    finally:
        hub.forget(run_id)
    response = sync_response(run_id, found)
    await _remember(request, run_id, response.status)
    return response


async def _remember(request: web.Request, run_id: str, status: int) -> None:
    if request.headers.get("Idempotency-Key"):
        await run_store.set_response_status(request.app[DB], uuid.UUID(run_id), status)


#: Headers a flow may not set: they frame the HTTP message, which is the server's job.
_FRAMING = frozenset(
    {
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "upgrade",
        "te",
        "trailer",
        "x-run-id",
    }
)


def respond_headers(raw: Any) -> tuple[dict[str, str], str | None]:
    """A respond step's headers made safe: framing headers dropped, CR/LF refused (a header
    injection), Content-Type split out (aiohttp sets it from ``content_type``)."""
    headers: dict[str, str] = {}
    content_type = None
    for key, value in (raw or {}).items() if isinstance(raw, dict) else ():
        name, text = str(key), str(value)
        if any(c in name + text for c in "\r\n\x00") or not name.strip():
            continue
        if name.lower() == "content-type":
            content_type = text
        elif name.lower() not in _FRAMING:
            headers[name] = text
    return headers, content_type


def sync_response(run_id: str, message: dict[str, Any]) -> web.Response:
    """Turn a worker's reply into the HTTP answer (sync webhooks: docs/flows.md, Triggers)."""
    headers = {"x-run-id": run_id}
    if message.get("kind") == "respond":
        status = int(message.get("status") or 200)
        extra, content_type = respond_headers(message.get("headers"))
        body = message.get("body")
        default_type = "text/plain" if isinstance(body, str | bytes) else "application/json"
        mime, _, params = (content_type or default_type).partition(";")
        charset = params.partition("charset=")[2].split(";")[0].strip() or None
        if isinstance(body, str):
            payload = body.encode(charset or "utf-8", errors="replace")
        elif isinstance(body, bytes):
            payload = body
        else:
            payload = orjson.dumps(body, default=str)
        return web.Response(
            body=payload,
            status=status,
            headers={**extra, **headers},
            content_type=mime.strip() or "application/octet-stream",
            charset=charset,
        )
    run_status = message.get("run_status")
    if run_status == RunStatus.SUCCEEDED.value:
        return json_response(message.get("output"), status=200, headers=headers)
    # Callers of a webhook are anonymous: the step's error (a traceback, an internal URL)
    # stays in the run record, behind the API key.
    error = message.get("error")
    step = error.get("step") if isinstance(error, dict) else None
    where = f" at step {step!r}" if isinstance(step, str) and step else ""
    text = (
        f"the run ended {run_status or 'FAILED'}{where}; "
        f"details are in the run record (GET /api/v1/flow-runs/{run_id})"
    )
    return json_response(
        {
            "error": {"code": run_status or "FAILED", "message": text},
            "run_id": run_id,
        },
        status=500,
        headers=headers,
    )
