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
from typing import Any, TypeVar, overload

T = TypeVar("T")
Errors = tuple[type[BaseException], ...]


def _give_up(what: str, timeout_s: float, last: BaseException | None) -> AssertionError:
    tail = f" (last error: {last!r})" if last is not None else ""
    return AssertionError(f"{what} not reached within {timeout_s} s{tail}")


@overload
async def eventually(
    check: Callable[[], Awaitable[T | None]],
    *,
    timeout_s: float = ...,
    interval_s: float = ...,
    what: str = ...,
    ignore: Errors = ...,
) -> T: ...


@overload
async def eventually(
    check: Callable[[], T | None],
    *,
    timeout_s: float = ...,
    interval_s: float = ...,
    what: str = ...,
    ignore: Errors = ...,
) -> T: ...


async def eventually(
    check: Callable[[], Any],
    *,
    timeout_s: float = 20.0,
    interval_s: float = 0.02,
    what: str = "condition",
    ignore: Errors = (),
) -> Any:
    """Call ``check`` (a function or coroutine function) every ``interval_s`` seconds until
    it returns something truthy, and return that; raise :class:`AssertionError` naming
    ``what`` after ``timeout_s`` seconds.

    Exceptions of the ``ignore`` types count as "not yet" (a server still starting); any
    other exception, and an ``AssertionError`` always, ends the wait at once.
    """
    deadline = time.monotonic() + timeout_s
    last: BaseException | None = None
    while True:
        try:
            value: Any = check()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value
        except AssertionError:
            raise
        except ignore as exc:
            last = exc
        if time.monotonic() > deadline:
            raise _give_up(what, timeout_s, last)
        await asyncio.sleep(interval_s)


def eventually_sync(
    check: Callable[[], T | None],
    *,
    timeout_s: float = 20.0,
    interval_s: float = 0.05,
    what: str = "condition",
    ignore: Errors = (),
) -> T:
    """The blocking twin of :func:`eventually`, for code without an event loop."""
    deadline = time.monotonic() + timeout_s
    last: BaseException | None = None
    while True:
        try:
            value = check()
            if value:
                return value
        except AssertionError:
            raise
        except ignore as exc:
            last = exc
        if time.monotonic() > deadline:
            raise _give_up(what, timeout_s, last)
        time.sleep(interval_s)
