"""Housekeeping any worker may run at any time: promote due delayed jobs, trim acknowledged
stream entries, expire dead letters, forget long-gone consumers.

Every step is one atomic script (or an idempotent command) per shard, so when every worker
runs them concurrently each delayed job is still promoted exactly once and nothing pending is
trimmed. Consumers call these on timers; the CLI and tests may call them directly.
"""

from __future__ import annotations

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from conveyor.queue import keys as k
from conveyor.queue.config import QueueConfig
from conveyor.queue.job import now_ms
from conveyor.queue.scripts import EXPIRE_DEAD, PROMOTE, TRIM

#: Most delayed jobs one promote call moves (bounds how long the script holds Redis).
PROMOTE_LIMIT = 1000
#: Most dead letters one expiry call drops.
EXPIRE_LIMIT = 1000


async def promote(redis: Redis, sk: k.ShardKeys, config: QueueConfig) -> tuple[int, int | None]:
    """Move due delayed jobs into the stream; returns (moved, next due epoch ms or None)."""
    moved, next_due = 0, None
    while True:
        reply = await PROMOTE(
            redis,
            [sk.stream, sk.index, sk.count, sk.delayed, sk.delayed_payload, sk.delayed_meta],
            [now_ms(), PROMOTE_LIMIT, config.stream_maxlen],
        )
        moved += int(reply[0])
        next_due = int(float(reply[1])) if len(reply) > 1 and reply[1] is not None else None
        if int(reply[0]) < PROMOTE_LIMIT:
            return moved, next_due


async def trim(redis: Redis, sk: k.ShardKeys) -> int:
    """Trim entries every consumer has acknowledged; returns how many were removed."""
    return int(await TRIM(redis, [sk.stream, sk.count], [k.GROUP]))


async def expire_dead(redis: Redis, sk: k.ShardKeys, config: QueueConfig) -> int:
    """Drop dead letters past the retention age or count; returns how many were dropped."""
    removed = 0
    cutoff = now_ms() - config.failed_retention_ms
    while True:
        n = int(
            await EXPIRE_DEAD(
                redis,
                [sk.dead, sk.index],
                [cutoff, config.failed_retention_max_count, EXPIRE_LIMIT],
            )
        )
        removed += n
        if n < EXPIRE_LIMIT:
            return removed


async def forget_idle_consumers(redis: Redis, sk: k.ShardKeys, idle_ms: int) -> int:
    """Delete group consumers with nothing pending that have been silent for ``idle_ms``.

    Consumer names are per process, so without this every restart would leave one behind
    and the consumer count on the board would only grow.
    """
    try:
        consumers = await redis.xinfo_consumers(sk.stream, k.GROUP)
    except ResponseError:  # no such stream or group yet
        return 0
    removed = 0
    for c in consumers:
        if int(c.get("pending", 0)) == 0 and int(c.get("idle", 0)) >= idle_ms:
            await redis.xgroup_delconsumer(sk.stream, k.GROUP, c["name"])
            removed += 1
    return removed


async def housekeep(redis: Redis, config: QueueConfig, queues: tuple[str, ...]) -> None:
    """One round of every housekeeping step on every shard of ``queues``."""
    for queue in queues:
        for sk in config.shard_keys(queue):
            await promote(redis, sk, config)
            await trim(redis, sk)
            await expire_dead(redis, sk, config)
