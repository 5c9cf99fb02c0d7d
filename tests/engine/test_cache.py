"""The compiled-flow cache: parse once per version, LRU eviction."""

from __future__ import annotations

from typing import Any

from conveyor.engine.cache import FlowCache
from tests.engine.support import flow_doc

DOC = flow_doc({"name": "a", "type": "transform", "input": {"x": "{{trigger.body}}"}})


def test_compile_parses_once_per_version() -> None:
    """A second compile of the same version is a hit returning the same Flow object."""
    cache = FlowCache(10)
    first = cache.compile("f", 1, DOC)
    assert cache.compile("f", 1, DOC) is first
    assert (cache.hits, cache.misses) == (1, 1)
    assert cache.compile("f", 2, DOC) is not first


def test_lru_eviction_and_discard() -> None:
    """Beyond max_entries the least recently used version goes; discard drops a flow."""
    cache = FlowCache(2)
    cache.compile("f", 1, DOC)
    cache.compile("f", 2, DOC)
    cache.get("f", 1)
    cache.compile("g", 1, DOC)
    assert cache.get("f", 2) is None and cache.get("f", 1) is not None
    cache.discard("f")
    assert len(cache) == 1


async def test_load_fetches_only_on_miss() -> None:
    """load() calls the fetcher once per version."""
    calls: list[tuple[str, int]] = []

    async def fetch(flow_id: str, version: int) -> Any:
        calls.append((flow_id, version))
        return DOC

    cache = FlowCache()
    await cache.load("f", 1, fetch)
    await cache.load("f", 1, fetch)
    assert calls == [("f", 1)]
