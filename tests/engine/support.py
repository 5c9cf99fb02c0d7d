"""Test support for the engine: an in-memory checkpoint sink, a static resolver, run helpers.

The sink is a real implementation of the CheckpointSink protocol (the worker's writes to
Postgres), not a mock; the resolver lets SSRF tests decide what a name resolves to so no
test ever depends on, or reaches, real DNS.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence
from typing import Any

from aiohttp.abc import AbstractResolver, ResolveResult

from conveyor.engine.context import RunContext, StepRecord


class MemorySink:
    """Keeps every step record in order, per run."""

    def __init__(self) -> None:
        self.records: list[StepRecord] = []
        self.events: list[str] = []

    async def step_finished(self, run_id: str, record: StepRecord) -> None:
        self.records.append(record)
        self.events.append(f"step:{record['name']}")

    def by_name(self, name: str) -> list[StepRecord]:
        return [r for r in self.records if r["name"] == name]

    def one(self, name: str) -> StepRecord:
        (rec,) = self.by_name(name)
        return rec


class StaticResolver(AbstractResolver):
    """Resolves names from a fixed table (a name may map to several addresses)."""

    def __init__(self, table: Mapping[str, Sequence[str]]) -> None:
        self.table = dict(table)

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if host not in self.table:
            raise OSError(f"test resolver: unknown host {host}")
        return [
            {
                "hostname": host,
                "host": ip,
                "port": port,
                "family": socket.AF_INET6 if ":" in ip else socket.AF_INET,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
            for ip in self.table[host]
        ]

    async def close(self) -> None:
        return None


def make_ctx(
    body: Any = None,
    *,
    run_id: str = "run-1",
    secrets: Mapping[str, str] | None = None,
    checkpoints: Sequence[StepRecord] = (),
) -> RunContext:
    """A run context for a POST webhook carrying ``body``."""
    return RunContext(
        run_id=run_id,
        flow_id="flow-1",
        flow_version=1,
        trigger={"method": "POST", "headers": {}, "query": {}, "body": body},
        secrets=secrets or {},
        checkpoints=checkpoints,
    )


def flow_doc(*steps: dict[str, Any]) -> dict[str, Any]:
    """A webhook flow document with ``steps``."""
    return {"name": "test", "trigger": {"type": "webhook"}, "steps": list(steps)}
