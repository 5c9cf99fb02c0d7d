"""Typed ``web.AppKey`` s: the services one process holds, as :mod:`conveyor.app` builds them.

The composition root (:mod:`conveyor.app`) fills these in its ``cleanup_ctx`` generators; the
HTTP adapters (``api/``, ``board/``) and the per-process loops (heartbeat, metrics) read them
from the application. A handler that acts on flows, runs or queues takes the one
:class:`~conveyor.operations.Operations` service with :func:`operations_of`. The services
themselves (operations, engine, store, queue, sandbox) never see an application: they take
their dependencies as arguments (see docs/architecture.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from conveyor.settings import Settings
from conveyor.store.db import Database

if TYPE_CHECKING:
    from conveyor.engine.intake import WebhookIntake
    from conveyor.engine.registry import FlowRegistry
    from conveyor.engine.replies import ReplyHub
    from conveyor.engine.submit import Submitter
    from conveyor.engine.worker import RunWorker
    from conveyor.operations import Operations
    from conveyor.queue import Producer
    from conveyor.store.runs import RunWriter
    from conveyor.store.secrets import SecretBox


@dataclass
class ProcessState:
    """Mutable per-process flags (an app's mapping is frozen once it starts)."""

    started: bool = False


SETTINGS = web.AppKey("settings", Settings)
DB = web.AppKey("db", Database)
REDIS: web.AppKey[Any] = web.AppKey("redis")
STATE = web.AppKey("state", ProcessState)
PRODUCER: web.AppKey[Producer] = web.AppKey("producer")
RUN_WRITER: web.AppKey[RunWriter] = web.AppKey("run_writer")
REGISTRY: web.AppKey[FlowRegistry] = web.AppKey("registry")
SECRET_BOX: web.AppKey[SecretBox] = web.AppKey("secret_box")
REPLIES: web.AppKey[ReplyHub] = web.AppKey("replies")
#: The one way a run is inserted and enqueued (:mod:`conveyor.engine.submit`).
SUBMITTER: web.AppKey[Submitter] = web.AppKey("submitter")
#: Operator actions and admin reads (:mod:`conveyor.operations`), shared by API and board.
OPERATIONS: web.AppKey[Operations] = web.AppKey("operations")
#: Webhook intake (:mod:`conveyor.engine.intake`): built with the reply hub, API roles only.
INTAKE: web.AppKey[WebhookIntake] = web.AppKey("intake")
#: The worker role's :class:`~conveyor.engine.worker.RunWorker` (absent in an APP process).
WORKER: web.AppKey[RunWorker] = web.AppKey("worker")
#: The sandbox's isolation report (set by the worker role; readiness and metrics read it).
SANDBOX_REPORT = web.AppKey("sandbox_report", dict)


def operations_of(request: web.Request) -> Operations:
    """The process's :class:`~conveyor.operations.Operations`, from an API request or one to
    a sub-application mounted on it (the board)."""
    return request.config_dict[OPERATIONS]
