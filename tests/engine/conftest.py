"""Engine fixtures: checkpoint sink, the subprocess sandbox and an executor factory."""

from __future__ import annotations

import pytest

from tests.engine.local_sandbox import LocalSandbox
from tests.engine.support import MemorySink


@pytest.fixture
def sink() -> MemorySink:
    """A fresh in-memory checkpoint sink."""
    return MemorySink()


@pytest.fixture(scope="session")
def sandbox() -> LocalSandbox:
    """The real subprocess sandbox (one python child per code step)."""
    return LocalSandbox(memory_kb=512 * 1024)
