"""Fixtures of the HA tests: a scratch dir the servers' user can use, and a :class:`Stack`
that stops everything a test started and proves no process is left behind."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.ha.load import Conveyor
from tests.ha.servers import give_to_server_user
from tests.polling import eventually


@pytest.fixture
def ha_dir() -> Iterator[Path]:
    """A fresh directory under /tmp owned by the servers' user (pytest's tmp dirs are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="conveyor-ha-"))
    path.chmod(0o755)
    give_to_server_user(path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _tree(pids: list[int]) -> dict[int, float]:
    """``pids`` and every process below them, by pid, with creation time (pids get reused)."""
    out = {}
    for pid in pids:
        try:
            root = psutil.Process(pid)
            for p in [root, *root.children(recursive=True)]:
                out[p.pid] = p.create_time()
        except psutil.NoSuchProcess:
            pass
    return out


def _alive(pid: int, created: float) -> str | None:
    try:
        p = psutil.Process(pid)
        if p.create_time() != created or p.status() == psutil.STATUS_ZOMBIE:
            return None
        return " ".join(p.cmdline())[:120] or p.name()
    except psutil.NoSuchProcess:
        return None


class Stack:
    """Conveyor processes and servers of one test, torn down in reverse order by
    :meth:`close`, which returns the processes that outlived the teardown."""

    def __init__(self) -> None:
        self.conveyors: list[Conveyor] = []
        self.servers: list[Any] = []
        self.exit_codes: list[int | None] = []
        self._closed = False

    def server(self, server: Any) -> Any:
        """Register a server (anything with ``kill()``) that the test has started."""
        self.servers.append(server)
        return server

    def conveyor(self, conveyor: Conveyor) -> Conveyor:
        self.conveyors.append(conveyor)
        return conveyor

    async def close(self) -> list[str]:
        if self._closed:
            return []
        self._closed = True
        # Only what this test started: the session's embedded servers are ours too.
        roots = [c.proc.pid for c in self.conveyors if c.proc is not None]
        for server in self.servers:
            process = getattr(server, "process", None)
            if process is not None and process.proc is not None:
                roots.append(process.proc.pid)
        seen = _tree(roots)
        # Conveyor drains first (SIGTERM) while its servers are still up.
        for c in reversed(self.conveyors):
            self.exit_codes.append(await c.stop())
        for s in reversed(self.servers):
            s.kill()
        left: list[str] = []

        def all_gone() -> bool:
            left[:] = [a for pid, t in seen.items() if (a := _alive(pid, t)) is not None]
            return not left

        with contextlib.suppress(AssertionError):  # what is left is the answer
            await eventually(all_gone, timeout_s=10, interval_s=0.1, what="processes gone")
        return left

    async def close_cleanly(self) -> None:
        """:meth:`close`, then assert every Conveyor exited 0 and no process outlived it."""
        left = await self.close()
        assert self.conveyors, "no conveyor up was started"
        expected = [0] * len(self.conveyors)
        assert self.exit_codes == expected, f"conveyor up exit codes {self.exit_codes}"
        assert not left, f"processes left after teardown: {left}"


@pytest.fixture
async def stack(ha_dir: Path) -> AsyncIterator[Stack]:
    """A :class:`Stack`; torn down here too if the test failed before closing it (before
    ``ha_dir`` goes away)."""
    s = Stack()
    try:
        yield s
    finally:
        await s.close()
