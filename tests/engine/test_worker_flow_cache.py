"""The worker's compiled-flow cache (by the job's flow id text and version) never holds more
versions than the registry may keep (``AP_PIECES_CACHE_MAX_ENTRIES``): it keeps them alive."""

from __future__ import annotations

from typing import Any

from conveyor.engine.worker import RunWorker
from conveyor.store import runs as run_store
from conveyor.store.db import Database
from tests.engine.test_in_memory_runs import _submit, worker  # noqa: F401  (the fixture)

FLOW = {
    "name": "tiny",
    "trigger": {"type": "webhook"},
    "steps": [{"name": "t", "type": "transform", "input": {"n": "{{trigger.body.n}}"}}],
}


async def test_the_flow_cache_is_bounded_by_the_registry(
    db: Database,
    worker: RunWorker,  # noqa: F811
) -> None:
    worker.registry.max_versions = 2
    rids = [await _submit(db, worker, FLOW) for _ in range(5)]  # five flows, one version each
    await worker.consumer.drain()
    for rid in rids:
        assert (await run_store.get_run(db, rid))["status"] == "SUCCEEDED"
    cached: dict[Any, Any] = worker._flows
    assert 1 <= len(cached) <= 2
