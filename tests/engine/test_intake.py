"""Webhook intake (engine/intake.py) without an application: signature replay, a reused
Idempotency-Key, a full backlog — against real PostgreSQL and Redis."""

from __future__ import annotations

import hashlib
import hmac
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from conveyor.engine.intake import WebhookIntake
from conveyor.engine.registry import FlowRegistry
from conveyor.engine.replies import ReplyHub
from conveyor.engine.submit import Submitter
from conveyor.errors import IdempotencyKeyReused, SignatureReplayed
from conveyor.queue import Producer, QueueConfig, QueueFull
from conveyor.store import flows as flow_store
from conveyor.store.db import Database
from conveyor.store.runs import RunWriter
from conveyor.store.secrets import SecretBox, put_secret
from tests.api.conftest import ENCRYPTION_KEY, make_settings

SECRET = "whsec-intake"
SIGNED = {
    "name": "signed",
    "trigger": {"type": "webhook", "secret": "{{secrets.HOOK}}"},
    "steps": [{"name": "t", "type": "transform", "input": {"b": "{{trigger.body}}"}}],
}
PLAIN = {"name": "plain", "trigger": {"type": "webhook"}, "steps": []}


def _sign(body: bytes) -> str:
    stamp = str(int(time.time()))
    mac = hmac.new(SECRET.encode(), f"{stamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={stamp},v1={mac}"


def _trigger(body: Any) -> dict[str, Any]:
    return {"method": "POST", "headers": {}, "query": {}, "body": body}


async def _run_ids(db: Database) -> set[uuid.UUID]:
    async with db.writer() as conn:
        return {r["id"] for r in await conn.fetch("SELECT id FROM runs")}


@pytest.fixture
async def make_intake(
    db: Database, redis: aioredis.Redis, postgres_url: str, redis_url: str
) -> AsyncIterator[Any]:
    """Intakes over their own writer, producer and reply hub (queue cap ``max_length``)."""
    closers: list[Any] = []

    async def build(max_length: int = 100) -> WebhookIntake:
        settings = make_settings(postgres_url, redis_url)
        writer = RunWriter(db)
        producer = Producer(redis, QueueConfig.from_settings(settings, max_length=max_length))
        hub = ReplyHub(redis, settings.redis_key_prefix)
        closers.extend([producer.close, writer.close])
        return WebhookIntake(
            settings,
            db,
            redis=redis,
            registry=FlowRegistry(db, max_versions=8),
            submitter=Submitter(writer, producer),
            replies=hub,
            writer=writer,
            secret_box=SecretBox(ENCRYPTION_KEY),
        )

    yield build
    for close in closers:
        await close()


async def test_a_replayed_signature_is_refused(db: Database, make_intake: Any) -> None:
    """The same signed body a second time is SignatureReplayed; another signature passes."""
    intake: WebhookIntake = await make_intake()
    await put_secret(db, intake.secret_box, "HOOK", SECRET)
    flow = await flow_store.create_flow(db, "signed", SIGNED)
    head = intake.enabled(flow.id, await intake.registry.head(flow.id))
    raw = b'{"n": 1}'
    given = _sign(raw)
    marker = await intake.verify_signature(head, given, "", raw)
    assert marker is not None
    with pytest.raises(SignatureReplayed) as caught:
        await intake.verify_signature(head, given, "", raw)
    assert caught.value.code == "SIGNATURE_REPLAYED"
    # Released (a refused request), the same signature is accepted again.
    await intake.forget_signature(marker)
    assert await intake.verify_signature(head, given, "", raw) is not None


async def test_a_reused_idempotency_key_with_another_body_is_refused(
    db: Database, make_intake: Any
) -> None:
    """The key's first run answers a repeat with the same body; another body is refused."""
    intake: WebhookIntake = await make_intake()
    flow = await flow_store.create_flow(db, "plain", PLAIN)
    head = intake.enabled(flow.id, await intake.registry.head(flow.id))
    first = intake.new_run(head, _trigger({"a": 1, "b": 2}), "k-1", sync=False)
    sub = await intake.submit(first, inline=True, marker=None)
    assert sub.created and sub.run_id == first.id
    same = intake.new_run(head, _trigger({"b": 2, "a": 1}), "k-1", sync=False)
    again = await intake.submit(same, inline=True, marker=None)
    assert not again.created and again.run_id == first.id
    other = intake.new_run(head, _trigger({"a": 2}), "k-1", sync=False)
    with pytest.raises(IdempotencyKeyReused) as caught:
        await intake.submit(other, inline=True, marker=None)
    assert caught.value.run_id == str(first.id)
    assert await _run_ids(db) == {first.id}


async def test_a_full_backlog_raises_queue_full_and_removes_the_row(
    db: Database, redis: aioredis.Redis, make_intake: Any
) -> None:
    """With the queue at its cap the run is refused (QueueFull), its row deleted again and
    its signature marker released."""
    intake: WebhookIntake = await make_intake(max_length=1)
    await put_secret(db, intake.secret_box, "HOOK", SECRET)
    flow = await flow_store.create_flow(db, "signed", SIGNED)
    head = intake.enabled(flow.id, await intake.registry.head(flow.id))
    kept = intake.new_run(head, _trigger(1), None, sync=False)
    assert (await intake.submit(kept, inline=True, marker=None)).enqueued
    raw = b"2"
    marker = await intake.verify_signature(head, _sign(raw), "", raw)
    assert marker is not None and await redis.exists(marker)
    refused = intake.new_run(head, _trigger(2), None, sync=False)
    with pytest.raises(QueueFull):
        await intake.submit(refused, inline=True, marker=marker)
    assert await _run_ids(db) == {kept.id}
    assert not await redis.exists(marker)
