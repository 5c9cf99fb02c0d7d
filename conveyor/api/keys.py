"""Typed ``web.AppKey`` s for everything a request handler can reach through ``request.app``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from conveyor.settings import Settings
from conveyor.store.db import Database

if TYPE_CHECKING:
    from conveyor.api.replies import ReplyHub
    from conveyor.engine.registry import FlowRegistry
    from conveyor.queue import Producer
    from conveyor.store.runs import RunWriter
    from conveyor.store.secrets import SecretBox

SETTINGS = web.AppKey("settings", Settings)
DB = web.AppKey("db", Database)
REDIS: web.AppKey[Any] = web.AppKey("redis")


@dataclass
class ProcessState:
    """Mutable per-process flags (an app's mapping is frozen once it starts)."""

    started: bool = False


STATE = web.AppKey("state", ProcessState)
PRODUCER: web.AppKey[Producer] = web.AppKey("producer")
RUN_WRITER: web.AppKey[RunWriter] = web.AppKey("run_writer")
REGISTRY: web.AppKey[FlowRegistry] = web.AppKey("registry")
SECRET_BOX: web.AppKey[SecretBox] = web.AppKey("secret_box")
REPLIES: web.AppKey[ReplyHub] = web.AppKey("replies")
