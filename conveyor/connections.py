"""Redis clients for every ``AP_REDIS_TYPE``: standalone, Sentinel, Cluster and embedded.

All return a ``redis.asyncio`` client with ``decode_responses=False`` (the queue stores orjson
bytes). The embedded server is a standalone Redis on a unix socket, so it takes the same path.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel

from conveyor.settings import RedisType, Settings

# Generous for one process: every queue consumer, the producer's pipelines and the sync waiters.
MAX_CONNECTIONS = 256


def create_redis(settings: Settings) -> Any:
    """A client for the configured Redis; raises ``RuntimeError`` if no URL is known yet."""
    opts: dict[str, Any] = {
        "decode_responses": False,
        "health_check_interval": 30,
        # A Redis that is down must surface quickly as QueueUnavailable (503 / reconciler),
        # not after a long connect. No socket_timeout: consumers block up to 1 s on reads.
        "socket_connect_timeout": 2.0,
    }
    if settings.redis_type is RedisType.SENTINEL:
        hosts = list(settings.redis_sentinel_hosts)
        sentinel = Sentinel(hosts, socket_timeout=5)  # type: ignore[no-untyped-call]
        if settings.redis_sentinel_role == "slave":
            return sentinel.slave_for(settings.redis_sentinel_name, **opts)
        return sentinel.master_for(settings.redis_sentinel_name, **opts)
    if not settings.redis_url:
        raise RuntimeError("no Redis URL: start the embedded servers first")
    if settings.redis_type is RedisType.CLUSTER:
        return RedisCluster.from_url(settings.redis_url, **opts)
    return aioredis.Redis.from_url(settings.redis_url, max_connections=MAX_CONNECTIONS, **opts)
