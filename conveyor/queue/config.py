"""Tuning of the queue: the ``AP_*`` values it honours plus timeouts tests may shorten.

Production builds it with :meth:`QueueConfig.from_settings`; tests construct it directly with
sub-second visibility timeouts and backoffs so fault scenarios finish quickly.
"""

from __future__ import annotations

import dataclasses
import random
from typing import TYPE_CHECKING, Any

from conveyor.queue import keys as k

if TYPE_CHECKING:
    from conveyor.settings import Settings


@dataclasses.dataclass(frozen=True, slots=True)
class QueueConfig:
    """Queue parameters (the ``AP_QUEUE_*`` settings of docs/configuration.md).

    :param shards: streams per queue (``AP_QUEUE_SHARDS``), default 1.
    :param max_length: backlog cap per queue, waiting + delayed entries
        (``AP_QUEUE_MAX_LENGTH``), default 100 000; split evenly across shards.
    :param failed_retention_days: dead letters older than this are dropped, default 30.
    :param failed_retention_max_count: at most this many dead letters per shard, default 100 000.
    :param completed_retention_max_count: completed summaries kept per shard, default 1000.
    :param concurrency: jobs one consumer runs at once (``AP_WORKER_CONCURRENCY``), default 1.
    :param visibility_timeout_s: a consumer silent this long (and its untouched entries) is
        taken over by any live worker (``AP_QUEUE_VISIBILITY_TIMEOUT_SECONDS``), default 6.
    :param heartbeat_s: in-flight entries are touched this often (``AP_WORKER_HEARTBEAT_SECONDS``),
        default 2.
    :param max_deliveries: deliveries before an entry is dead-lettered, default 5.
    :param transient_retry_max_s: how long a job failing because a backend is down is retried
        without spending a delivery, counted from its first such failure; after that each
        failure spends one, so a job misjudged as "backend down" still reaches the dead
        letters. Default 600.
    :param backoff_base_s: first retry delay, doubled per attempt, default 1.
    :param backoff_cap_s: longest retry delay, default 300.
    :param backoff_jitter: relative jitter of a retry delay (0.2 = ±20 %), default 0.2.
    :param block_ms: how long an idle consumer blocks in ``XREADGROUP``, default 1000.
    :param delayed_poll_s: how often delayed entries are promoted, default 0.25.
    :param reclaim_interval_s: how often the whole pending list is scanned for idle entries
        (a backstop: silent consumers are found every :attr:`takeover_every_s` without a
        scan); default 2.5 visibility timeouts.
    :param trim_interval_s: how often acknowledged entries are trimmed, default 5.
    :param retention_interval_s: how often dead letters are expired, default 60.
    :param pause_poll_s: how quickly a pause reaches every worker, default 0.5.
    :param dedup_window_s: how long a ``dedup_key`` maps to its first job, default 86 400.
    :param enqueue_batch_max: most jobs per coalesced enqueue script call, default 500.
    :param sample_interval_s: board history sampling period, default 10.
    :param history_length: samples kept per queue (15 minutes at 10 s), default 90.
    :param key_prefix: namespace of every Redis key (``AP_REDIS_KEY_PREFIX``), default
        ``conveyor``.
    """

    shards: int = 1
    max_length: int = 100_000
    failed_retention_days: int = 30
    failed_retention_max_count: int = 100_000
    completed_retention_max_count: int = 1000
    concurrency: int = 1
    visibility_timeout_s: float = 6.0
    heartbeat_s: float = 2.0
    max_deliveries: int = 5
    transient_retry_max_s: float = 600.0
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 300.0
    backoff_jitter: float = 0.2
    block_ms: int = 1000
    delayed_poll_s: float = 0.25
    reclaim_interval_s: float | None = None
    trim_interval_s: float = 5.0
    retention_interval_s: float = 60.0
    pause_poll_s: float = 0.5
    dedup_window_s: int = 86_400
    enqueue_batch_max: int = 500
    sample_interval_s: float = 10.0
    history_length: int = 90
    key_prefix: str = k.PREFIX

    def __post_init__(self) -> None:
        if self.shards < 1 or self.max_length < 1 or self.concurrency < 1:
            raise ValueError("shards, max_length and concurrency must be >= 1")
        if self.max_deliveries < 1:
            raise ValueError("max_deliveries must be >= 1")
        if self.transient_retry_max_s < 0:
            raise ValueError("transient_retry_max_s must be >= 0")
        if self.heartbeat_s >= self.visibility_timeout_s:
            # A heartbeat slower than the visibility timeout lets live work be stolen.
            raise ValueError("heartbeat_s must be shorter than visibility_timeout_s")
        if not self.key_prefix or "{" in self.key_prefix or "}" in self.key_prefix:
            raise ValueError("key_prefix must be non-empty and without braces")

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> QueueConfig:
        """The configuration the ``AP_*`` variables ask for, with ``overrides`` applied."""
        base = cls(
            shards=settings.queue_shards,
            max_length=settings.queue_max_length,
            failed_retention_days=settings.redis_failed_job_retention_days,
            failed_retention_max_count=settings.redis_failed_job_retention_max_count,
            completed_retention_max_count=settings.redis_completed_job_retention_max_count,
            concurrency=settings.worker_concurrency,
            visibility_timeout_s=float(settings.queue_visibility_timeout_seconds),
            heartbeat_s=float(settings.worker_heartbeat_seconds),
            key_prefix=settings.redis_key_prefix,
        )
        return dataclasses.replace(base, **overrides) if overrides else base

    @property
    def shard_max_length(self) -> int:
        """Backlog cap of one shard (the queue's cap split evenly, at least 1)."""
        return max(1, -(-self.max_length // self.shards))

    @property
    def stream_maxlen(self) -> int:
        """``XADD MAXLEN ~`` memory bound: twice the backlog cap, so only acknowledged entries
        are ever cut in practice (trimming by ``MINID`` normally keeps the stream far shorter)."""
        return 2 * self.shard_max_length

    @property
    def visibility_timeout_ms(self) -> int:
        return int(self.visibility_timeout_s * 1000)

    @property
    def reclaim_every_s(self) -> float:
        if self.reclaim_interval_s is not None:
            return self.reclaim_interval_s
        return self.visibility_timeout_s * 2.5

    @property
    def takeover_guard_s(self) -> float:
        """How long a consumer that saw Redis fail must then reach it without a failure before
        it claims other consumers' entries (plus the Redis client's longest retry pause, added
        by the consumer). During an outage every consumer's idle time grows, live or not; once
        Redis answers again a live consumer touches its entries within a heartbeat (its loop
        does not back off; a touch already waiting in the client's retry pause goes out when
        that pause ends). A visibility timeout plus a heartbeat covers that with room to spare:
        the allowance a live consumer has between two beats in normal operation."""
        return self.visibility_timeout_s + self.heartbeat_s

    @property
    def ownership_margin_s(self) -> float:
        """A delivery touched this recently is surely still this consumer's: nobody may
        claim it before it is a visibility timeout idle, and a heartbeat is left for the write
        the check guards."""
        return self.visibility_timeout_s - self.heartbeat_s

    @property
    def takeover_every_s(self) -> float:
        """How often consumers look for silent ones to take over: at most 1 s, so takeover
        comes at most a second after the visibility timeout."""
        return min(1.0, self.heartbeat_s / 2)

    def shard_keys(self, queue: str) -> list[k.ShardKeys]:
        """Keys of every shard of ``queue`` under this configuration's prefix."""
        return k.shard_keys(queue, self.shards, self.key_prefix)

    @property
    def failed_retention_ms(self) -> int:
        return self.failed_retention_days * 86_400_000

    def backoff_s(self, attempt: int) -> float:
        """Delay before delivery ``attempt + 1`` after delivery ``attempt`` (1-based) raised."""
        raw = self.backoff_base_s * float(2 ** max(0, attempt - 1))
        delay = min(self.backoff_cap_s, raw)
        jitter = delay * self.backoff_jitter
        return max(0.0, delay + random.uniform(-jitter, jitter))
