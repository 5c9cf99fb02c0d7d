"""Key names: one module, hash-tagged so a shard lives on one Cluster slot."""

from __future__ import annotations

from redis.crc import key_slot

from conveyor.queue import keys as k


def test_stream_key_matches_the_contract() -> None:
    """The stream of shard 0 of runs is conveyor:{runs:0}:stream."""
    assert k.ShardKeys("runs", 0).stream == b"conveyor:{runs:0}:stream"


def test_every_key_of_a_shard_shares_one_slot() -> None:
    """Stream, index, counters, delayed set, dead letters and markers hash to one slot."""
    sk = k.ShardKeys("sync", 3)
    names = [
        sk.stream, sk.index, sk.count, sk.delayed, sk.delayed_payload, sk.delayed_meta,
        sk.dead, sk.completed, sk.dedup("abc"), sk.throughput(12345),
    ]  # fmt: skip
    assert len({key_slot(n) for n in names}) == 1


def test_shard_choice_is_stable_and_in_range() -> None:
    """A key always maps to the same shard, within the configured count."""
    picks = [k.shard_for(f"job-{i}", 4) for i in range(200)]
    assert set(picks) == {0, 1, 2, 3}
    assert picks == [k.shard_for(f"job-{i}", 4) for i in range(200)]
    assert k.shard_for("anything", 1) == 0


def test_sync_is_served_first() -> None:
    """Priority order puts the sync queue before background runs."""
    assert k.PRIORITY == (k.QueueName.SYNC, k.QueueName.RUNS)
