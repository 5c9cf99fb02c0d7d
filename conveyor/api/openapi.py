"""``/api/v1/openapi.json``, generated from the application's route table.

Every route registered on the router appears (except the board's HTML pages and assets under
``/admin/``, which are not an API), so the document cannot drift from the code; a test checks
that. Handlers' docstrings become the operations' summaries. The version is OpenAPI 3.0.3,
which the docs page's viewer (``/api/docs``, :mod:`conveyor.api.docs`) renders.
"""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from conveyor import __version__
from conveyor.api.errors import json_response

#: The board (HTML, static assets, its own live-refresh JSON) is left out of the API document.
BOARD_PREFIX = "/admin/"
_PARAM = re.compile(r"\{([^}:]+)(?::[^}]*)?\}")


def _slug(path: str) -> str:
    """``/api/v1/flows/{id}/run`` → ``api_v1_flows_id_run``: unique per path."""
    slug = re.sub(r"[^A-Za-z0-9]+", "_", path).strip("_") or "root"
    return slug + "_slash" if len(path) > 1 and path.endswith("/") else slug


def build_spec(app: web.Application) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource else {}
        path = (
            info.get("path")
            or info.get("formatter")
            or (info.get("prefix", "") + "/{filename}" if "prefix" in info else None)
        )
        if not path or route.method == "HEAD" or path.startswith(BOARD_PREFIX):
            continue
        path = _PARAM.sub(r"{\1}", path)
        methods = (
            ["get", "post", "put", "patch", "delete"]
            if route.method == "*"
            else [route.method.lower()]
        )
        for method in methods:
            doc = (route.handler.__doc__ or route.handler.__name__).strip().splitlines()[0]
            op: dict[str, Any] = {
                "operationId": f"{method}_{_slug(path)}",
                "summary": doc,
                "responses": {
                    "default": {"description": 'JSON; errors are {"error": {"code", "message"}}'}
                },
            }
            if path.startswith("/api/v1/") and not path.startswith("/api/v1/webhooks/"):
                op["security"] = [{"bearer": []}]  # enforced whenever AP_API_KEY is set
            params = _PARAM.findall(path)
            if params:
                op["parameters"] = [
                    {"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
                    for p in params
                ]
            paths.setdefault(path, {})[method] = op
    return {
        "openapi": "3.0.3",
        "info": {"title": "Conveyor", "version": __version__},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": dict(sorted(paths.items())),
    }


async def openapi(request: web.Request) -> web.Response:
    """The OpenAPI document of this API."""
    return json_response(build_spec(request.app))
