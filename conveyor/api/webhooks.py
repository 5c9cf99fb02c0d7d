"""Webhook ingest over HTTP: a durable run for every accepted request, answered 202 or
synchronously.

This module only speaks HTTP: it reads the (capped) body, turns headers and query into the
trigger (:mod:`conveyor.api.payloads`), calls the process's
:class:`~conveyor.engine.intake.WebhookIntake` (flow lookup, signature and replay checks,
idempotency, insert → enqueue, the sync wait) and renders the answer. Refusals come back as
domain errors, which ``conveyor/api/errors.py`` maps to status, code and headers.

Order matters for "a 2xx means durable": the run row is committed to PostgreSQL (group commit
across concurrent webhooks) *before* the job is added to Redis and before the caller hears
2xx. If Redis is down after the commit, an async webhook still answers 202 — the reconciler
enqueues the run from PostgreSQL later; a sync webhook cancels its run and answers 503. A full
backlog deletes the just-inserted row again and the caller gets 429 + ``Retry-After: 1`` —
refused work, never dropped work. See docs/architecture.md, "A webhook, from request to reply".
"""

from __future__ import annotations

import re
import uuid
from typing import Any

import orjson
from aiohttp import hdrs, web
from multidict import CIMultiDict, istr

from conveyor.api import payloads
from conveyor.api.errors import ApiError, json_response
from conveyor.backoff import Outage
from conveyor.engine.intake import INLINE_TRIGGER_BYTES, SIGNATURE_HEADER, WebhookIntake
from conveyor.engine.submit import Submission
from conveyor.keys import INTAKE, SETTINGS
from conveyor.status import TERMINAL, RunStatus
from conveyor.store.runs import NewRun

__all__ = ["SIGNATURE_HEADER", "read_body", "sync_response", "webhook_async", "webhook_sync"]

#: Redis as seen by async ingest (the run is already committed when enqueueing fails).
_INGEST_OUTAGE = Outage("redis", "ingest")
_IDEMPOTENCY_KEY = re.compile(r"[\x20-\x7e]{1,255}")
TERMINAL_VALUES = frozenset(s.value for s in TERMINAL)
#: The 202's body, ``{"run_id": …, "status": "QUEUED"}`` as orjson writes it (a run id is
#: hex and dashes: nothing to escape).
_QUEUED_BODY = b'{"run_id":"%s","status":"' + RunStatus.QUEUED.value.encode() + b'"}'


#: Flow ids as they appear in URLs → parsed (a webhook's flow is hit again and again);
#: cleared when full, so a sender inventing ids costs parsing, never memory.
_FLOW_IDS: dict[str, uuid.UUID] = {}
_FLOW_IDS_MAX = 4096


def _flow_id(request: web.Request) -> uuid.UUID:
    raw = request.match_info["flow_id"]
    found = _FLOW_IDS.get(raw)
    if found is None:
        try:
            found = uuid.UUID(raw)
        except ValueError:
            raise ApiError(404, "FLOW_NOT_FOUND", "no such flow") from None
        if len(_FLOW_IDS) >= _FLOW_IDS_MAX:
            _FLOW_IDS.clear()
        _FLOW_IDS[raw] = found
    return found


async def read_body(request: web.Request, limit: int | None = None) -> bytes:
    """The raw body, refusing more than ``limit`` (default ``AP_MAX_WEBHOOK_PAYLOAD_SIZE_MB``)
    before reading it whole (by Content-Length when given, else while streaming a chunked
    body)."""
    if limit is None:
        limit = request.app[SETTINGS].max_webhook_payload_bytes
    length = request.content_length
    if length is not None:
        if length > limit:
            raise _too_large(limit)
        content = request.content
        if content.is_eof():
            # The whole body came in with the head (a usual webhook): take the buffer as is.
            raw = content.read_nowait()
            if len(raw) > limit:  # a compressed body that inflated past the limit
                raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=len(raw))
            return raw
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


#: Content-Type header values seen → whether their media type says JSON (senders repeat
#: theirs on every call); cleared when full.
_JSON_TYPES: dict[str, bool] = {}
_JSON_TYPES_MAX = 256


def _declares_json(request: web.Request) -> bool:
    """``"json" in request.content_type``, parsed once per distinct header value."""
    raw = request.headers.get("Content-Type")
    if raw is None:
        return False  # application/octet-stream
    found = _JSON_TYPES.get(raw)
    if found is None:
        found = "json" in request.content_type
        if len(_JSON_TYPES) >= _JSON_TYPES_MAX:
            _JSON_TYPES.clear()
        _JSON_TYPES[raw] = found
    return found


def trigger_payload(request: web.Request, raw: bytes) -> dict[str, Any]:
    """``{method, headers, query, body}``: JSON parsed when declared, valid and storable,
    else text; sensitive headers redacted (:mod:`conveyor.api.payloads`)."""
    body: Any = None
    if raw:
        if _declares_json(request):
            body = payloads.json_body(raw)
        else:
            body = raw.decode("utf-8", errors="replace")
    return {
        "method": request.method,
        "headers": payloads.headers(request.headers.items()),
        "query": payloads.query(request.query.items()),
        "body": body,
    }


def _idempotency_key(request: web.Request) -> str | None:
    header_key = request.headers.get("Idempotency-Key")
    if header_key is None:
        return None
    if not _IDEMPOTENCY_KEY.fullmatch(header_key):
        raise ApiError(
            400, "BAD_REQUEST", "Idempotency-Key must be 1–255 printable ASCII characters"
        )
    return header_key


async def _accept(
    request: web.Request, intake: WebhookIntake, *, sync: bool
) -> tuple[NewRun, bool, bytes | None]:
    """Read the request into its run (checked by the intake); returns the run, whether its
    trigger is small enough to travel inside the job, and the signature's replay marker."""
    flow_id = _flow_id(request)
    head = intake.enabled(flow_id, await intake.registry.head(flow_id))
    raw = await read_body(request, intake.settings.max_webhook_payload_bytes)
    header_key = _idempotency_key(request)
    marker = None
    trigger = head.flow.trigger
    if trigger.secret is not None or trigger.secret_name:
        given = payloads.text(request.headers.get(SIGNATURE_HEADER, "")).strip()
        marker = await intake.verify_signature(
            head, given, request.headers.get("Idempotency-Key", ""), raw
        )
    new = intake.new_run(head, trigger_payload(request, raw), header_key, sync=sync)
    return new, len(raw) <= INLINE_TRIGGER_BYTES, marker


def _replayed(sub: Submission) -> web.Response:
    """The answer to a repeat of an Idempotency-Key: the first run's (nothing started)."""
    run_id = str(sub.run_id)
    return json_response(
        {"run_id": run_id, "status": sub.status, "idempotent_replay": True},
        status=sub.response_status or 202,
        headers={"x-run-id": run_id},
    )


async def webhook_async(request: web.Request) -> web.Response:
    intake = request.app[INTAKE]
    new, inline, marker = await _accept(request, intake, sync=False)
    sub = await intake.submit(new, inline=inline, marker=marker)
    if not sub.created:
        return _replayed(sub)
    if sub.outage is not None:
        # The run is committed: the reconciler will enqueue it once Redis is back. Logged
        # once per outage (and counted), not once per webhook of a failover window.
        _INGEST_OUTAGE.failed(sub.outage)
    else:
        _INGEST_OUTAGE.ok()
    run_id = sub.id_text or str(sub.run_id)
    return web.Response(
        body=_QUEUED_BODY % run_id.encode(),
        status=202,
        content_type="application/json",
        headers={"x-run-id": run_id},
    )


async def webhook_sync(request: web.Request) -> web.Response:
    intake = request.app[INTAKE]
    new, inline, marker = await _accept(request, intake, sync=True)
    hub = intake.replies
    # Registered before the job is enqueued, so the reply cannot arrive before anyone listens.
    run_id = str(new.id)
    waiter = hub.register(run_id)
    try:
        sub = await intake.submit(new, inline=inline, marker=marker, reply=hub.channel)
        if not sub.created:
            return _replayed(sub)
        if sub.outage is not None:
            raise await intake.cancel_unqueued(sub, marker) from sub.outage
        found = await intake.wait_reply(run_id, waiter)
        if found is None:
            timeout_s = intake.settings.webhook_timeout_seconds
            response = ApiError(
                408,
                "WEBHOOK_TIMEOUT",
                f"flow did not answer within {timeout_s} s; the run goes on",
                headers={"x-run-id": run_id},
                extra={"run_id": run_id},
            ).response()
            if request.headers.get("Idempotency-Key"):
                await intake.remember(run_id, 408)
            return response
    finally:
        hub.forget(run_id)
    response = sync_response(run_id, found)
    if request.headers.get("Idempotency-Key"):
        await intake.remember(run_id, response.status)
    return response


_RUN_ID_HEADER = istr("x-run-id")
_CONTENT_TYPE = hdrs.CONTENT_TYPE
_JSON = "application/json"

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
        body = message.get("body")
        if not message.get("headers") and not isinstance(body, str | bytes):
            # The usual answer, a JSON body without headers of its own: the general path
            # below gives this very response (headers in the same order).
            return web.Response(
                body=orjson.dumps(body, default=str),
                status=status,
                headers=CIMultiDict(((_RUN_ID_HEADER, run_id), (_CONTENT_TYPE, _JSON))),
            )
        extra, content_type = respond_headers(message.get("headers"))
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
