"""Webhook intake: the domain half of a webhook, from flow lookup to the sync reply.

:class:`WebhookIntake` is built once per API process by the composition root
(:mod:`conveyor.app`) from the services it needs, passed as arguments; ``api/webhooks.py``
only reads the request and renders the answer. The steps, in the order the adapter calls them:

1. :meth:`~WebhookIntake.enabled` — the flow's current head from the registry; a missing or
   disabled flow is :class:`~conveyor.errors.FlowNotFound`.
2. :meth:`~WebhookIntake.verify_signature` — ``t=<unix>,v1=<hex>`` against the stored secret,
   within the tolerance, and seen once (a replay is :class:`~conveyor.errors.SignatureReplayed`).
3. :meth:`~WebhookIntake.new_run` then :meth:`~WebhookIntake.submit` — insert → enqueue
   through the :class:`~conveyor.engine.submit.Submitter` (a full backlog deletes the row and
   raises ``QueueFull``); a repeated Idempotency-Key must carry the same body
   (:class:`~conveyor.errors.IdempotencyKeyReused`).
4. For a sync webhook, :meth:`~WebhookIntake.wait_reply` and :meth:`~WebhookIntake.remember`.

Refusals are domain errors from :mod:`conveyor.errors`; ``conveyor/api/errors.py`` maps them
to HTTP. See docs/architecture.md, "A webhook, from request to reply".
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
import uuid
from collections.abc import Awaitable
from typing import Any

import orjson
import structlog

from conveyor.engine.context import slot_maker
from conveyor.engine.registry import FlowHead, FlowRegistry
from conveyor.engine.replies import ReplyHub, stored_final
from conveyor.engine.submit import OnFull, Submission, Submitter
from conveyor.errors import (
    FlowNotFound,
    IdempotencyKeyReused,
    IngestUnavailable,
    OutcomeUnreadable,
    SignatureExpired,
    SignatureInvalid,
    SignatureReplayed,
)
from conveyor.ids import uuid7
from conveyor.queue import QueueName
from conveyor.queue import keys as queue_keys
from conveyor.queue.errors import REDIS_FAILURES
from conveyor.settings import Settings
from conveyor.status import RunStatus
from conveyor.store import runs as run_store
from conveyor.store.db import CONNECTION_ERRORS, Database
from conveyor.store.runs import RunWriter
from conveyor.store.secrets import SecretBox, load_secrets

log = structlog.get_logger(__name__)

#: Triggers smaller than this travel inside the job, saving the worker a read.
INLINE_TRIGGER_BYTES = 16 * 1024
SIGNATURE_HEADER = "X-Conveyor-Signature"
#: How far a signature's timestamp may be from our clock, either way.
SIGNATURE_TOLERANCE_S = 300
_SYNC_QUEUE: str = QueueName.SYNC.value
_RUNS_QUEUE: str = QueueName.RUNS.value
SIGNATURE_HELP = (
    f"{SIGNATURE_HEADER} must be t=<unix seconds>,v1=<hex HMAC-SHA256 of "
    '"<t>.<raw body>"> (see the README)'
)


#: ``NewRun(id, flow_id, flow_version, trigger, queue, idempotency_key, response_status)``
#: positionally, without keyword parsing (one per webhook).
_new_run = slot_maker(run_store.NewRun)


def sign(secret: str, timestamp: str, raw: bytes) -> str:
    """The ``v1`` HMAC of a webhook body: hex SHA-256 over ``"<timestamp>.<raw>"``."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b".", hashlib.sha256)
    mac.update(raw)
    return mac.hexdigest()


def canonical(body: Any) -> bytes:
    """A trigger body as stored: key order irrelevant, NUL replaced (conveyor.store.runs)."""
    data = orjson.dumps(body, option=orjson.OPT_SORT_KEYS, default=str)
    return data.replace(b"\\u0000", "\ufffd".encode())


class WebhookIntake:
    """Accepts webhooks into durable runs (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        *,
        redis: Any,
        registry: FlowRegistry,
        submitter: Submitter,
        replies: ReplyHub,
        writer: RunWriter,
        secret_box: SecretBox,
    ) -> None:
        self.settings = settings
        self.db = db
        self.redis = redis
        self.registry = registry
        self.submitter = submitter
        self.replies = replies
        self.writer = writer
        self.secret_box = secret_box
        self._prefix = settings.redis_key_prefix

    @staticmethod
    def enabled(flow_id: uuid.UUID, head: FlowHead | None) -> FlowHead:
        """``head`` (from :attr:`registry`) when the flow exists and is enabled, else
        :class:`FlowNotFound`. Not a coroutine, so the hot path awaits the registry only."""
        if head is None or not head.enabled:
            raise FlowNotFound(f"flow {flow_id} not found or disabled")
        return head

    async def verify_signature(
        self, head: FlowHead, given: str, idempotency_key: str, raw: bytes
    ) -> bytes | None:
        """Check ``given`` (the signature header) when the flow's trigger has a secret;
        returns the replay marker recorded for it (``None``: unsigned flow or legacy
        signature), which :meth:`submit` releases when the request is not accepted."""
        secret_name = head.flow.trigger.secret_name
        if head.flow.trigger.secret is not None and not secret_name:
            # Refused at validation; a stored flow from before must not run unverified.
            raise SignatureInvalid("the flow's trigger.secret is not a reference")
        if not secret_name:
            return None
        values = await load_secrets(self.db, self.secret_box, [secret_name])
        secret = values.get(secret_name)
        if secret is None:
            # The operator hears which secret is missing; an anonymous caller learns nothing
            # about the flow's configuration.
            log.warning("webhook.secret_missing", flow_id=str(head.flow_id), secret=secret_name)
            raise SignatureInvalid("the flow's signing secret is not set on this server")
        if given.startswith("sha256="):
            if not self.settings.webhook_legacy_signatures:
                raise SignatureInvalid(
                    "untimed sha256= signatures are not accepted (AP_WEBHOOK_LEGACY_SIGNATURES); "
                    + SIGNATURE_HELP
                )
            expected = "sha256=" + hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()
            if not hmac.compare_digest(given.encode(), expected.encode()):
                raise SignatureInvalid(SIGNATURE_HELP)
            return None
        fields: dict[str, list[str]] = {}
        for part in given.split(","):
            key, _, value = part.strip().partition("=")
            fields.setdefault(key, []).append(value)
        stamp = (fields.get("t") or [""])[0]
        # isascii(): str.isdigit() also accepts digits such as '²' that int() refuses.
        if not (stamp.isascii() and stamp.isdigit()) or len(stamp) > 12 or not fields.get("v1"):
            raise SignatureInvalid(f"{SIGNATURE_HEADER} missing or malformed; " + SIGNATURE_HELP)
        skew = int(stamp) - time.time()
        if abs(skew) > SIGNATURE_TOLERANCE_S:
            raise SignatureExpired(
                f"signature timestamp is more than {SIGNATURE_TOLERANCE_S} s from the server's "
                "clock: sign each request when it is sent"
            )
        expected = sign(secret, stamp, raw)
        # Every candidate compared (a sender rotating secrets may send several v1 values).
        ok = [hmac.compare_digest(v.encode(), expected.encode()) for v in fields["v1"]]
        if not any(ok):
            raise SignatureInvalid(SIGNATURE_HELP)
        ttl_s = int(skew) + SIGNATURE_TOLERANCE_S + 1
        return await self._seen_once(expected, idempotency_key, ttl_s)

    async def _seen_once(self, digest: str, idempotency_key: str, ttl_s: int) -> bytes | None:
        """Record the signature until it expires; a second request with it is a replay.

        The marker is the digest alone, not scoped to the flow: the signature does not cover
        the URL, so a request captured for one flow would otherwise be accepted once more by
        every other flow sharing the secret.

        The marker holds the request's Idempotency-Key: a sender retrying the *same* request
        with the same key gets the idempotent answer instead of a 409. The marker is removed
        again when the request is not accepted (:meth:`forget_signature`), so a sender may
        retry a 429 or 503 with the same signature.
        """
        key = queue_keys.webhook_signature(digest, self._prefix)
        idem = idempotency_key.encode("utf-8", "surrogateescape")
        client = self.redis
        try:
            fresh = await client.set(key, idem, nx=True, ex=max(1, ttl_s))
            if not fresh:
                held = await client.get(key)
                if idem and held == idem:
                    return None  # the same request again: its first acceptance holds it
                raise SignatureReplayed(
                    "this signed request was already received; sign every request anew"
                )
        except REDIS_FAILURES:
            raise IngestUnavailable() from None
        return key

    async def forget_signature(self, marker: bytes | None) -> None:
        """Release a replay marker, so the same signed request may come again."""
        if marker is not None:
            try:
                await self.redis.delete(marker)
            except REDIS_FAILURES:
                log.warning("could not release a webhook signature marker")

    def new_run(
        self,
        head: FlowHead,
        trigger: dict[str, Any],
        idempotency_key: str | None,
        *,
        sync: bool,
    ) -> run_store.NewRun:
        """The run a webhook asks for (not yet stored)."""
        # Namespaced, so a caller's key can never collide with keys the scheduler (or any
        # other trigger) derives for the same flow.
        key = f"hook:{idempotency_key}" if idempotency_key else None
        if sync:
            return _new_run(uuid7(), head.flow_id, head.version, trigger, _SYNC_QUEUE, key, None)
        return _new_run(uuid7(), head.flow_id, head.version, trigger, _RUNS_QUEUE, key, 202)

    async def submit(
        self,
        new: run_store.NewRun,
        *,
        inline: bool,
        marker: bytes | None,
        reply: str | None = None,
    ) -> Submission:
        """Insert and enqueue (a full backlog deletes the row and raises ``QueueFull``; the
        signature marker is released on any refusal). ``created`` False: the key's first run,
        whose body must be the same (:class:`IdempotencyKeyReused`)."""
        try:
            sub = await self.submitter.submit(
                new, on_full=OnFull.REFUSE, inline_trigger=inline, reply=reply
            )
        except BaseException:
            await self.forget_signature(marker)  # refused: the same request may come again
            raise
        if not sub.created:
            await self._same_request(str(sub.run_id), new.trigger)
        return sub

    async def _same_request(self, run_id: str, trigger: dict[str, Any]) -> None:
        row = await run_store.get_run(self.db, uuid.UUID(run_id))
        first = row.get("trigger") or {}
        if canonical(first.get("body")) != canonical(trigger["body"]):
            raise IdempotencyKeyReused(
                "this Idempotency-Key was already used for a request with a different body; "
                "use a new key for a new request",
                run_id,
            )

    async def cancel_unqueued(self, sub: Submission, marker: bytes | None) -> IngestUnavailable:
        """A sync run that Redis refused: canceled, its idempotency key and signature released
        (the caller retries after Retry-After and must get a new run); returns the error."""
        rid = sub.run_id
        await self.writer.transition(
            run_store.Transition(
                rid,
                RunStatus.CANCELED,
                error={"step": None, "message": "Redis unavailable at ingest"},
            )
        )
        await run_store.release_idempotency_key(self.db, rid)
        await self.forget_signature(marker)
        return IngestUnavailable(str(rid))

    def wait_reply(
        self, run_id: str, waiter: asyncio.Future[dict[str, Any]]
    ) -> Awaitable[dict[str, Any] | None]:
        """The run's reply, or ``None`` after ``AP_WEBHOOK_TIMEOUT_SECONDS`` (the run goes on);
        :class:`OutcomeUnreadable` when the store cannot be read at the end.

        Pub/sub is at most once: a reply lost in a reconnect must not turn a finished run into
        a timeout, so PostgreSQL is asked too (:mod:`conveyor.engine.replies`). Returns the
        hub's wait itself (no extra coroutine on the path of every sync webhook)."""
        return self.replies.wait(
            waiter, self.settings.webhook_timeout_seconds, lambda: self._stored_final(run_id)
        )

    async def _stored_final(self, run_id: str) -> dict[str, Any] | None:
        try:
            return await stored_final(self.db, run_id)
        except CONNECTION_ERRORS:
            raise OutcomeUnreadable(run_id) from None

    async def remember(self, run_id: str, status: int) -> None:
        """Record the answer given, for a repeat of the request's Idempotency-Key."""
        await run_store.set_response_status(self.db, uuid.UUID(run_id), status)
