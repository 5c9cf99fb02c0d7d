"""asyncio helpers shared by Conveyor's background loops.

redis-py can swallow a ``CancelledError`` that arrives mid-command (it tears the connection
down and returns or raises something else), leaving the task "cancelling" but still looping:
a ``close()`` that cancels and awaits such a loop would wait forever. Every ``while True``
service loop calls :func:`raise_if_cancelling` once per turn so a cancellation always wins.
"""

from __future__ import annotations

import asyncio


def raise_if_cancelling() -> None:
    """Raise ``CancelledError`` if the current task was asked to cancel."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
