"""Typed ``web.AppKey`` s for everything a request handler can reach through ``request.app``."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from conveyor.settings import Settings
from conveyor.store.db import Database

SETTINGS = web.AppKey("settings", Settings)
DB = web.AppKey("db", Database)
REDIS: web.AppKey[Any] = web.AppKey("redis")
STARTED = web.AppKey("started", bool)
