"""The one way tests wait for a condition: poll it until it holds or a deadline passes.

Tests order events with events (an ``asyncio.Event`` a handler sets, a line a subprocess
prints, an entry showing up in Redis) and use these helpers only to wait for state that
has no event of its own. A condition that never holds fails the test with ``what`` in the
message; nothing here asserts how fast anything happened.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def eventually(
    check: Callable[[], T | Awaitable[T]],
    *,
    timeout_s: float = 20.0,
    interval_s: float = 0.02,
    what: str = "condition",
) -> T:
    """Call ``check`` (a function or coroutine function) every ``interval_s`` seconds until
    it returns something truthy, and return that; raise :class:`AssertionError` naming
    ``what`` after ``timeout_s`` seconds. Exceptions from ``check`` propagate."""
    deadline = time.monotonic() + timeout_s
    while True:
        value: Any = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value  # type: ignore[no-any-return]
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout_s} s")
        await asyncio.sleep(interval_s)


def eventually_sync(
    check: Callable[[], T],
    *,
    timeout_s: float = 20.0,
    interval_s: float = 0.05,
    what: str = "condition",
) -> T:
    """The blocking twin of :func:`eventually`, for tests without an event loop."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout_s} s")
        time.sleep(interval_s)
