"""Every Redis key, stream and group name the queue uses, built in this one module.

Per-shard keys share the hash tag ``{<queue>:<shard>}`` so a stream, its delayed set, its index,
its dead letters and its counters live on one Redis Cluster slot and one Lua script may touch
them all atomically. Per-queue keys (pause flag, board history) use the tag ``{<queue>}``.

Every name starts with the deployment's prefix (``AP_REDIS_KEY_PREFIX``, default
:data:`PREFIX`), outside the hash tag: two deployments sharing one Redis database never see
each other's keys, streams or channels.
"""

from __future__ import annotations

import zlib
from enum import StrEnum

#: The default key prefix (``AP_REDIS_KEY_PREFIX``).
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

    def __init__(self, queue: str, shard: int, prefix: str = PREFIX) -> None:
        self.queue = queue
        self.shard = shard
        self.tag = f"{prefix}:{{{queue}:{shard}}}"
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


def shard_keys(queue: str, shards: int, prefix: str = PREFIX) -> list[ShardKeys]:
    """Keys of every shard of ``queue``."""
    return [ShardKeys(queue, s, prefix) for s in range(shards)]


def paused(queue: str, prefix: str = PREFIX) -> bytes:
    """Present while ``queue`` is paused (every worker polls it)."""
    return f"{prefix}:{{{queue}}}:paused".encode()


def history(queue: str, prefix: str = PREFIX) -> bytes:
    """Capped list of 10-second samples of depth and throughput, newest first (the board)."""
    return f"{prefix}:{{{queue}}}:history".encode()


def history_lock(queue: str, slot: int, prefix: str = PREFIX) -> bytes:
    """Taken (``SET NX``) by whichever process records sample ``slot``, so it is recorded once."""
    return f"{prefix}:{{{queue}}}:history:lock:{slot}".encode()


def reply_channel(process_id: str, prefix: str = PREFIX) -> str:
    """Pub/sub channel on which one API process receives its sync webhooks' replies."""
    return f"{prefix}:replies:{process_id}"


def workers_index(prefix: str = PREFIX) -> bytes:
    """Sorted set of worker ids scored by their last heartbeat (epoch seconds): the registry."""
    return f"{prefix}:{{workers}}:index".encode()


def worker(worker_id: str, prefix: str = PREFIX) -> bytes:
    """Hash of one worker process's last heartbeat (expires when the process stops beating)."""
    return f"{prefix}:{{workers}}:worker:{worker_id}".encode()


def consumer_name(name: str, prefix: str = PREFIX) -> bytes:
    """Lease on a stable consumer name (``SET NX PX``, renewed by its holder): two live
    processes never share one name, so neither can take the other's entries for its own."""
    return f"{prefix}:{{workers}}:consumer:{name}".encode()


def webhook_signature(digest: str, prefix: str = PREFIX) -> bytes:
    """Marker of a timestamped webhook signature already accepted (``SET NX``, expiring with
    the signature's tolerance window): a replay of the same signed request is refused."""
    return f"{prefix}:sig:{digest}".encode()


def scheduler_lease(prefix: str = PREFIX) -> bytes:
    """The schedule leader's lease: owner id, ``SET NX PX``, extended only by its owner."""
    return f"{prefix}:{{scheduler}}:lease".encode()
