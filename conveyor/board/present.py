"""Presentation helpers of the board: Jinja filters, sparkline geometry, webhook examples.

Nothing here decides anything about queues or runs; it only turns numbers, timestamps and
documents the read functions returned into text and SVG coordinates.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from conveyor.records import StepRecord

#: Sparklines cover the last 15 minutes (the queue history's length at 10-s samples).
SPARK_WINDOW_S = 900.0
SPARK_W = 120.0
SPARK_H = 28.0


def sparkline(
    samples: Sequence[dict[str, Any]], value: str, *, now: float | None = None
) -> dict[str, Any]:
    """SVG polyline ``points`` (viewBox ``0 0 120 28``) of ``value`` over the last 15 minutes,
    plus the latest value and the peak (the chart's scale)."""
    now = time.time() if now is None else now
    start = now - SPARK_WINDOW_S
    pts = sorted(
        (float(s["t"]), float(s.get(value) or 0)) for s in samples if float(s["t"]) >= start
    )
    peak = max((v for _, v in pts), default=0.0)
    scale = peak if peak > 0 else 1.0
    coords = [
        f"{(t - start) / SPARK_WINDOW_S * SPARK_W:.1f},"
        f"{SPARK_H - 1 - v / scale * (SPARK_H - 2):.1f}"
        for t, v in pts
    ]
    if len(coords) == 1:  # one sample: a flat line, not an invisible dot
        coords.insert(0, f"0,{coords[0].split(',')[1]}")
    return {"points": " ".join(coords), "peak": peak, "last": pts[-1][1] if pts else None}


def per_second(samples: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """History samples with ``per_s`` (jobs/s over the preceding minute) and ``depth``
    (waiting + active + delayed) added."""
    return [
        {
            **s,
            "per_s": round(float(s.get("throughput_1m") or 0) / 60, 2),
            "depth": int(s.get("waiting") or 0)
            + int(s.get("active") or 0)
            + int(s.get("delayed") or 0),
        }
        for s in samples
    ]


@dataclass(frozen=True, slots=True)
class TimelineStep:
    """A step record on the run page's timeline: ``depth`` is its nesting inside loops and
    branches, ``offset``/``width`` its duration bar in percent of the run's span."""

    step: StepRecord
    depth: int
    offset: float
    width: float


def timeline(steps: Sequence[StepRecord]) -> list[TimelineStep]:
    """The run's step records placed on a timeline (in execution order)."""
    starts = [s.started_at.timestamp() for s in steps if s.started_at]
    origin = min(starts, default=0.0)
    ends = [
        s.started_at.timestamp() + float(s.duration_ms or 0) / 1000 for s in steps if s.started_at
    ]
    span = max(max(ends, default=origin) - origin, 0.001)
    parents = {s.name: s.parent for s in steps}
    out = []
    for s in steps:
        depth, parent = 0, s.parent
        while parent and depth < 10:
            depth += 1
            parent = parents.get(parent)
        start = s.started_at.timestamp() if s.started_at else origin
        offset = (start - origin) / span * 100
        width = float(s.duration_ms or 0) / 1000 / span * 100
        out.append(
            TimelineStep(
                s,
                depth,
                offset=round(min(offset, 99.5), 2),
                width=round(max(0.5, min(width, 100 - offset)), 2),
            )
        )
    return out


def fmt_seconds(value: Any) -> str:
    """``0.4 s``, ``12 s``, ``3 min 5 s``, ``2 h 4 min``."""
    if value is None:
        return "–"
    s = float(value)
    if s < 10:
        return f"{s:.1f} s"
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60)} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60)} min"


def fmt_ms(value: Any) -> str:
    if value is None:
        return "–"
    ms = float(value)
    return f"{ms:.0f} ms" if ms < 1000 else fmt_seconds(ms / 1000)


def fmt_bytes(value: Any) -> str:
    if value is None:
        return "–"
    n = float(value)
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def fmt_time(value: Any) -> str:
    """A timestamp (datetime, ISO text, epoch seconds or ms) as UTC ``YYYY-MM-DD HH:MM:SS``."""
    if value is None or value == "":
        return "–"
    if isinstance(value, datetime):
        dt = value
    elif isinstance(value, int | float):
        seconds = value / 1000 if value > 1e11 else value
        dt = datetime.fromtimestamp(seconds, UTC)
    else:
        try:
            dt = datetime.fromisoformat(str(value))
        except ValueError:
            return str(value)
    return dt.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def pretty_json(value: Any) -> str:
    """Indented JSON for ``<pre>`` blocks (escaped by the template like any text)."""
    if isinstance(value, str):
        return value
    return orjson.dumps(value, option=orjson.OPT_INDENT_2, default=str).decode()


#: Longest text a ``<pre>`` block of the run page shows, in UTF-8 bytes.
CLIP_BYTES = 64 * 1024


def clip(value: Any) -> dict[str, Any]:
    """``value`` as :func:`pretty_json` text, cut to :data:`CLIP_BYTES` (at a character
    boundary): ``text``, whether it was ``cut``, and the ``size`` and ``shown`` byte counts."""
    text = pretty_json(value)
    raw = text.encode("utf-8", "replace")
    if len(raw) <= CLIP_BYTES:
        return {"text": text, "cut": False, "size": len(raw), "shown": len(raw)}
    kept = raw[:CLIP_BYTES].decode("utf-8", "ignore")
    return {"text": kept, "cut": True, "size": len(raw), "shown": len(kept.encode())}


def headline(value: Any) -> str:
    """The last non-empty line of an error (a traceback's ``ValueError: …`` line)."""
    lines = [line.strip() for line in str(value or "").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def short_id(value: Any) -> str:
    text = str(value)
    return text[-12:] if len(text) > 12 else text


def status_class(status: Any) -> str:
    """CSS modifier of a status badge."""
    s = str(status or "").upper()
    if s in ("SUCCEEDED", "COMPLETED", "LIVE"):
        return "ok"
    if s in ("QUEUED", "RUNNING", "PAUSED", "WAITING", "ACTIVE", "DELAYED"):
        return "busy"
    return "bad"


#: The body of the board's curl examples (any JSON object the flow reads would do).
EXAMPLE_BODY = '{"hello": "world"}'


#: A shell filter printing the hex HMAC-SHA256 of its input with the key in ``$SECRET``. The
#: key travels in the child's environment, never on a command line (``openssl dgst -hmac KEY``
#: would show it to every local user in ``ps`` and ``/proc/*/cmdline``).
HMAC_FILTER = (
    'SECRET="$SECRET" python3 -c \'import hashlib, hmac, os, sys; print(hmac.new('
    'os.environb[b"SECRET"], sys.stdin.buffer.read(), hashlib.sha256).hexdigest())\''
)


def curl_example(url: str, secret_name: str | None) -> str:
    """A shell snippet that POSTs :data:`EXAMPLE_BODY` to ``url``. With a webhook secret it
    signs the request as the README's "Webhook signatures" section says, reading the value
    from ``$SECRET`` (the board never shows a secret's value, only its name)."""
    quoted_url, body = shlex.quote(url), shlex.quote(EXAMPLE_BODY)
    if secret_name is None:
        return (
            f"curl -sS -X POST {quoted_url} \\\n"
            "  -H 'Content-Type: application/json' \\\n"
            f"  --data-binary {body}"
        )
    return (
        f"# SECRET must hold the value of the secret {secret_name}\n"
        f"body={body}\n"
        "t=$(date +%s)\n"
        f'mac=$(printf \'%s.%s\' "$t" "$body" | {HMAC_FILTER})\n'
        f"curl -sS -X POST {quoted_url} -H 'Content-Type: application/json' \\\n"
        '  -H "X-Conveyor-Signature: t=$t,v1=$mac" --data-binary "$body"'
    )


def payload(trigger: Any) -> Any:
    """What the run was started with: the webhook's body (the whole trigger when it has none,
    as for a schedule)."""
    if isinstance(trigger, dict) and "body" in trigger:
        return trigger["body"]
    return trigger


FILTERS: dict[str, Callable[..., Any]] = {
    "seconds": fmt_seconds,
    "ms": fmt_ms,
    "bytes": fmt_bytes,
    "when": fmt_time,
    "pretty": pretty_json,
    "clip": clip,
    "short": short_id,
    "headline": headline,
    "status_class": status_class,
}
