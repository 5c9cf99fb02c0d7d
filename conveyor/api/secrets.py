"""``/api/v1/secrets``: set (``PUT {"value"}``), list names, delete. Values are never returned."""

from __future__ import annotations

import re

import orjson
from aiohttp import web

from conveyor.api.errors import ApiError, json_response
from conveyor.keys import DB, SECRET_BOX
from conveyor.store import secrets as secret_store

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}\Z")


def _name(request: web.Request) -> str:
    name = request.match_info["name"]
    if not NAME.match(name):  # \Z, not $: "A\n" is not a name
        raise ApiError(400, "BAD_REQUEST", "secret names match [A-Za-z_][A-Za-z0-9_]*")
    return name


async def put_secret(request: web.Request) -> web.Response:
    name = _name(request)
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise ApiError(400, "BAD_REQUEST", 'body must be JSON {"value": "..."}') from None
    value = body.get("value") if isinstance(body, dict) else None
    if not isinstance(value, str):
        raise ApiError(400, "BAD_REQUEST", 'body must be JSON {"value": "<string>"}')
    created = await secret_store.put_secret(request.app[DB], request.app[SECRET_BOX], name, value)
    return json_response({"name": name}, status=201 if created else 200)


async def list_secrets(request: web.Request) -> web.Response:
    rows = await secret_store.list_secret_names(request.app[DB])
    return json_response({"data": rows, "next_cursor": None})


async def delete_secret(request: web.Request) -> web.Response:
    await secret_store.delete_secret(request.app[DB], _name(request))
    return web.Response(status=204)
