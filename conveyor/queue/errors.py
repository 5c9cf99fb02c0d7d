"""Exceptions the queue raises, on the project's error tree (:mod:`conveyor.errors`).

::

    ConveyorError
    └── QueueError
        ├── QueueFull          backlog over AP_QUEUE_MAX_LENGTH: 429 + Retry-After: 1
        ├── QueueUnavailable   Redis down, loading or read-only (a BackendUnavailable: 503)
        └── JobNotFound        an admin call named a job the queue lacks (a NotFound: 404)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.exceptions as rexc

from conveyor.errors import BackendUnavailable, ConveyorError, NotFound


class QueueError(ConveyorError):
    """Root of the queue's exceptions."""


class QueueFull(QueueError):
    """The queue's backlog is at its cap; ``retry_after_s`` is what the API puts in the header."""

    code = "QUEUE_FULL"
    retry_after_s = 1

    def __init__(self, queue: str, cap: int) -> None:
        super().__init__(f"queue {queue!r} is full ({cap} jobs waiting or delayed)")
        self.queue = queue
        self.cap = cap


class QueueUnavailable(QueueError, BackendUnavailable):
    """Redis cannot be reached or cannot accept writes right now."""

    def __init__(self, message: str) -> None:
        BackendUnavailable.__init__(self, "Redis", message)


class JobNotFound(QueueError, NotFound, KeyError):
    """No job with this id in the state the caller named."""

    def __init__(self, queue: str, job_id: str) -> None:
        QueueError.__init__(self, f"job {job_id!r} not found in queue {queue!r}")
        self.queue = queue
        self.job_id = job_id

    def __str__(self) -> str:
        return str(self.args[0])


#: What a failed Redis call raises: redis-py's errors, socket errors, and a cluster client's
#: ``RedisClusterException`` — not a ``RedisError``: ``RedisCluster`` raises it when its nodes
#: disagree on the slot map or leave slots uncovered, as during a master's failover.
REDIS_FAILURES = (rexc.RedisError, OSError, rexc.RedisClusterException)

_UNAVAILABLE_PREFIXES = ("LOADING", "MISCONF", "MASTERDOWN", "READONLY", "TRYAGAIN", "CLUSTERDOWN")


def is_unavailable(exc: BaseException) -> bool:
    """True when ``exc`` means "Redis is down or not writable", not "we sent a bad command"."""
    if isinstance(exc, (rexc.ConnectionError, rexc.TimeoutError, OSError)):
        return True
    if isinstance(exc, rexc.RedisClusterException):
        return True  # the cluster's slot map is in flux (a failover): try again later
    if isinstance(exc, rexc.ResponseError):
        return str(exc).startswith(_UNAVAILABLE_PREFIXES)
    return False


@asynccontextmanager
async def unavailable_as_typed() -> AsyncIterator[None]:
    """Re-raise connection-level Redis failures as :class:`QueueUnavailable`."""
    try:
        yield
    except (rexc.RedisError, rexc.RedisClusterException) as exc:
        if is_unavailable(exc):
            raise QueueUnavailable(str(exc)) from exc
        raise
    except OSError as exc:
        raise QueueUnavailable(str(exc)) from exc
