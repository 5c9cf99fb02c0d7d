"""Schedule arithmetic: next fire time, missed ticks, time zones across DST."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from conveyor.engine.flow import Trigger
from conveyor.engine.schedule import next_fire, tick_id


def test_next_fire_in_utc() -> None:
    """Every 5 minutes: the next tick is strictly after the given time."""
    trig = Trigger(type="schedule", cron="*/5 * * * *", timezone="UTC")
    after = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    assert next_fire(trig, after) == datetime(2026, 1, 1, 12, 5, tzinfo=UTC)


def test_next_fire_respects_time_zone_and_dst() -> None:
    """09:00 in Europe/Paris is 08:00 UTC in winter and 07:00 UTC in summer."""
    trig = Trigger(type="schedule", cron="0 9 * * *", timezone="Europe/Paris")
    assert next_fire(trig, datetime(2026, 1, 10, tzinfo=UTC)).hour == 8
    assert next_fire(trig, datetime(2026, 7, 10, tzinfo=UTC)).hour == 7


def test_tick_id_is_stable() -> None:
    """The dedup id names the flow and the UTC tick."""
    tick = datetime(2026, 1, 1, 8, 0, tzinfo=UTC)
    assert tick_id("f1", tick) == "schedule:f1:20260101T080000Z"


def test_non_schedule_trigger_rejected() -> None:
    """Asking a webhook trigger for its next fire time is a programming error."""
    with pytest.raises(ValueError):
        next_fire(Trigger(type="webhook"), datetime.now(UTC))
