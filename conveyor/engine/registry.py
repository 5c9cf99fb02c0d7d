"""Compiled flows, cached per process, so a webhook or a run costs no parse and no query.

A flow *version* never changes, so its compiled :class:`~conveyor.engine.flow.Flow` is cached
until evicted (LRU, ``AP_PIECES_CACHE_MAX_ENTRIES`` versions). Which version is current, and
whether the flow is enabled, can change: that "head" is cached for ``head_ttl_s`` (1 s), so a
flow disabled or updated through another process takes effect everywhere within a second,
while a burst of webhooks to one flow costs one query per second instead of one each — and
one query, not one per waiting request, when the head expires under load: concurrent lookups
of the same flow share the one in flight.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass

from conveyor.engine.flow import Flow, parse_flow
from conveyor.store import flows as flow_store
from conveyor.store.db import Database


@dataclass(frozen=True, slots=True)
class FlowHead:
    """The current state of a flow: ``enabled``, ``version`` and that version compiled."""

    flow_id: uuid.UUID
    enabled: bool
    version: int
    flow: Flow


class FlowRegistry:
    """Per-process cache of flow heads and compiled versions.

    Parameters: ``db``; ``max_versions`` compiled versions kept (LRU); ``head_ttl_s`` seconds
    a head is trusted before it is read again.
    """

    def __init__(self, db: Database, *, max_versions: int = 1000, head_ttl_s: float = 1.0) -> None:
        self.db = db
        self.max_versions = max(1, max_versions)
        self.head_ttl_s = head_ttl_s
        self._versions: OrderedDict[tuple[uuid.UUID, int], Flow] = OrderedDict()
        self._heads: dict[uuid.UUID, tuple[float, FlowHead | None]] = {}
        #: Lookups in flight, shared by every caller asking for the same flow meanwhile.
        self._loading: dict[uuid.UUID, asyncio.Task[FlowHead | None]] = {}

    async def head(self, flow_id: uuid.UUID) -> FlowHead | None:
        """The flow's current head, or ``None`` when it does not exist."""
        cached = self._heads.get(flow_id)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        loading = self._loading.get(flow_id)
        if loading is None:
            loading = asyncio.ensure_future(self._load(flow_id))
            self._loading[flow_id] = loading
        # Shielded: a caller that goes away does not cancel the others' lookup.
        return await asyncio.shield(loading)

    async def _load(self, flow_id: uuid.UUID) -> FlowHead | None:
        me = asyncio.current_task()
        try:
            now = time.monotonic()
            info = await flow_store.ingest_info(self.db, flow_id)
            head = None
            if info is not None:
                enabled, version = info
                head = FlowHead(flow_id, enabled, version, await self.version(flow_id, version))
            if self._loading.get(flow_id) is me:  # else invalidated meanwhile: not cached
                if len(self._heads) > 10 * self.max_versions:
                    self._heads.clear()
                self._heads[flow_id] = (now + self.head_ttl_s, head)
            return head
        finally:
            if self._loading.get(flow_id) is me:
                del self._loading[flow_id]

    async def version(self, flow_id: uuid.UUID, version: int) -> Flow:
        """One compiled version (raises ``NotFound`` if it does not exist)."""
        key = (flow_id, version)
        flow = self._versions.get(key)
        if flow is not None:
            self._versions.move_to_end(key)
            return flow
        flow = parse_flow(await flow_store.get_version(self.db, flow_id, version))
        self._versions[key] = flow
        if len(self._versions) > self.max_versions:
            self._versions.popitem(last=False)
        return flow

    def invalidate(self, flow_id: uuid.UUID) -> None:
        """Forget the head (this process changed the flow); a lookup already in flight may
        have read the old state, so the next caller starts a new one."""
        self._heads.pop(flow_id, None)
        self._loading.pop(flow_id, None)
