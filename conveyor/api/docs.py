"""``/api/docs``: interactive API docs (Swagger UI) rendered from the generated OpenAPI document.

Everything the page loads comes from this process: the viewer's files are those shipped by the
``swagger-ui-bundle`` package (no CDN), the start-up script is ours, and the document is the
one :func:`conveyor.api.openapi.build_spec` builds from the route table. The page and its
document are public (they describe routes, not data); every API call made from the page's
"Try it out" needs the API key, entered once with the Authorize button (bearer scheme). A
strict Content-Security-Policy keeps the page from talking to anything but this origin.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiohttp import web
from swagger_ui_bundle import swagger_ui_path  # type: ignore[import-untyped]

from conveyor.api.errors import ApiError, json_response
from conveyor.api.openapi import build_spec

PAGE_PATH = "/api/docs"
SPEC_PATH = "/api/docs/openapi.json"
ASSETS_PREFIX = "/api/docs/assets/"

#: The files the page needs, by the name it asks for; nothing else is served.
_VIEWER_FILES = ("swagger-ui.css", "swagger-ui-bundle.js", "favicon-32x32.png")
_TYPES = {".css": "text/css", ".js": "text/javascript", ".png": "image/png"}

# No inline script: the viewer starts from init.js. Swagger UI sets inline styles, and
# shows images of the schema as data: URLs.
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; connect-src 'self'; font-src 'self'; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}

# validatorUrl null: otherwise the viewer sends the document to a public validator.
_INIT_JS = f"""window.addEventListener("load", function () {{
  window.ui = SwaggerUIBundle({{
    url: "{SPEC_PATH}",
    dom_id: "#swagger-ui",
    deepLinking: true,
    validatorUrl: null,
    filter: true,
    displayRequestDuration: true,
    tryItOutEnabled: false,
    persistAuthorization: false,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout"
  }});
}});
"""

_PAGE = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Conveyor API</title>
<link rel="icon" type="image/png" href="{ASSETS_PREFIX}favicon-32x32.png">
<link rel="stylesheet" href="{ASSETS_PREFIX}swagger-ui.css">
</head>
<body>
<div id="swagger-ui"></div>
<script src="{ASSETS_PREFIX}swagger-ui-bundle.js"></script>
<script src="{ASSETS_PREFIX}init.js"></script>
</body>
</html>
"""


_VIEWER_DIR = Path(swagger_ui_path)
_cache: dict[str, bytes] = {}


async def docs_page(request: web.Request) -> web.Response:
    """Interactive API docs (Swagger UI), served from the package; no CDN."""
    return web.Response(text=_PAGE, content_type="text/html", headers=_HEADERS)


async def docs_spec(request: web.Request) -> web.Response:
    """The OpenAPI document for the docs page (public: routes, not data)."""
    return json_response(build_spec(request.app), headers=_HEADERS)


async def docs_asset(request: web.Request) -> web.Response:
    """A static file of the docs page (the viewer's CSS and script, the start-up script)."""
    name = request.match_info["name"]
    headers = {**_HEADERS, "Cache-Control": "public, max-age=3600"}
    if name == "init.js":
        return web.Response(text=_INIT_JS, content_type="text/javascript", headers=headers)
    if name not in _VIEWER_FILES:
        raise ApiError(404, "NOT_FOUND", "no such file")
    body = _cache.get(name)
    if body is None:
        # Read once, off the event loop (the viewer's script is about 1 MB).
        loop = asyncio.get_running_loop()
        body = _cache[name] = await loop.run_in_executor(None, (_VIEWER_DIR / name).read_bytes)
    ctype = _TYPES[name[name.rindex(".") :]]
    return web.Response(body=body, content_type=ctype, headers=headers)


def add_docs_routes(router: web.UrlDispatcher) -> None:
    """The page, its OpenAPI document and its assets."""
    router.add_get(PAGE_PATH, docs_page)
    router.add_get(SPEC_PATH, docs_spec)
    router.add_get(ASSETS_PREFIX + "{name}", docs_asset)
