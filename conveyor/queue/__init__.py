"""Conveyor's in-house job queue on Redis Streams.

:class:`Producer` enqueues (coalesced, durable, capped), :class:`Consumer` runs handlers with
batched acknowledgements, heartbeats, reclaim, retries with backoff and a dead-letter stream;
:class:`QueueAdmin` lists, retries, deletes, cleans, pauses and measures; :class:`Sampler`
records the board's history. Key names live in :mod:`conveyor.queue.keys`.
"""

from __future__ import annotations

from conveyor.queue.admin import QueueAdmin
from conveyor.queue.config import QueueConfig
from conveyor.queue.consumer import Consumer, DeadHandler, Handler
from conveyor.queue.errors import JobNotFound, QueueError, QueueFull, QueueUnavailable
from conveyor.queue.job import LIVE, Job, JobInfo, JobState, Location
from conveyor.queue.keys import PRIORITY, QueueName
from conveyor.queue.producer import Producer
from conveyor.queue.stats import QueueStats, Sampler

__all__ = [
    "LIVE",
    "PRIORITY",
    "Consumer",
    "DeadHandler",
    "Handler",
    "Job",
    "JobInfo",
    "JobNotFound",
    "JobState",
    "Location",
    "Producer",
    "QueueAdmin",
    "QueueConfig",
    "QueueError",
    "QueueFull",
    "QueueName",
    "QueueStats",
    "QueueUnavailable",
    "Sampler",
]
