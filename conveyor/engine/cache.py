"""A small LRU of compiled flows keyed by (flow id, version).

Versions are immutable, so a compiled :class:`~conveyor.engine.flow.Flow` never goes stale:
the worker parses a version once and reuses it for every run (AP_PIECES_CACHE_MAX_ENTRIES
bounds it). Parsing costs ~100 µs; a cache hit costs a dict move.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from conveyor.engine.flow import Flow, parse_flow


class FlowCache:
    """LRU of compiled flows.

    Parameters: ``max_entries`` — how many versions to keep (default 1000).
    """

    def __init__(self, max_entries: int = 1000) -> None:
        self.max_entries = max(1, max_entries)
        self._flows: OrderedDict[tuple[str, int], Flow] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._flows)

    def get(self, flow_id: str, version: int) -> Flow | None:
        """The cached flow, or ``None``."""
        key = (flow_id, version)
        flow = self._flows.get(key)
        if flow is not None:
            self._flows.move_to_end(key)
            self.hits += 1
        return flow

    def put(self, flow_id: str, version: int, flow: Flow) -> None:
        """Insert, evicting the least recently used version beyond ``max_entries``."""
        self._flows[(flow_id, version)] = flow
        self._flows.move_to_end((flow_id, version))
        while len(self._flows) > self.max_entries:
            self._flows.popitem(last=False)

    def compile(self, flow_id: str, version: int, document: Any) -> Flow:
        """The compiled flow for this version, parsing ``document`` only on a miss."""
        flow = self.get(flow_id, version)
        if flow is None:
            self.misses += 1
            flow = parse_flow(document)
            self.put(flow_id, version, flow)
        return flow

    async def load(
        self, flow_id: str, version: int, fetch: Callable[[str, int], Awaitable[Any]]
    ) -> Flow:
        """Like :meth:`compile`, fetching the document (e.g. from Postgres) only on a miss."""
        flow = self.get(flow_id, version)
        if flow is None:
            self.misses += 1
            flow = parse_flow(await fetch(flow_id, version))
            self.put(flow_id, version, flow)
        return flow

    def discard(self, flow_id: str) -> None:
        """Forget every version of a flow (after delete)."""
        for key in [k for k in self._flows if k[0] == flow_id]:
            del self._flows[key]
