"""UUIDv7 run ids: a 48-bit millisecond timestamp first, so ids sort by creation time.

Time order gives cursor paging (``id < cursor``) and index locality for free (RFC 9562 §5.7).
"""

from __future__ import annotations

import os
import time
import uuid


def uuid7() -> uuid.UUID:
    """A new UUIDv7 (time-ordered to the millisecond; random below that)."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & 0xFFFF_FFFF_FFFF) << 80
    value |= 0x7 << 76  # version
    value |= ((rand >> 62) & 0xFFF) << 64  # rand_a, 12 bits
    value |= 0b10 << 62  # variant
    value |= rand & 0x3FFF_FFFF_FFFF_FFFF  # rand_b, 62 bits
    return uuid.UUID(int=value)


def uuid7_time_ms(value: uuid.UUID) -> int:
    """The millisecond timestamp inside a UUIDv7."""
    return value.int >> 80
