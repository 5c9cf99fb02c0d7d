"""UUIDv7 run ids: a 48-bit millisecond timestamp first, so ids sort by creation time.

Time order gives cursor paging (``id < cursor``) and index locality for free (RFC 9562 §5.7).

Every webhook makes one, so the random bits come from ``os.urandom`` in blocks (one system
call per :data:`_BLOCK` ids, not one each; a forked child starts a block of its own) and the
:class:`uuid.UUID` is built from its integer without re-validating it.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator

#: Ids drawn from one ``os.urandom`` call.
_BLOCK = 256
_VERSION_VARIANT = (0x7 << 76) | (0b10 << 62)
_RAND_A = 0xFFF << 64
_RAND_B = 0x3FFF_FFFF_FFFF_FFFF
_SAFE = uuid.SafeUUID.unknown
_new = object.__new__
_set = object.__setattr__


def _block() -> Iterator[int]:
    """``_BLOCK`` random 74-bit fields, already in their UUIDv7 positions (rand_a, rand_b)."""
    raw = os.urandom(10 * _BLOCK)
    out = []
    for i in range(0, 10 * _BLOCK, 10):
        rand = int.from_bytes(raw[i : i + 10], "big")
        out.append(((rand >> 62) << 64) & _RAND_A | (rand & _RAND_B))
    # next() on a list iterator is atomic under the GIL: threads never share a value.
    return iter(out)


_random: Iterator[int] = iter(())


def _reset_after_fork() -> None:
    global _random
    _random = iter(())


os.register_at_fork(after_in_child=_reset_after_fork)


def uuid7() -> uuid.UUID:
    """A new UUIDv7 (time-ordered to the millisecond; random below that)."""
    global _random
    try:
        rand = next(_random)
    except StopIteration:
        _random = _block()
        rand = next(_random)
    value = ((time.time_ns() // 1_000_000) & 0xFFFF_FFFF_FFFF) << 80 | _VERSION_VARIANT | rand
    # uuid.UUID(int=value) re-checks the range and version; value is a valid v7 by
    # construction, so set the fields the way its __init__ would.
    out = _new(uuid.UUID)
    _set(out, "int", value)
    _set(out, "is_safe", _SAFE)
    return out


def uuid7_time_ms(value: uuid.UUID) -> int:
    """The millisecond timestamp inside a UUIDv7."""
    return value.int >> 80
