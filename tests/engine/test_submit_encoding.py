"""The trigger encoded once (engine/submit.py): the job's bytes are what orjson makes of the
RunJob payload, and the row stores the same trigger (NUL replaced), against real PostgreSQL
and Redis."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from conveyor.engine.submit import OnFull, RunJob, Submitter
from conveyor.ids import uuid7
from conveyor.queue import Producer, QueueConfig
from conveyor.queue import keys as k
from conveyor.store import flows as flow_store
from conveyor.store import runs as run_store
from conveyor.store.db import Database
from conveyor.store.runs import NewRun, RunWriter

DOC = {"name": "s", "trigger": {"type": "webhook"}, "steps": []}
TRIGGERS: list[Any] = [
    {"method": "POST", "headers": {"a": "b"}, "query": {}, "body": {"n": 1, "é": [1.5, None]}},
    {"body": "text with \x00 a NUL", "headers": {"x": "\x00"}},
    {"body": {"at": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), "id": uuid.UUID(int=7)}},
    {"body": None},
]


@pytest.mark.parametrize("inline", [True, False])
@pytest.mark.parametrize("reply", [None, 'conveyor:replies:"x"'])
async def test_job_bytes_and_row_from_one_encoding(
    db: Database, redis: aioredis.Redis, inline: bool, reply: str | None
) -> None:
    writer = RunWriter(db)
    producer = Producer(redis, QueueConfig(max_length=100))
    sub = Submitter(writer, producer)
    try:
        flow = await flow_store.create_flow(db, f"s-{uuid.uuid4().hex[:8]}", DOC)
        for trigger in TRIGGERS:
            new = NewRun(uuid7(), flow.id, flow.version, trigger)
            done = await sub.submit(new, on_full=OnFull.REFUSE, inline_trigger=inline, reply=reply)
            assert done.created and done.enqueued and done.id_text == str(new.id)
            (entry,) = [
                f
                for _, f in await redis.xrange(k.ShardKeys("runs", 0).stream)
                if orjson.loads(f[b"p"])["run_id"] == str(new.id)
            ]
            job = RunJob(
                str(new.id),
                str(flow.id),
                flow.version,
                trigger=trigger if inline else None,
                reply=reply,
            )
            # Byte for byte what the payload dict encoded on its own gave before.
            assert entry[b"p"] == orjson.dumps(job.to_payload(), default=str)
            row = await run_store.get_run(db, new.id)
            stored = orjson.loads(
                orjson.dumps(trigger, default=str).replace(b"\\u0000", b"\xef\xbf\xbd")
            )
            assert row["trigger"] == stored
    finally:
        await producer.close()
        await writer.close()
