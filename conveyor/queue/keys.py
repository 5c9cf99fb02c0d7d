"""Every Redis key, stream and group name the queue uses, built in this one module.

Per-shard keys share the hash tag ``{<queue>:<shard>}`` so a stream, its delayed set, its index,
its dead letters and its counters live on one Redis Cluster slot and one Lua script may touch
them all atomically. Per-queue keys (pause flag, board history) use the tag ``{<queue>}``.
"""

from __future__ import annotations

import zlib
from enum import StrEnum

PREFIX = "conveyor"

#: One group name on every stream (each stream still has its own group): the same name lets a
#: single ``XREADGROUP … STREAMS s1 s2 …`` block on every queue at once.
GROUP = b"conveyor"


class QueueName(StrEnum):
    """The two queues. ``sync`` callers are waiting on an open HTTP request."""

    SYNC = "sync"
    RUNS = "runs"


#: Order in which consumers serve queues: a backlog of background runs never starves a caller.
PRIORITY: tuple[QueueName, ...] = (QueueName.SYNC, QueueName.RUNS)


def shard_for(key: str, shards: int) -> int:
    """The shard a job id (or dedup key) lives on; stable across processes and restarts."""
    if shards <= 1:
        return 0
    return zlib.crc32(key.encode()) % shards


class ShardKeys:
    """The keys of one queue shard (all in one Cluster slot).

    ``stream``: entries ``i`` (job id), ``p`` (payload), optional ``a`` (earlier deliveries),
    ``e`` (last error), ``t`` (first enqueue, ms). ``index``: job id → ``s:<entry id>`` |
    ``d`` | ``x:<dead entry id>``. ``count``: entries added and not yet acknowledged.
    """

    __slots__ = (
        "completed",
        "count",
        "dead",
        "delayed",
        "delayed_meta",
        "delayed_payload",
        "index",
        "queue",
        "shard",
        "stream",
        "tag",
    )

    def __init__(self, queue: str, shard: int) -> None:
        self.queue = queue
        self.shard = shard
        self.tag = f"{PREFIX}:{{{queue}:{shard}}}"
        self.stream = f"{self.tag}:stream".encode()
        self.index = f"{self.tag}:index".encode()
        self.count = f"{self.tag}:count".encode()
        self.delayed = f"{self.tag}:delayed".encode()
        self.delayed_payload = f"{self.tag}:delayed:payload".encode()
        self.delayed_meta = f"{self.tag}:delayed:meta".encode()
        self.dead = f"{self.tag}:dead".encode()
        self.completed = f"{self.tag}:completed".encode()

    def dedup(self, dedup_key: str) -> bytes:
        """Marker of a dedup key (value: the first job id, expires after the dedup window)."""
        return f"{self.tag}:dedup:{dedup_key}".encode()

    def throughput(self, bucket: int) -> bytes:
        """Hash ``{n: jobs acknowledged, w: sum of their waits in ms}`` for one time bucket."""
        return f"{self.tag}:tp:{bucket}".encode()

    def __repr__(self) -> str:
        return f"ShardKeys({self.queue!r}, {self.shard})"


def shard_keys(queue: str, shards: int) -> list[ShardKeys]:
    """Keys of every shard of ``queue``."""
    return [ShardKeys(queue, s) for s in range(shards)]


def paused(queue: str) -> bytes:
    """Present while ``queue`` is paused (every worker polls it)."""
    return f"{PREFIX}:{{{queue}}}:paused".encode()


def history(queue: str) -> bytes:
    """Capped list of 10-second samples of depth and throughput, newest first (the board)."""
    return f"{PREFIX}:{{{queue}}}:history".encode()


def history_lock(queue: str, slot: int) -> bytes:
    """Taken (``SET NX``) by whichever process records sample ``slot``, so it is recorded once."""
    return f"{PREFIX}:{{{queue}}}:history:lock:{slot}".encode()


def reply_channel(process_id: str) -> str:
    """Pub/sub channel on which one API process receives its sync webhooks' replies."""
    return f"{PREFIX}:replies:{process_id}"


def workers_index() -> bytes:
    """Sorted set of worker ids scored by their last heartbeat (epoch seconds): the registry."""
    return f"{PREFIX}:{{workers}}:index".encode()


def worker(worker_id: str) -> bytes:
    """Hash of one worker process's last heartbeat (expires when the process stops beating)."""
    return f"{PREFIX}:{{workers}}:worker:{worker_id}".encode()


def webhook_signature(flow_id: str, digest: str) -> bytes:
    """Marker of a timestamped webhook signature already accepted (``SET NX``, expiring with
    the signature's tolerance window): a replay of the same signed request is refused."""
    return f"{PREFIX}:sig:{flow_id}:{digest}".encode()


def scheduler_lease() -> bytes:
    """The schedule leader's lease: owner id, ``SET NX PX``, extended only by its owner."""
    return f"{PREFIX}:{{scheduler}}:lease".encode()
