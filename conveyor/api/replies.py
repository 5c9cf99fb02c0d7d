"""Sync-webhook replies: the worker publishes, the API process holding the request receives.

Each API process subscribes to one Redis pub/sub channel of its own (one connection, however
many requests wait). A sync webhook registers its run id *before* the job is enqueued, so a
reply can never arrive before anyone listens; the job carries the channel name. The worker
publishes a ``respond`` message as soon as a respond step runs and a ``final`` message when
the run ends; the request takes whichever comes first.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import orjson
import structlog

from conveyor.aio import raise_if_cancelling
from conveyor.ids import uuid7
from conveyor.queue import keys as qkeys

log = structlog.get_logger(__name__)


class ReplyHub:
    """Routes reply messages from this process's channel to waiting requests.

    Parameters: ``redis`` (a ``redis.asyncio`` client; a dedicated pub/sub connection is taken
    from it). ``channel`` is unique per process.
    """

    def __init__(self, redis: Any) -> None:
        self.redis = redis
        self.channel = qkeys.reply_channel(str(uuid7()))
        self._waiters: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._listen())
        await asyncio.wait_for(self._ready.wait(), 10)

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        for fut in self._waiters.values():
            if not fut.done():
                fut.cancel()

    def register(self, run_id: str) -> asyncio.Future[dict[str, Any]]:
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters[run_id] = fut
        return fut

    def forget(self, run_id: str) -> None:
        self._waiters.pop(run_id, None)

    async def _listen(self) -> None:
        # Reconnect forever: a Redis restart must not leave sync webhooks deaf.
        while True:
            raise_if_cancelling()
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                self._ready.set()
                async for message in pubsub.listen():
                    raise_if_cancelling()
                    if message.get("type") == "message":
                        self._deliver(message["data"])
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                raise
            except Exception as exc:
                log.warning("reply channel lost, resubscribing", error=repr(exc))
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                await asyncio.sleep(0.5)

    def _deliver(self, data: bytes) -> None:
        try:
            message = orjson.loads(data)
            fut = self._waiters.get(message["run_id"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            log.warning("malformed reply message dropped")
            return
        if fut is not None and not fut.done():
            fut.set_result(message)


async def publish_reply(redis: Any, channel: str, message: dict[str, Any]) -> None:
    """Worker side: send ``message`` (must carry ``run_id``) to the waiting API process."""
    await redis.publish(channel, orjson.dumps(message, default=str))
