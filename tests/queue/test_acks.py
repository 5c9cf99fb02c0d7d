"""The ACK script: entries leave the stream however handlers finish, and a batch part of which
another call acknowledged first logs, counts and unindexes only its own entries."""

from __future__ import annotations

import asyncio

import orjson
import redis.asyncio as aioredis

from conveyor.queue import Consumer, Job, Producer, QueueConfig
from conveyor.queue import keys as k
from conveyor.queue.scripts import ACK
from tests.queue.test_consumer import completed_ids


async def _ack(redis: aioredis.Redis, sk: k.ShardKeys, entries: list[tuple[bytes, bytes]]) -> int:
    summaries = [
        orjson.dumps(
            {"id": jid.decode(), "e": eid.decode(), "a": 1, "w": 3, "r": 0, "f": 1, "t": 1}
        )
        for eid, jid in entries
    ]
    return int(
        await ACK(
            redis,
            [sk.stream, sk.index, sk.count, sk.completed, sk.throughput(1)],
            [
                k.GROUP,
                1000,
                180,
                b",".join(e for e, _ in entries),
                b"\n".join(j for _, j in entries),
                b"\n".join(summaries),
                3 * len(entries),
            ],
        )
    )


async def test_out_of_order_finishes_leave_an_empty_stream(
    redis: aioredis.Redis, cfg: QueueConfig
) -> None:
    """Later entries finishing first (so above the oldest pending one) are removed too."""
    producer = Producer(redis, cfg)
    ids = [f"o{i}" for i in range(24)]
    for j in ids:
        await producer.enqueue("runs", {}, job_id=j)

    async def handler(job: Job) -> None:
        await asyncio.sleep(0.002 * (24 - int(job.id[1:])))  # the oldest runs longest

    assert await Consumer(redis, handler, cfg).drain() == 24
    sk = k.ShardKeys("runs", 0)
    assert await redis.xlen(sk.stream) == 0
    assert int(await redis.get(sk.count) or 0) == 0
    assert await redis.hlen(sk.index) == 0
    assert sorted(await completed_ids(redis)) == sorted(ids)


async def test_batch_partly_acknowledged_elsewhere_counts_only_its_own(
    redis: aioredis.Redis, cfg: QueueConfig
) -> None:
    producer = Producer(redis, cfg)
    for j in ("a", "b", "c"):
        await producer.enqueue("runs", {}, job_id=j)
    sk = k.ShardKeys("runs", 0)
    read = await redis.xreadgroup(k.GROUP, "me", {sk.stream: ">"}, count=10)
    entries = [(eid, f[b"i"]) for eid, f in read[0][1]]
    # "b" is acknowledged (and removed) by another call first, then re-enqueued under its id.
    assert await _ack(redis, sk, [entries[1]]) == 1
    await producer.enqueue("runs", {}, job_id="b")
    assert await _ack(redis, sk, entries) == 2
    assert sorted(await completed_ids(redis)) == ["a", "b", "c"]  # b once, from the first call
    assert int(await redis.get(sk.count) or 0) == 1  # the new "b"
    assert list(await redis.hkeys(sk.index)) == [b"b"]  # its index entry survived
    assert [f[b"i"] for _, f in await redis.xrange(sk.stream)] == [b"b"]
    assert await redis.hget(sk.throughput(1), "n") == b"3"
    assert await redis.hget(sk.throughput(1), "w") == b"9"


async def test_a_group_behind_its_stream_loses_no_undelivered_entry(
    redis: aioredis.Redis, cfg: QueueConfig
) -> None:
    """After a failover to a lagging replica the group may have delivered only the first of
    entries a worker ran: acknowledging them removes what this group delivered and nothing
    beyond its last-delivered id (those entries are delivered again, not trimmed away)."""
    producer = Producer(redis, cfg)
    names = [f"l{i}" for i in range(6)]
    for j in names:
        await producer.enqueue("runs", {}, job_id=j)
    sk = k.ShardKeys("runs", 0)
    read = await redis.xreadgroup(k.GROUP, "w", {sk.stream: ">"}, count=6)
    entries = [(eid, f[b"i"]) for eid, f in read[0][1]]
    # The replica's view: the group exists but delivered only the first entry.
    await redis.xgroup_destroy(sk.stream, k.GROUP)
    await redis.xgroup_create(sk.stream, k.GROUP, id="0")
    await redis.xreadgroup(k.GROUP, "w", {sk.stream: ">"}, count=1)
    assert await _ack(redis, sk, [entries[0], entries[4]]) == 1
    left = [f[b"i"] for _, f in await redis.xrange(sk.stream)]
    assert left == [n.encode() for n in names[1:]]
    assert int(await redis.get(sk.count) or 0) == 5
    assert sorted(await redis.hkeys(sk.index)) == [n.encode() for n in names[1:]]
    assert await completed_ids(redis) == ["l0"]


async def test_ids_with_separators_and_odd_payloads_go_through_enqueue_and_ack(
    redis: aioredis.Redis, cfg: QueueConfig
) -> None:
    # The scripts split their joined columns with a plain search: ids holding the other
    # columns' separators, spaces, quotes or non-ASCII, and payloads of any length, come
    # through whole, and each acknowledged job leaves the index and the stream.
    producer = Producer(redis, cfg)
    ids = ["a,b", "c, d ,", ",", "ü x", 'q"\\', "x" * 300, "-1", "e\tf"]
    payloads: list[object] = [{}, [], "s,t\nu", {"k": "v" * 5000}, 0, None, {"a": [1, 2]}, "é"]
    added = await asyncio.gather(
        *(producer.enqueue("runs", p, job_id=j) for j, p in zip(ids, payloads, strict=True))
    )
    assert added == ids
    seen: dict[str, object] = {}

    async def handler(job: Job) -> None:
        seen[job.id] = job.payload

    assert await Consumer(redis, handler, cfg).drain() == len(ids)
    assert seen == dict(zip(ids, payloads, strict=True))
    assert sorted(await completed_ids(redis)) == sorted(ids)
    sk = k.ShardKeys("runs", 0)
    assert await redis.hlen(sk.index) == 0
    assert await redis.xlen(sk.stream) == 0
    assert int(await redis.get(sk.count) or 0) == 0


def test_the_completed_summary_is_the_json_of_its_fields() -> None:
    # Formatted directly (not a dict through orjson) for speed: the bytes must not change.
    consumer = Consumer(aioredis.Redis(), _noop_handler, QueueConfig())
    sent: list[tuple[str, str, int, bytes]] = []
    consumer._acks.add = lambda sk, item: sent.append(item)  # type: ignore[method-assign]
    stream = consumer._streams[0]
    ids = ["run-1", 'quote"and\\slash', "ünï\u2028code", "ctl\x01\n", ""]
    for n, jid in enumerate(ids):
        job = Job(jid, "runs", {}, n + 1, f"17646250000{n}-{n}", 0, 1764625000000 - n)
        job.entry_ms = 1764625000000 + n
        consumer._queue_ack(stream, job, 1764625000.5 + n)
    for jid, (eid, job_id, wait, summary) in zip(ids, sent, strict=True):
        doc = orjson.loads(summary)
        assert job_id == jid == doc["id"]
        assert eid == doc["e"] and wait == doc["w"]
        expected = {k: doc[k] for k in ("id", "e", "a", "w", "r", "f", "t")}
        assert summary == orjson.dumps(expected)


async def _noop_handler(job: Job) -> None:
    return None
