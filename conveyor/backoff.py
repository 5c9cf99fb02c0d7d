"""Retrying a backend that went away: jittered exponential backoff and quiet logging.

Every background loop that talks to Redis or PostgreSQL (queue consumer, acknowledgements,
heartbeats, housekeeping, the board's sampler, the reconciler, the scheduler) keeps one
:class:`Outage` per operation. While the backend fails, :meth:`Outage.failed` hands out the
next delay — exponential from ``base_s`` up to ``cap_s``, drawn uniformly from the upper half
of that range so many processes that lost Redis together do not reconnect in lock-step — and
counts the error in ``conveyor_backend_errors_total{backend,op}``. Only two lines are logged
per outage and process, whichever loop notices: one when the backend's first error arrives,
one (with the duration) when any operation on it succeeds again. A loop that retried at full
speed while Redis was down used to take a whole core and write thousands of lines a second;
with this it sleeps and stays silent.
"""

from __future__ import annotations

import random
import time

import structlog

from conveyor import metrics

log = structlog.get_logger(__name__)

#: backend → ``time.monotonic()`` of this process's first error of the current outage.
_DOWN: dict[str, float] = {}


def jittered(delay_s: float) -> float:
    """``delay_s`` spread over its upper half: ``[delay_s / 2, delay_s]``."""
    return random.uniform(delay_s / 2, delay_s)


class Outage:
    """The availability of one backend as seen by one retrying operation.

    :param backend: ``redis`` or ``postgres`` (the metric's ``backend`` label).
    :param op: what was being done, e.g. ``fetch``, ``ack``, ``heartbeat`` (the ``op`` label).
    :param base_s: first delay after an error, default 0.1 s.
    :param cap_s: longest delay, default 5 s.
    """

    __slots__ = ("_delay", "backend", "base_s", "cap_s", "errors", "op", "since")

    def __init__(self, backend: str, op: str, *, base_s: float = 0.1, cap_s: float = 5.0) -> None:
        self.backend = backend
        self.op = op
        self.base_s = base_s
        self.cap_s = cap_s
        #: Errors since the outage began (0 while the backend answers).
        self.errors = 0
        #: ``time.monotonic()`` of the outage's first error, ``None`` while healthy.
        self.since: float | None = None
        self._delay = base_s

    @property
    def down(self) -> bool:
        return self.since is not None

    def failed(self, exc: BaseException | str) -> float:
        """Record one error; returns how long to sleep before trying again."""
        _count(self.backend, self.op)
        self.errors += 1
        if self.since is None:
            self.since = time.monotonic()
            self._delay = self.base_s
        if self.backend not in _DOWN:
            _DOWN[self.backend] = time.monotonic()
            log.warning(
                "backend.unavailable", backend=self.backend, op=self.op, error=str(exc)[:500]
            )
        delay = jittered(self._delay)
        self._delay = min(self._delay * 2, self.cap_s)
        return delay

    def ok(self) -> None:
        """Record a success; logs the end of an outage once per process."""
        if self.since is None:
            return
        began = _DOWN.pop(self.backend, None)
        if began is not None:
            log.warning(
                "backend.recovered",
                backend=self.backend,
                op=self.op,
                down_s=round(time.monotonic() - began, 1),
            )
        self.since = None
        self.errors = 0
        self._delay = self.base_s


def _count(backend: str, op: str) -> None:
    metrics.BACKEND_ERRORS.labels(backend, op).inc()
