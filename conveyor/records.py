"""The typed records a run leaves behind, shared by the engine, the store, the API and the board.

A :class:`StepRecord` is written once — the executor builds it when a step finishes, the
store inserts and reads it, the worker hands stored ones back to the executor as
checkpoints, the API serialises it with :meth:`StepRecord.to_json` and the board renders it.
A :class:`RunView` is a run row together with its step records, in the shape of
``GET /api/v1/flow-runs/{id}``. This module imports nothing from the rest of Conveyor, so
the store can use it without importing the engine.

Both records also read like the JSON objects they serialise to (``record["status"]``,
``{**record}``): flows' code, tests and templates written against the JSON shape keep
working, and :meth:`StepRecord.of` turns such a mapping back into a record.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from datetime import datetime
from typing import Any

#: The keys of a step record's JSON object, in the API's order.
STEP_KEYS: tuple[str, ...] = (
    "name",
    "type",
    "status",
    "input",
    "output",
    "error",
    "logs",
    "started_at",
    "duration_ms",
    "attempt",
    "parent",
    "iteration",
)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


@dataclass(frozen=True, slots=True)
class StepRecord(Mapping[str, Any]):
    """One finished step, as stored and as shown in ``GET /api/v1/flow-runs/{id}``.

    ``status`` is a ``StepStatus`` value; ``input``/``output``/``error``/``logs`` are already
    redacted; ``started_at`` when the step began; ``duration_ms`` its wall time;
    ``attempt`` counts tries of this step (1 = first); ``parent`` is the enclosing
    loop/branch name (``None`` at top level) and ``iteration`` the 0-based iteration of the
    innermost enclosing loop. ``seq`` is the record's place in its run's step log, known
    once stored (``None`` before; not part of the JSON shape).
    """

    name: str
    type: str
    status: str
    input: Any = None
    output: Any = None
    error: Any = None
    logs: str = ""
    started_at: datetime | None = None
    duration_ms: float = 0
    attempt: int = 1
    parent: str | None = None
    iteration: int | None = None
    seq: int | None = None

    @classmethod
    def of(cls, value: Mapping[str, Any]) -> StepRecord:
        """``value`` itself if it is a record, else the record its keys spell (a database
        row, or a JSON-shaped mapping); absent optional keys take their defaults."""
        if isinstance(value, StepRecord):
            return value
        rec = cls(**{k: v for k, v in value.items() if k in _STEP_FIELDS})
        # A NULL column reads as None; the record's text field is never None.
        return rec if rec.logs is not None else replace(rec, logs="")

    def to_json(self) -> dict[str, Any]:
        """The record as the API shows it (``started_at`` as ISO 8601 text)."""
        out = {k: getattr(self, k) for k in STEP_KEYS}
        out["started_at"] = _iso(self.started_at)
        return out

    # Read-only mapping view over the JSON keys; ``seq`` is readable by key too, though
    # not one of the keys (it is not part of the JSON shape).
    def __getitem__(self, key: str) -> Any:
        if key not in _STEP_FIELDS:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(STEP_KEYS)

    def __len__(self) -> int:
        return len(STEP_KEYS)


_STEP_FIELDS = frozenset(f.name for f in fields(StepRecord))


@dataclass(frozen=True, slots=True)
class RunView:
    """A run as the API and the board show it: the run row's fields plus, for the detail
    view, its step records in execution order (``steps`` is ``None`` in listings).

    ``duration_ms`` is derived from ``started_at``/``finished_at`` (``None`` until both
    are set).
    """

    id: Any
    flow_id: Any
    flow_version: int
    status: str
    trigger: Any = None
    output: Any = None
    error: Any = None
    attempt: int = 0
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    steps: tuple[StepRecord, ...] | None = None

    @classmethod
    def of(
        cls, row: Mapping[str, Any], steps: Sequence[Mapping[str, Any]] | None = None
    ) -> RunView:
        """The view of a run row (from :mod:`conveyor.store.runs`) and its steps."""
        return cls(
            id=row["id"],
            flow_id=row["flow_id"],
            flow_version=row["flow_version"],
            status=row["status"],
            trigger=row.get("trigger"),
            output=row.get("output"),
            error=row.get("error"),
            attempt=row.get("attempt", 0),
            created_at=row.get("created_at"),
            started_at=row.get("started_at"),
            finished_at=row.get("finished_at"),
            steps=None if steps is None else tuple(StepRecord.of(s) for s in steps),
        )

    @property
    def duration_ms(self) -> float | None:
        if not (self.started_at and self.finished_at):
            return None
        return round((self.finished_at - self.started_at).total_seconds() * 1000, 3)

    def to_json(self) -> dict[str, Any]:
        """The JSON object of ``GET /api/v1/flow-runs/{id}`` (``steps`` only when loaded)."""
        out: dict[str, Any] = {
            "id": str(self.id),
            "flow_id": str(self.flow_id),
            "flow_version": self.flow_version,
            "status": self.status,
            "trigger": self.trigger,
            "output": self.output,
            "error": self.error,
            "attempt": self.attempt,
            "created_at": _iso(self.created_at),
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "duration_ms": self.duration_ms,
        }
        if self.steps is not None:
            out["steps"] = [s.to_json() for s in self.steps]
        return out
