"""Fixtures for the sandbox tests: one real fork-server for the session (see ``support``)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from conveyor.sandbox import Sandbox
from tests.sandbox.support import assert_no_strays, make_sandbox


@pytest.fixture(scope="session")
async def shared_sandbox() -> AsyncIterator[Sandbox]:
    """One sandbox for the whole session (default limits, 2 slots)."""
    async with make_sandbox() as sb:
        yield sb


@pytest.fixture
async def sandbox(shared_sandbox: Sandbox) -> AsyncIterator[Sandbox]:
    """The shared sandbox, checked for leftover processes after each test."""
    if not shared_sandbox.running:
        await shared_sandbox.start()
    yield shared_sandbox
    await assert_no_strays(shared_sandbox)
