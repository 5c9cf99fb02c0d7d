"""``/api/v1/flows``: create, list, read, update (new version), delete, enable, disable, run.

Documents come as JSON or, with ``Content-Type: application/yaml``, YAML; they are validated
completely before anything is saved (422 ``FLOW_INVALID`` with every problem's path). Parsing
and validation (YAML, compiling code steps) run in a thread, off the event loop, within
:data:`MAX_DOCUMENT_BYTES` and :data:`PARSE_TIMEOUT_S`, so no document can stall health
checks, webhooks or the worker sharing the process.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import orjson
from aiohttp import web

from conveyor.api import payloads
from conveyor.api.errors import ApiError, json_response
from conveyor.api.hosts import trusted_host
from conveyor.engine.errors import FlowInvalid
from conveyor.engine.flow import load_document, parse_flow
from conveyor.errors import FlowValidationError, NotFound
from conveyor.keys import SETTINGS, operations_of
from conveyor.status import RunStatus
from conveyor.store import flows as flow_store
from conveyor.store.flows import FlowRecord

MAX_PAGE = 200
#: A flow document's size cap (code steps may hold up to a million characters of source).
MAX_DOCUMENT_BYTES = 4 * 1024 * 1024
#: Wall time allowed to parse and validate one document.
PARSE_TIMEOUT_S = 10.0


def flow_id_of(request: web.Request) -> uuid.UUID:
    try:
        return uuid.UUID(request.match_info["id"])
    except ValueError:
        raise NotFound("no such flow") from None


def limit_arg(request: web.Request, default: int = 50) -> int:
    """The ``limit`` query parameter (1–200), validated."""
    try:
        limit = int(request.query.get("limit", default))
    except ValueError:
        raise ApiError(400, "BAD_REQUEST", "limit must be an integer") from None
    if not 1 <= limit <= MAX_PAGE:
        raise ApiError(400, "BAD_REQUEST", f"limit must be between 1 and {MAX_PAGE}")
    return limit


def page_args(request: web.Request, default: int = 50) -> tuple[int, uuid.UUID | None]:
    """``limit`` (1–200) and ``cursor`` (an id) query parameters, validated."""
    limit = limit_arg(request, default)
    raw = request.query.get("cursor")
    try:
        cursor = uuid.UUID(raw) if raw else None
    except ValueError:
        raise ApiError(400, "BAD_REQUEST", "cursor is not a valid id") from None
    return limit, cursor


def public_base_url(request: web.Request) -> str:
    """Scheme and host as the caller sees them: behind nginx or an Ingress terminating TLS,
    from ``X-Forwarded-Proto``/``X-Forwarded-Host`` (they only shape the URLs we show). A
    forwarded host is used only when it passes the board's Host allow-list
    (:func:`conveyor.api.hosts.trusted_host`), else the request's own ``Host``:
    ``AP_FRONTEND_URL`` is the reliable way behind a proxy (``docs/board.md``)."""
    proto = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
    host = request.headers.get("X-Forwarded-Host", "").split(",")[0].strip()
    if host and not trusted_host(request.config_dict[SETTINGS], host):
        host = ""
    scheme = proto if proto in ("http", "https") else request.scheme
    return f"{scheme}://{host or request.host}"


def flow_json(request: web.Request, flow: FlowRecord) -> dict[str, Any]:
    base = f"{public_base_url(request)}/api/v1/webhooks/{flow.id}"
    return {
        "id": str(flow.id),
        "name": flow.name,
        "version": flow.version,
        "enabled": flow.enabled,
        "trigger": flow.document.get("trigger"),
        "steps": flow.document.get("steps"),
        "webhook_url": base,
        "sync_webhook_url": base + "/sync",
        "created_at": flow.created_at.isoformat(),
        "updated_at": flow.updated_at.isoformat(),
    }


def _parse(raw: bytes, content_type: str | None) -> dict[str, Any]:
    try:
        return parse_flow(load_document(raw, content_type)).to_document()
    except RecursionError:
        raise FlowInvalid([{"path": "", "message": "document nested too deeply"}]) from None


async def _document(request: web.Request) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > MAX_DOCUMENT_BYTES:
        raise _too_large()
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > MAX_DOCUMENT_BYTES:
            raise _too_large()
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw:
        raise ApiError(400, "BAD_REQUEST", "request body must be a flow document")
    try:
        # A thread, not the loop: YAML and code compilation are CPU work. A thread cannot
        # be killed, but the caps in load_document bound what it can be made to do. An
        # invalid document raises FlowInvalid (422 with every problem's path).
        return await asyncio.wait_for(
            asyncio.to_thread(_parse, raw, request.headers.get("Content-Type")),
            PARSE_TIMEOUT_S,
        )
    except TimeoutError:
        raise FlowValidationError(
            f"document took longer than {PARSE_TIMEOUT_S:g} s to parse"
        ) from None


def _too_large() -> ApiError:
    return ApiError(
        413, "PAYLOAD_TOO_LARGE", f"flow documents are limited to {MAX_DOCUMENT_BYTES} bytes"
    )


async def create_flow(request: web.Request) -> web.Response:
    doc = await _document(request)
    flow = await operations_of(request).create_flow(doc)
    return json_response(flow_json(request, flow), status=201)


async def list_flows(request: web.Request) -> web.Response:
    """Flows, newest first; ``?name=`` finds one flow by its exact name."""
    db = operations_of(request).db
    if (name := request.query.get("name")) is not None:
        if "\x00" in name:
            raise ApiError(422, "UNPROCESSABLE", "name may not contain a NUL character")
        found_one = await flow_store.get_flow_by_name(db, name)
        data = [flow_json(request, found_one)] if found_one else []
        return json_response({"data": data, "next_cursor": None})
    limit, cursor = page_args(request)
    found = await flow_store.list_flows(db, limit=limit + 1, cursor=cursor)
    page = found[:limit]
    next_cursor = str(page[-1].id) if len(found) > limit else None
    return json_response(
        {"data": [flow_json(request, f) for f in page], "next_cursor": next_cursor}
    )


async def get_flow(request: web.Request) -> web.Response:
    flow = await flow_store.get_flow(operations_of(request).db, flow_id_of(request))
    return json_response(flow_json(request, flow))


async def update_flow(request: web.Request) -> web.Response:
    flow_id = flow_id_of(request)
    doc = await _document(request)
    flow = await operations_of(request).update_flow(flow_id, doc)
    return json_response(flow_json(request, flow))


async def delete_flow(request: web.Request) -> web.Response:
    await operations_of(request).delete_flow(flow_id_of(request))
    return web.Response(status=204)


async def _set_enabled(request: web.Request, enabled: bool) -> web.Response:
    flow = await operations_of(request).set_flow_enabled(flow_id_of(request), enabled)
    return json_response(flow_json(request, flow))


async def enable_flow(request: web.Request) -> web.Response:
    return await _set_enabled(request, True)


async def disable_flow(request: web.Request) -> web.Response:
    return await _set_enabled(request, False)


async def run_flow(request: web.Request) -> web.Response:
    """Manual trigger: the JSON body (if any) becomes ``trigger.body``; 202 + run id."""
    ops = operations_of(request)
    flow = await flow_store.get_flow(ops.db, flow_id_of(request))
    raw = await request.read()
    try:
        body = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        raise ApiError(400, "BAD_REQUEST", "body must be JSON") from None
    if payloads.too_deep(raw, body):
        # Too deep to store: the caller is told, nothing is started.
        raise ApiError(
            422, "UNPROCESSABLE", f"body nests deeper than {payloads.MAX_JSON_DEPTH} levels"
        )
    # A full backlog refuses the run with QueueFull (429); Redis down: committed, the
    # reconciler enqueues it.
    run_id = await ops.start_run(flow, body)
    return json_response(
        {"run_id": str(run_id), "status": RunStatus.QUEUED.value},
        status=202,
        headers={"x-run-id": str(run_id)},
    )
