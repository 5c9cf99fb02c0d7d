"""QueueConfig: built from Settings, validated, backoff within its bounds."""

from __future__ import annotations

import re

import pytest

from conveyor.queue import QueueConfig
from conveyor.settings import Settings, SettingsError


def test_from_settings_takes_the_ap_values() -> None:
    """AP_QUEUE_* and retention variables flow into the queue config; overrides apply."""
    settings = Settings.from_env(
        {
            "AP_QUEUE_SHARDS": "4",
            "AP_QUEUE_MAX_LENGTH": "1000",
            "AP_WORKER_CONCURRENCY": "16",
            "AP_REDIS_COMPLETED_JOB_RETENTION_MAX_COUNT": "7",
        }
    )
    cfg = QueueConfig.from_settings(settings, visibility_timeout_s=5, heartbeat_s=1)
    assert (cfg.shards, cfg.max_length, cfg.concurrency) == (4, 1000, 16)
    assert cfg.completed_retention_max_count == 7
    assert cfg.shard_max_length == 250 and cfg.stream_maxlen == 500
    assert cfg.visibility_timeout_s == 5
    default = QueueConfig.from_settings(Settings.from_env({}))
    assert (default.visibility_timeout_s, default.heartbeat_s, default.max_deliveries) == (6, 2, 5)
    assert default.takeover_every_s == 1 and default.key_prefix == "conveyor"
    tuned = QueueConfig.from_settings(
        Settings.from_env(
            {
                "AP_QUEUE_VISIBILITY_TIMEOUT_SECONDS": "20",
                "AP_WORKER_HEARTBEAT_SECONDS": "5",
                "AP_REDIS_KEY_PREFIX": "blue",
            }
        )
    )
    assert (tuned.visibility_timeout_s, tuned.heartbeat_s, tuned.key_prefix) == (20, 5, "blue")
    assert tuned.shard_keys("runs")[0].stream == b"blue:{runs:0}:stream"


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"AP_QUEUE_VISIBILITY_TIMEOUT_SECONDS": "1"}, "AP_QUEUE_VISIBILITY_TIMEOUT_SECONDS='1'"),
        ({"AP_WORKER_HEARTBEAT_SECONDS": "0"}, "AP_WORKER_HEARTBEAT_SECONDS='0'"),
        ({"AP_WORKER_HEARTBEAT_SECONDS": "4"}, "at most half of AP_QUEUE_VISIBILITY"),
        ({"AP_WORKER_DRAIN_SECONDS": "-1"}, "AP_WORKER_DRAIN_SECONDS='-1'"),
        ({"AP_REDIS_KEY_PREFIX": "a{b}"}, "AP_REDIS_KEY_PREFIX='a{b}'"),
        ({"AP_REDIS_KEY_PREFIX": "x" * 65}, "AP_REDIS_KEY_PREFIX="),
    ],
)
def test_takeover_settings_are_validated(env: dict[str, str], needle: str) -> None:
    """Visibility, heartbeat, drain and key prefix refuse bad values, naming the variable."""
    with pytest.raises(SettingsError, match=re.escape(needle)):
        Settings.from_env(env)


def test_backoff_doubles_caps_and_jitters() -> None:
    """Retry delay is 1 s x 2^n within ±20 %, never above 300 s (+20 %)."""
    cfg = QueueConfig()
    for attempt, base in [(1, 1), (2, 2), (3, 4), (9, 256), (10, 300), (30, 300)]:
        delays = [cfg.backoff_s(attempt) for _ in range(50)]
        assert all(base * 0.8 <= d <= base * 1.2 for d in delays)


def test_heartbeat_must_beat_the_visibility_timeout() -> None:
    """A heartbeat slower than the visibility timeout is refused (live work would be stolen)."""
    with pytest.raises(ValueError, match="heartbeat"):
        QueueConfig(visibility_timeout_s=10, heartbeat_s=10)
