"""Webhook ingest: a durable run for every accepted request, answered 202 or synchronously.

Order matters for "a 2xx means durable" (DESIGN §5): the run row is committed to PostgreSQL
(group commit across concurrent webhooks) *before* the job is added to Redis and before the
caller hears 2xx. If Redis is down after the commit, an async webhook still answers 202 — the
reconciler enqueues the run from PostgreSQL later; a sync webhook cancels its run and answers
503. A full backlog is checked by the queue's enqueue script: the just-inserted row is deleted
again and the caller gets 429 + ``Retry-After: 1`` — refused work, never dropped work.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import uuid
from typing import Any

import orjson
import structlog
from aiohttp import web

from conveyor.api.errors import ApiError, json_response
from conveyor.api.keys import DB, PRODUCER, REGISTRY, REPLIES, RUN_WRITER, SECRET_BOX, SETTINGS
from conveyor.engine.status import TERMINAL, RunStatus
from conveyor.ids import uuid7
from conveyor.queue import QueueFull, QueueName, QueueUnavailable
from conveyor.store import runs as run_store
from conveyor.store.secrets import load_secrets

log = structlog.get_logger(__name__)

#: Triggers smaller than this travel inside the job, saving the worker a read.
INLINE_TRIGGER_BYTES = 16 * 1024
SIGNATURE_HEADER = "X-Conveyor-Signature"
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
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)
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
    """``{method, headers, query, body}``: JSON parsed when declared and valid, else text."""
    body: Any = None
    if raw:
        if "json" in request.content_type:
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError:
                # Senders send what they send: keep the text rather than refuse the webhook.
                body = raw.decode("utf-8", errors="replace")
        else:
            body = raw.decode("utf-8", errors="replace")
    return {
        "method": request.method,
        "headers": {k.lower(): v for k, v in request.headers.items()},
        "query": dict(request.query),
        "body": body,
    }


async def _check_signature(request: web.Request, secret_name: str, raw: bytes) -> None:
    box = request.app[SECRET_BOX]
    values = await load_secrets(request.app[DB], box, [secret_name])
    secret = values.get(secret_name)
    if secret is None:
        raise ApiError(401, "SIGNATURE_INVALID", f"secret {secret_name!r} is not set")
    given = request.headers.get(SIGNATURE_HEADER, "")
    expected = "sha256=" + hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise ApiError(
            401, "SIGNATURE_INVALID", f"{SIGNATURE_HEADER} missing or not sha256=<HMAC of body>"
        )


def _redis_unavailable(run_id: str) -> ApiError:
    # PostgreSQL outages need nothing here: the error middleware answers 503 + Retry-After: 5.
    return ApiError(
        503,
        "UNAVAILABLE",
        "Redis unavailable, retry later",
        headers={"Retry-After": "1", "x-run-id": run_id},
    )


async def _accept(
    request: web.Request, *, sync: bool
) -> tuple[web.Response | None, dict[str, Any]]:
    """Validate and durably record the run; returns an early answer or the job to enqueue."""
    app = request.app
    flow_id = _flow_id(request)
    head = await app[REGISTRY].head(flow_id)
    if head is None or not head.enabled:
        raise ApiError(404, "FLOW_NOT_FOUND", f"flow {flow_id} not found or disabled")
    raw = await read_body(request)
    secret_name = head.flow.trigger.secret_name
    if secret_name:
        await _check_signature(request, secret_name, raw)
    trigger = trigger_payload(request, raw)
    # Namespaced, so a caller's key can never collide with keys the scheduler (or any other
    # trigger) derives for the same flow.
    header_key = request.headers.get("Idempotency-Key")
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
    inserted = await app[RUN_WRITER].insert(new)
    run_id = str(inserted.run_id)
    if not inserted.created:
        # A repeat of an Idempotency-Key: the first answer's status, nothing started.
        status = inserted.response_status or 202
        return (
            json_response(
                {"run_id": run_id, "status": inserted.status, "idempotent_replay": True},
                status=status,
                headers={"x-run-id": run_id},
            ),
            {},
        )
    job: dict[str, Any] = {
        "run_id": run_id,
        "flow_id": str(flow_id),
        "version": head.version,
    }
    if len(raw) <= INLINE_TRIGGER_BYTES:
        job["trigger"] = trigger
    return None, job


async def _enqueue(request: web.Request, queue: QueueName, job: dict[str, Any]) -> None:
    """Add the job; on a full backlog undo the insert and refuse with 429."""
    app = request.app
    try:
        await app[PRODUCER].enqueue(queue.value, job, job_id=job["run_id"])
    except QueueFull:
        await run_store.delete_run(app[DB], uuid.UUID(job["run_id"]))
        raise ApiError(
            429,
            "QUEUE_FULL",
            "backlog over AP_QUEUE_MAX_LENGTH, retry later",
            headers={"Retry-After": "1"},
        ) from None


async def webhook_async(request: web.Request) -> web.Response:
    early, job = await _accept(request, sync=False)
    if early is not None:
        return early
    try:
        await _enqueue(request, QueueName.RUNS, job)
    except QueueUnavailable as exc:
        # The run is committed: the reconciler will enqueue it once Redis is back.
        log.warning("redis unavailable at ingest, run left to the reconciler", error=str(exc))
    run_id = job["run_id"]
    return json_response(
        {"run_id": run_id, "status": RunStatus.QUEUED.value},
        status=202,
        headers={"x-run-id": run_id},
    )


async def webhook_sync(request: web.Request) -> web.Response:
    early, job = await _accept(request, sync=True)
    if early is not None:
        return early
    app = request.app
    run_id = job["run_id"]
    hub = app[REPLIES]
    waiter = hub.register(run_id)
    job["reply"] = hub.channel
    try:
        try:
            await _enqueue(request, QueueName.SYNC, job)
        except QueueUnavailable as exc:
            rid = uuid.UUID(run_id)
            await app[RUN_WRITER].transition(
                run_store.Transition(
                    rid,
                    RunStatus.CANCELED,
                    error={"step": None, "message": "Redis unavailable at ingest"},
                )
            )
            # The caller retries after Retry-After; with the same key it must get a new run.
            await run_store.release_idempotency_key(app[DB], rid)
            raise _redis_unavailable(run_id) from exc
        timeout_s = app[SETTINGS].webhook_timeout_seconds
        try:
            message = await asyncio.wait_for(asyncio.shield(waiter), timeout_s)
        except TimeoutError:
            # Pub/sub is at most once: a reply lost in a reconnect must not turn a finished
            # run into a 408. PostgreSQL knows.
            row = await run_store.get_run(app[DB], uuid.UUID(run_id))
            if row["status"] in TERMINAL_VALUES:
                message = {
                    "kind": "final",
                    "run_status": row["status"],
                    "output": row["output"],
                    "error": row["error"],
                }
                response = sync_response(run_id, message)
                await _remember(request, run_id, response.status)
                return response
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
    response = sync_response(run_id, message)
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
    """Turn a worker's reply into the HTTP answer (DESIGN §4, sync webhooks)."""
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
    error = message.get("error") or {}
    text = error.get("message") if isinstance(error, dict) else str(error)
    return json_response(
        {
            "error": {"code": run_status or "FAILED", "message": text or "run failed"},
            "run_id": run_id,
        },
        status=500,
        headers=headers,
    )
