"""Sync-webhook replies: the worker publishes, the API process holding the request receives.

Each API process subscribes to one Redis pub/sub channel of its own (one connection, however
many requests wait). A sync webhook registers its run id *before* the job is enqueued, so a
reply can never arrive before anyone listens; the job carries the channel name. The worker
publishes a ``respond`` message as soon as a respond step runs and a ``final`` message when
the run ends; the request takes whichever comes first.

Pub/sub is transport, not a step, and at most once: the worker retries a publish a few times
and never lets a lost reply change a run's outcome, and the waiting request falls back to what
PostgreSQL stored — when its channel had to be resubscribed (a Redis restart), every
:data:`STORE_POLL_S` while it waits, and at the timeout (:meth:`ReplyHub.wait`).

A reply for a hub of the worker's own process (``WORKER_AND_APP``, where the request often
waits in the process that runs its job) is handed to that hub in memory: the same bytes,
decoded and routed by the same code as a message from the channel, without the round trip
through Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import structlog
from redis.asyncio.cluster import RedisCluster

from conveyor import metrics
from conveyor.aio import raise_if_cancelling
from conveyor.backoff import Outage, jittered
from conveyor.ids import uuid7
from conveyor.queue import keys as qkeys
from conveyor.queue.errors import REDIS_FAILURES
from conveyor.status import TERMINAL
from conveyor.store import runs as run_store

log = structlog.get_logger(__name__)

#: A waiting sync request looks at the stored run this often (a reply may have been lost).
STORE_POLL_S = 5.0
#: Publish attempts before a reply is given up (the caller then reads PostgreSQL).
PUBLISH_ATTEMPTS = 5

_TERMINAL_VALUES = frozenset(s.value for s in TERMINAL)

#: The started hubs of this process by channel (see the module docstring).
_LOCAL_HUBS: weakref.WeakValueDictionary[str, ReplyHub] = weakref.WeakValueDictionary()


class ReplyHub:
    """Routes reply messages from this process's channel to waiting requests.

    Parameters: ``redis`` (a ``redis.asyncio`` client; a dedicated pub/sub connection is taken
    from it) and the key ``prefix`` (``AP_REDIS_KEY_PREFIX``). ``channel`` is unique per
    process.
    """

    def __init__(self, redis: Any, prefix: str = qkeys.PREFIX) -> None:
        self.redis = redis
        self.channel = qkeys.reply_channel(str(uuid7()), prefix)
        self._waiters: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._task: asyncio.Task[None] | None = None
        #: The event loop the hub was started on (its waiters' loop).
        self.loop: asyncio.AbstractEventLoop | None = None
        self._ready = asyncio.Event()
        #: Resolved (and replaced) whenever the channel is subscribed again after a loss:
        #: replies published meanwhile are gone, so waiters look at PostgreSQL.
        self._gap: asyncio.Future[None] | None = None

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._listen())
        await asyncio.wait_for(self._ready.wait(), 10)
        _LOCAL_HUBS[self.channel] = self

    async def close(self) -> None:
        if _LOCAL_HUBS.get(self.channel) is self:
            del _LOCAL_HUBS[self.channel]
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

    async def wait(
        self,
        waiter: asyncio.Future[dict[str, Any]],
        timeout_s: float,
        load_final: Callable[[], Awaitable[dict[str, Any] | None]],
    ) -> dict[str, Any] | None:
        """The reply ``waiter`` receives, else the final state ``load_final`` reads from the
        store, within ``timeout_s``; ``None`` if the run has not ended by then.

        The store is read after a channel gap, every :data:`STORE_POLL_S` and at the end; the
        last read's errors propagate (the caller answers 503 with the run id to poll).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not waiter.done():
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            # Until the reply, a channel gap or the next look at the store: asyncio.wait's
            # FIRST_COMPLETED without its sets and bookkeeping (this is every sync webhook).
            gap = self._gap_future()
            wake: asyncio.Future[None] = loop.create_future()

            def woken(_: object = None, wake: asyncio.Future[None] = wake) -> None:
                if not wake.done():
                    wake.set_result(None)

            waiter.add_done_callback(woken)
            gap.add_done_callback(woken)
            timer = loop.call_later(min(remaining, STORE_POLL_S), woken)
            try:
                await wake
            finally:
                timer.cancel()
                waiter.remove_done_callback(woken)
                gap.remove_done_callback(woken)
            if waiter.done() or deadline - loop.time() <= 0:
                break
            try:
                found = await load_final()
            except Exception as exc:  # PostgreSQL down too: keep waiting for the reply
                log.debug("reply.store_read_failed", error=repr(exc))
                continue
            if found is not None:
                return found
        if waiter.done() and not waiter.cancelled():
            return waiter.result()
        return await load_final()

    def _gap_future(self) -> asyncio.Future[None]:
        if self._gap is None or self._gap.done():
            self._gap = asyncio.get_running_loop().create_future()
        return self._gap

    async def _listen(self) -> None:
        # Reconnect forever: a Redis restart must not leave sync webhooks deaf.
        outage = Outage("redis", "replies", base_s=0.1, cap_s=2.0)
        subscribed = False
        while True:
            raise_if_cancelling()
            # Subscribe confirmations are kept: redis-py may reconnect and resubscribe on its
            # own, and a second confirmation is the only sign that replies may have been lost.
            pubsub = self.redis.pubsub(ignore_subscribe_messages=False)
            try:
                await pubsub.subscribe(self.channel)
                async for message in pubsub.listen():
                    raise_if_cancelling()
                    kind = message.get("type")
                    if kind == "message":
                        self._deliver(message["data"])
                    elif kind == "subscribe":
                        outage.ok()
                        if subscribed:
                            self._signal_gap()
                        subscribed = True
                        self._ready.set()
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                raise
            except Exception as exc:
                delay = outage.failed(exc)
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                await asyncio.sleep(delay)

    def _signal_gap(self) -> None:
        if self._gap is not None and not self._gap.done():
            self._gap.set_result(None)

    def _deliver(self, data: bytes) -> None:
        try:
            message = orjson.loads(data)
            fut = self._waiters.get(message["run_id"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            log.warning("malformed reply message dropped")
            return
        if fut is not None and not fut.done():
            fut.set_result(message)


async def publish_reply(redis: Any, channel: str, message: dict[str, Any]) -> bool:
    """Worker side: send ``message`` (must carry ``run_id``) to the waiting API process.

    Retried with jittered backoff (a pooled connection gone stale in a Redis restart fails
    once); never raises for Redis: returns False when the reply could not be sent, and the
    caller reads the stored result instead.
    """
    data = orjson.dumps(message, default=str)
    if _handed_over(channel, data):
        return True
    return await _publish_retrying(redis, channel, data, message)


def _handed_over(channel: str, data: bytes) -> bool:
    """Deliver ``data`` to a hub of this process listening on ``channel``, if there is one
    on this event loop (what its listener would do with the message from Redis)."""
    hub = _LOCAL_HUBS.get(channel)
    if hub is None or hub.loop is not asyncio.get_running_loop():
        return False
    hub._deliver(data)
    return True


async def _publish_retrying(
    redis: Any, channel: str, data: bytes, message: dict[str, Any], *, first: int = 1
) -> bool:
    delay = 0.1
    for attempt in range(first, PUBLISH_ATTEMPTS + 1):
        try:
            await redis.publish(channel, data)
            return True
        except REDIS_FAILURES as exc:
            raise_if_cancelling()
            if attempt == PUBLISH_ATTEMPTS:
                metrics.BACKEND_ERRORS.labels("redis", "reply").inc()
                log.warning("reply.lost", run_id=message.get("run_id"), error=str(exc))
                return False
            await asyncio.sleep(jittered(delay))
            delay *= 2
    return False


class ReplyPublisher:
    """:func:`publish_reply` with coalescing: the replies published in one event-loop
    iteration (or while the previous batch is on the wire) go to Redis as one pipeline — one
    write and one read however many runs answered at once. A batch that fails is retried
    message by message, as :func:`publish_reply` does.

    Parameters: ``redis``, a ``redis.asyncio`` client.
    """

    def __init__(self, redis: Any) -> None:
        self.redis = redis
        self._pending: list[tuple[str, bytes, asyncio.Future[bool]]] = []
        self._flushing = False
        self._tasks: set[asyncio.Task[None]] = set()
        #: Round trips sent so far (how well replies coalesce: replies / round_trips).
        self.round_trips = 0

    async def publish(self, channel: str, message: dict[str, Any]) -> bool:
        """Send ``message`` to ``channel``; False when it could not be sent (never raises for
        Redis)."""
        data = orjson.dumps(message, default=str)
        if _LOCAL_HUBS and _handed_over(channel, data):
            return True
        loop = asyncio.get_running_loop()
        sent: asyncio.Future[bool] = loop.create_future()
        self._pending.append((channel, data, sent))
        if not self._flushing:
            self._flushing = True
            loop.call_soon(self._start)
        if await sent:
            return True
        return await _publish_retrying(self.redis, channel, data, message, first=2)

    def _start(self) -> None:
        task = asyncio.get_running_loop().create_task(self._flush())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                ok = await self._send(batch)
                for _, _, sent in batch:
                    if not sent.done():
                        sent.set_result(ok)
        finally:
            self._flushing = False
            if self._pending:
                self._flushing = True
                self._start()

    async def _send(self, batch: list[tuple[str, bytes, asyncio.Future[bool]]]) -> bool:
        self.round_trips += 1
        try:
            if len(batch) == 1:
                await self.redis.publish(batch[0][0], batch[0][1])
            elif isinstance(self.redis, RedisCluster):
                # redis-py refuses PUBLISH in a cluster pipeline: one command each, together.
                await asyncio.gather(*(self.redis.publish(c, d) for c, d, _ in batch))
            else:
                pipe = self.redis.pipeline(transaction=False)
                for channel, data, _ in batch:
                    pipe.publish(channel, data)
                await pipe.execute()
        except REDIS_FAILURES:
            return False
        except BaseException:
            for _, _, sent in batch:
                if not sent.done():
                    sent.set_result(False)
            raise
        return True

    async def close(self) -> None:
        """Wait for the batches on the wire."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


async def stored_final(db: Any, run_id: str) -> dict[str, Any] | None:
    """The ``final`` message PostgreSQL implies for ``run_id``; ``None`` while it is live."""
    row = await run_store.get_run(db, uuid.UUID(run_id))
    if row["status"] not in _TERMINAL_VALUES:
        return None
    return {
        "run_id": run_id,
        "kind": "final",
        "run_status": row["status"],
        "output": row["output"],
        "error": row["error"],
    }
