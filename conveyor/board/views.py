"""The board's pages and their live-refresh twins.

Each :class:`Page` names a template, the regions of it that refresh live, and a coroutine that
gathers the page's data by calling the same read functions as the API (queue admin, run and
flow store, worker registry, scaling report). ``GET /admin/<page>`` renders the whole
template; ``GET /admin/api/<page>`` renders only the regions (the same partial templates, so
both stay identical) and returns them as JSON with each region's hash (the page carries the
same in ``data-hash``) and a summary of the data; ``board.js`` swaps a region in when its
hash changed. A finished run's page does not poll (``final`` in its JSON stops a page that
saw the run finish).
"""

from __future__ import annotations

import hashlib
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp_jinja2
from aiohttp import web
from markupsafe import Markup

from conveyor import heartbeat
from conveyor.api.admin import (
    job_state,
    list_jobs_page,
    queue_name,
)
from conveyor.api.errors import ApiError, json_response
from conveyor.api.flows import flow_json, page_args, public_base_url
from conveyor.api.runs import run_json
from conveyor.board.present import curl_example, payload, per_second, sparkline, timeline
from conveyor.board.security import csrf_token
from conveyor.engine.flow import Trigger
from conveyor.errors import ConveyorError, NotFound
from conveyor.keys import DB, REDIS, SANDBOX_REPORT, SETTINGS, operations_of
from conveyor.queue import JobState
from conveyor.records import RunView
from conveyor.status import IN_FLIGHT, TERMINAL, RunStatus
from conveyor.store import flows as flow_store
from conveyor.store import runs as run_store

FLASH_COOKIE = "conveyor_flash"
#: How often the pages poll their live JSON, in milliseconds.
REFRESH_MS = 3000
#: Steps the run page shows at most (the first and the last halves); the API has them all.
MAX_STEPS = 200
#: What the live-status line says once a finished run's page stops polling.
STOPPED_NOTE = "Run finished: live refresh stopped"
RUN_STATUSES = tuple(s.value for s in RunStatus)
NAV = (
    ("queues", "/admin/queues", "Queues"),
    ("runs", "/admin/runs", "Runs"),
    ("flows", "/admin/flows", "Flows"),
    ("workers", "/admin/workers", "Workers"),
)

Context = dict[str, Any]


def root(request: web.Request) -> web.Application:
    """The API application the board is mounted on (it holds the pools and clients)."""
    return request.match_info.apps[0]


@dataclass(frozen=True, slots=True)
class Page:
    """A board page: ``template``, the live ``regions`` (partials ``_<region>.html``), the
    ``section`` highlighted in the navigation and the coroutine that ``build`` s its data."""

    template: str
    regions: tuple[str, ...]
    section: str
    build: Callable[[web.Request], Awaitable[Context]]


# --------------------------------------------------------------------------- data per page
async def overview_data(request: web.Request) -> Context:
    app = root(request)
    admin = operations_of(request).queues
    cards = []
    for st in await admin.all_stats():
        history = per_second(await admin.history(st.queue))
        cards.append(
            {
                "stats": st.to_dict(),
                "per_s": round(st.throughput_1m / 60, 2),
                "depth": sparkline(history, "depth"),
                "rate": sparkline(history, "per_s"),
            }
        )
    advice = await operations_of(request).scaling_report()
    workers = await heartbeat.list_workers(app[REDIS], prefix=app[SETTINGS].redis_key_prefix)
    lost = sum(1 for w in workers if w["lost"])
    return {
        "title": "Queues",
        "cards": cards,
        "advice": advice,
        "breached": [r for r in advice if r["breached"]],
        "workers_live": len(workers) - lost,
        "workers_lost": lost,
        "live": {"queues": [c["stats"] for c in cards], "scaling": advice},
    }


async def queue_data(request: web.Request) -> Context:
    q = queue_name(request)
    state = job_state(request.query.get("state"))
    cursor = request.query.get("cursor") or None
    admin = operations_of(request).queues
    stats = (await admin.stats(q)).to_dict()
    jobs, next_cursor = await list_jobs_page(admin, q, state, 50, cursor)
    counts = {
        JobState.WAITING.value: stats["waiting"],
        JobState.ACTIVE.value: stats["active"],
        JobState.DELAYED.value: stats["delayed"],
        JobState.FAILED.value: stats["dead"],
        JobState.COMPLETED.value: stats["completed"],
    }
    return {
        "title": f"Queue {q}",
        "queue": q,
        "stats": stats,
        "state": state,
        "tabs": list(counts.items()),
        "jobs": jobs,
        "cursor": cursor,
        "next_cursor": next_cursor,
        "cleanable": [s for s in counts if s != JobState.ACTIVE.value],
        "live": {"stats": stats, "jobs": jobs, "next_cursor": next_cursor},
    }


def _uuid_arg(raw: str | None, what: str) -> uuid.UUID | None:
    if not raw:
        return None
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise ApiError(400, "BAD_REQUEST", f"{what} is not a valid id") from None


#: Flows offered in the runs page's filter (newest first).
FLOW_CHOICES = 200


async def _flow_names(request: web.Request, wanted: set[str]) -> dict[str, str]:
    """Names of the newest :data:`FLOW_CHOICES` flows (the filter's choices) plus those of the
    ``wanted`` ids (the filtered flow, the flows of the runs shown) not among them; an id
    whose flow is gone has no name."""
    db = root(request)[DB]
    flows = await flow_store.list_flows(db, limit=FLOW_CHOICES)
    names = {str(f.id): f.name for f in flows}
    for flow_id in sorted(wanted - names.keys()):
        try:
            names[flow_id] = (await flow_store.get_flow(db, uuid.UUID(flow_id))).name
        except NotFound:
            continue
    return names


async def _search(request: web.Request) -> tuple[str | None, int]:
    """The run-id search box (``?run=``): an existing run's id redirects to its page (303); a
    malformed or unknown one comes back as a notice above the list, with status 400 or 404."""
    raw = (request.query.get("run") or "").strip()
    if not raw:
        return None, 200
    try:
        run_id = uuid.UUID(raw)
    except ValueError:
        shown = raw if len(raw) <= 80 else raw[:80] + "…"
        return (
            f"“{shown}” is not a run id: a run id has 36 characters, like "
            "0190f0f0-0000-7000-8000-000000000000 (the run page shows the whole id).",
            400,
        )
    try:
        await run_store.get_run(root(request)[DB], run_id)
    except NotFound:
        return f"No run has the id {run_id}.", 404
    if request.path.startswith("/admin/api/"):
        return None, 200  # the live twin never redirects: the page it refreshes did
    raise web.HTTPSeeOther(f"/admin/runs/{run_id}")


async def runs_data(request: web.Request) -> Context:
    limit, cursor = page_args(request)
    flow_id = _uuid_arg(request.query.get("flow_id"), "flow_id")
    status = request.query.get("status") or None
    if status is not None and status not in RUN_STATUSES:
        raise ApiError(400, "BAD_REQUEST", f"status must be one of {', '.join(RUN_STATUSES)}")
    notice, http_status = await _search(request)
    rows = await run_store.list_runs(
        root(request)[DB], flow_id=flow_id, status=status, limit=limit + 1, cursor=cursor
    )
    runs = [run_json(r) for r in rows[:limit]]
    wanted = {run["flow_id"] for run in runs} | ({str(flow_id)} if flow_id else set())
    names = await _flow_names(request, wanted)
    for run in runs:
        run["flow_name"] = names.get(run["flow_id"])
    query = {"flow_id": str(flow_id) if flow_id else "", "status": status or ""}
    if "limit" in request.query:
        query["limit"] = str(limit)
    next_cursor = runs[-1]["id"] if len(rows) > limit else None
    next_url = None
    if next_cursor:
        next_url = "/admin/runs?" + urllib.parse.urlencode({**query, "cursor": next_cursor})
    choices = sorted(names.items(), key=lambda kv: kv[1].lower())
    if flow_id and str(flow_id) not in names:  # a deleted flow: still the selected filter
        choices.insert(0, (str(flow_id), str(flow_id)))
    return {
        "title": "Runs",
        "runs": runs,
        "flows": choices,
        "filter": query,
        "statuses": RUN_STATUSES,
        "search": request.query.get("run", "")[:200],
        "notice": notice,
        "http_status": http_status,
        "next_url": next_url,
        "live": {"runs": runs, "next_cursor": next_cursor},
    }


#: The run fields the run page's live JSON carries besides its HTML (status and times).
_RUN_SUMMARY = (
    "id",
    "flow_id",
    "flow_version",
    "status",
    "attempt",
    "created_at",
    "started_at",
    "finished_at",
    "duration_ms",
)


async def run_data(request: web.Request) -> Context:
    try:
        run_id = uuid.UUID(request.match_info["id"])
    except ValueError:
        raise ApiError(404, "NOT_FOUND", "no such run") from None
    db = root(request)[DB]
    row = await run_store.get_run(db, run_id)
    view = RunView.of(row, await run_store.get_steps(db, run_id))
    run = view.to_json()
    try:
        flow_name: str | None = (await flow_store.get_flow(db, row["flow_id"])).name
    except NotFound:
        flow_name = None
    bars = list(enumerate(timeline(view.steps or ())))
    half = MAX_STEPS // 2
    head, tail = (bars, []) if len(bars) <= MAX_STEPS else (bars[:half], bars[-half:])
    return {
        "title": f"Run {run['id']}",
        "run": run,
        "flow_name": flow_name,
        "payload": payload(run["trigger"]),
        "steps": bool(bars),
        "steps_head": head,
        "steps_tail": tail,
        "steps_total": len(bars),
        "steps_hidden": len(bars) - len(head) - len(tail),
        "finished": run["status"] in {s.value for s in TERMINAL},
        "in_flight": run["status"] in {s.value for s in IN_FLIGHT},
        "live": {"run": {k: run[k] for k in _RUN_SUMMARY}},
    }


def public_origin(request: web.Request) -> str:
    """Where senders reach this server: ``AP_FRONTEND_URL`` when set, else the origin the
    request came to (``X-Forwarded-*`` honoured, as in the API's own URLs)."""
    front = request.config_dict[SETTINGS].frontend_url
    return front.rstrip("/") if front else public_base_url(request)


def webhook_secret_name(flow: dict[str, Any]) -> str | None:
    """The name of the secret the flow's webhook is signed with (``None``: unsigned)."""
    trigger = flow.get("trigger") or {}
    secret = trigger.get("secret") if isinstance(trigger, dict) else None
    if not isinstance(secret, str):
        return None
    try:
        name = Trigger(type="webhook", secret=secret).secret_name or ""
    except ConveyorError:
        name = ""
    # A shell comment names it: only a plain name, never text that could end the comment.
    return name if name.isidentifier() and name.isascii() else "of the trigger"


def webhook_urls(request: web.Request, flow: dict[str, Any]) -> dict[str, Any]:
    """The flow's webhook URLs (async and ``/sync``) with a curl example for each; a trigger
    with a secret gets the signed form (the secret's name, never its value)."""
    secret_name = webhook_secret_name(flow)
    url = f"{public_origin(request)}/api/v1/webhooks/{flow['id']}"
    return {
        "webhook_url": url,
        "sync_webhook_url": url + "/sync",
        "secret_name": secret_name,
        "curl": curl_example(url, secret_name),
        "curl_sync": curl_example(url + "/sync", secret_name),
    }


async def flows_data(request: web.Request) -> Context:
    limit, cursor = page_args(request)
    db = root(request)[DB]
    found = await flow_store.list_flows(db, limit=limit + 1, cursor=cursor)
    flows = []
    for f in found[:limit]:
        doc = flow_json(request, f)
        doc.update(webhook_urls(request, doc))
        recent = await run_store.list_runs(db, flow_id=f.id, limit=5)
        doc["recent_runs"] = [{"id": str(r["id"]), "status": r["status"]} for r in recent]
        doc["trigger_type"] = (doc.get("trigger") or {}).get("type", "webhook")
        doc.pop("steps", None)
        flows.append(doc)
    next_url = f"/admin/flows?cursor={flows[-1]['id']}" if len(found) > limit else None
    return {"title": "Flows", "flows": flows, "next_url": next_url, "live": {"flows": flows}}


async def workers_data(request: web.Request) -> Context:
    app = root(request)
    workers = await heartbeat.list_workers(
        app[REDIS], include_lost=True, prefix=app[SETTINGS].redis_key_prefix
    )
    return {
        "title": "Workers",
        "workers": workers,
        # This process's code-step sandbox, as /readyz reports it (None: no worker here).
        "sandbox": app.get(SANDBOX_REPORT),
        "lost_after_s": heartbeat.LOST_AFTER_S,
        "live": {"workers": workers},
    }


PAGES = {
    "overview": Page("overview.html", ("cards", "advice"), "queues", overview_data),
    "queue": Page("queue.html", ("queue_head", "jobs"), "queues", queue_data),
    "runs": Page("runs.html", ("runs",), "runs", runs_data),
    "run": Page("run.html", ("run",), "runs", run_data),
    "flows": Page("flows.html", ("flows",), "flows", flows_data),
    "workers": Page("workers.html", ("workers",), "workers", workers_data),
}


# --------------------------------------------------------------------------- handlers
def _flash(request: web.Request) -> dict[str, str] | None:
    raw = request.cookies.get(FLASH_COOKIE)
    if not raw:
        return None
    kind, _, message = urllib.parse.unquote(raw).partition("|")
    return {"kind": "error" if kind == "error" else "ok", "message": message[:500]}


async def _context(request: web.Request, page: Page) -> Context:
    # The page's own address, also when rendering its regions for /admin/api/…: forms send
    # the operator back there after an action, never to the JSON twin.
    page_path = "/admin/" + request.path_qs.removeprefix("/admin/").removeprefix("api/")
    ctx = await page.build(request)
    # A finished run changes only through an action, which reloads the page: no polling.
    stopped = bool(ctx.get("finished"))
    ctx.update(
        csrf=csrf_token(request),
        nav=NAV,
        section=page.section,
        here=page_path,
        refresh_ms=0 if stopped else REFRESH_MS,
        live_note=STOPPED_NOTE if stopped else "",
        live_url="/admin/api/" + page_path.removeprefix("/admin/"),
    )
    return ctx


def _regions(request: web.Request, page: Page, ctx: Context) -> dict[str, str]:
    """The page's live regions rendered alone (the same HTML the page embeds)."""
    env = aiohttp_jinja2.get_env(request.app)  # the board sub-app holds it
    return {r: env.get_template(f"_{r}.html").render(ctx) for r in page.regions}


def _digest(html: str) -> str:
    """A region's fingerprint: ``board.js`` swaps a region only when it changes."""
    return hashlib.sha256(html.encode()).hexdigest()[:20]


def html_view(page: Page) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        ctx = await _context(request, page)
        regions = _regions(request, page, ctx)
        ctx["regions"] = {name: Markup(html) for name, html in regions.items()}
        ctx["region_hash"] = {name: _digest(html) for name, html in regions.items()}
        ctx["flash"] = _flash(request)
        status = int(ctx.get("http_status", 200))
        response = aiohttp_jinja2.render_template(page.template, request, ctx, status=status)
        if ctx["flash"]:
            response.del_cookie(FLASH_COOKIE, path="/admin")
        return response

    handler.__doc__ = f"Board page ({page.template})."
    return handler


def live_view(page: Page) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        ctx = await _context(request, page)
        regions = _regions(request, page, ctx)
        doc: dict[str, Any] = {
            "regions": regions,
            "hashes": {name: _digest(html) for name, html in regions.items()},
            "data": ctx.get("live"),
        }
        if ctx.get("finished"):
            doc["final"] = True  # board.js stops polling
        return json_response(doc)

    handler.__doc__ = f"Live-refresh JSON of the board page {page.template}."
    return handler


async def index(request: web.Request) -> web.StreamResponse:
    """``/admin`` → the overview."""
    raise web.HTTPFound("/admin/queues")
