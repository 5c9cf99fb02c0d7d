"""The built-in web board under ``/admin/``: queues, runs, flows and workers at a glance.

:func:`setup_board` mounts it as a sub-application (its own Jinja environment, guards and error
pages) on the API application; ``create_app`` calls it when ``AP_QUEUE_UI_ENABLED`` is true,
so with the board disabled ``/admin/queues`` is a plain 404. Templates autoescape everything,
assets are served from this package (no CDN), and the pages refresh themselves by polling
their ``/admin/api/…`` JSON twins. What each page shows and does: ``docs/board.md``.

Routes::

    GET  /admin/queues               overview: a card per queue, sparklines, scaling advice
    GET  /admin/queues/{q}           jobs by state (paged), job detail, queue actions
    GET  /admin/runs                 runs, filtered by flow and status; ?run=ID opens a run
    GET  /admin/runs/{id}            a run: payload, steps with input/output/error, retry
    GET  /admin/flows                flows, webhook URLs with curl examples, recent runs
    GET  /admin/workers              worker processes and their heartbeats
    GET  /admin/api/…                the same pages' live regions as JSON
    POST /admin/queues/{q}/pause|resume|clean|retry-all
    POST /admin/queues/{q}/jobs/{id}/retry|delete
    POST /admin/runs/{id}/retry|cancel
    POST /admin/flows/{id}/enable|disable
"""

from __future__ import annotations

from pathlib import Path

import aiohttp_jinja2
import jinja2
from aiohttp import web

from conveyor import __version__
from conveyor.api.errors import ApiError, Handler, http_error
from conveyor.board import actions
from conveyor.board.present import FILTERS
from conveyor.board.security import SECURITY_HEADERS, guard_middleware
from conveyor.board.views import PAGES, html_view, index, live_view

HERE = Path(__file__).parent
PREFIX = "/admin"


#: Page titles of the statuses the board shows (the API's error table decides the status).
_TITLES = {400: "Bad request", 404: "Not found", 409: "Conflict", 429: "Busy", 503: "Unavailable"}


def _error_page(request: web.Request, error: ApiError, title: str | None = None) -> web.Response:
    """``error`` as an HTML page, or as the API's JSON error under ``/admin/api/``."""
    if request.path.startswith(PREFIX + "/api/"):
        response = error.response()
    else:
        context = {
            "title": title or _TITLES.get(error.status, "Error"),
            "message": error.message,
            "status": error.status,
            "nav": (),
            "section": "",
        }
        response = aiohttp_jinja2.render_template(
            "error.html", request, context, status=error.status
        )
        response.headers.update(error.headers)
    response.headers.update(SECURITY_HEADERS)
    return response


@web.middleware
async def error_pages(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Board errors as HTML pages (JSON under ``/admin/api/``). Status, code and message come
    from the API's one mapping (:func:`conveyor.api.errors.http_error`); redirects pass."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error_page(request, http_error(exc, where=_where(request)), exc.reason)
    except Exception as exc:
        return _error_page(request, http_error(exc, where=_where(request)))


def _where(request: web.Request) -> str:
    return f"{request.method} {request.path}"


def create_board() -> web.Application:
    """The board sub-application (mounted at ``/admin``)."""
    board = web.Application(middlewares=[error_pages, guard_middleware])
    aiohttp_jinja2.setup(
        board,
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        filters=FILTERS,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    aiohttp_jinja2.get_env(board).globals["version"] = __version__
    r = board.router
    r.add_get("", index)
    r.add_get("/", index)
    for name, path in (
        ("overview", "/queues"),
        ("queue", "/queues/{q}"),
        ("runs", "/runs"),
        ("run", "/runs/{id}"),
        ("flows", "/flows"),
        ("workers", "/workers"),
    ):
        r.add_get(path, html_view(PAGES[name]))
        r.add_get("/api" + path, live_view(PAGES[name]))
    r.add_post("/queues/{q}/pause", actions.pause_queue)
    r.add_post("/queues/{q}/resume", actions.resume_queue)
    r.add_post("/queues/{q}/clean", actions.clean_queue)
    r.add_post("/queues/{q}/retry-all", actions.retry_all)
    r.add_post("/queues/{q}/jobs/{id}/retry", actions.retry_job)
    r.add_post("/queues/{q}/jobs/{id}/delete", actions.delete_job)
    r.add_post("/runs/{id}/retry", actions.retry_run)
    r.add_post("/runs/{id}/cancel", actions.cancel_run)
    r.add_post("/flows/{id}/enable", actions.enable_flow)
    r.add_post("/flows/{id}/disable", actions.disable_flow)
    r.add_static("/static/", HERE / "static", name="static", append_version=True)
    return board


def setup_board(app: web.Application) -> None:
    """Mount the board on ``app`` at ``/admin``."""
    app.add_subapp(PREFIX, create_board())


__all__ = ["create_board", "setup_board"]
