"""Outage: jittered exponential delays under a cap, two log lines per outage and process."""

from __future__ import annotations

from structlog.testing import capture_logs

from conveyor.backoff import Outage


def test_delays_grow_jittered_up_to_the_cap() -> None:
    """Each delay lies in the upper half of base x 2^n, never above the cap."""
    outage = Outage("test-delays", "t1", base_s=0.1, cap_s=1.0)
    delays = [outage.failed("down") for _ in range(8)]
    for n, d in enumerate(delays):
        top = min(0.1 * 2**n, 1.0)
        assert top / 2 <= d <= top
    outage.ok()
    assert 0.05 <= outage.failed("down again") <= 0.1  # a new outage starts from the base
    outage.ok()


def test_one_line_down_one_line_up_per_backend() -> None:
    """Many loops failing many times log one line when the backend goes and one when it is
    back; another backend's outage is logged on its own."""
    loops = [Outage("test-redis", op) for op in ("fetch", "ack", "touch")]
    pg = Outage("test-postgres", "reconcile")
    with capture_logs() as logs:
        for _ in range(50):
            for loop in loops:
                loop.failed(ConnectionError("refused"))
        pg.failed(OSError("gone"))
        loops[1].ok()
        loops[0].ok()
        loops[2].ok()
        pg.ok()
    events = [(e["event"], e["backend"]) for e in logs]
    assert events == [
        ("backend.unavailable", "test-redis"),
        ("backend.unavailable", "test-postgres"),
        ("backend.recovered", "test-redis"),
        ("backend.recovered", "test-postgres"),
    ]
