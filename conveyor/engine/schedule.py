"""Cron arithmetic for schedule triggers: when a flow fires next, and the id of each tick.

Only the time computation lives here; the leader election and tick deduplication across
worker processes (a Redis lease plus one key per tick) live in the scheduler. Times are
computed in the trigger's time zone so ``0 9 * * *`` means 09:00 local across DST changes,
and returned as aware UTC datetimes.
"""

from __future__ import annotations

import zoneinfo
from datetime import UTC, datetime

from croniter import croniter

from conveyor.engine.flow import Trigger


def _zone(trigger: Trigger) -> zoneinfo.ZoneInfo:
    return zoneinfo.ZoneInfo(trigger.timezone or "UTC")


def next_fire(trigger: Trigger, after: datetime) -> datetime:
    """The first tick strictly after ``after`` (aware), as UTC."""
    if trigger.type != "schedule" or trigger.cron is None:
        raise ValueError("not a schedule trigger")
    it = croniter(trigger.cron, after.astimezone(_zone(trigger)))
    nxt: datetime = it.get_next(datetime)
    return nxt.astimezone(UTC)


def tick_id(flow_id: str, tick: datetime) -> str:
    """A stable id for one tick of one flow (the worker's dedup / idempotency key)."""
    return f"schedule:{flow_id}:{tick.astimezone(UTC).strftime('%Y%m%dT%H%M%SZ')}"
