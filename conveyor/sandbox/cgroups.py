"""A cgroup per step process: memory (forks and memfds included) and process count per step.

``RLIMIT_AS`` limits one process's address space; a step that forks, or keeps data in a
``memfd`` or tmpfs file (which no address space counts), could hold several times
``AP_SANDBOX_MEMORY_LIMIT``. A cgroup counts every page its processes charge, whatever
holds it, so each child gets one of its own, with the memory limit (no swap) and
``pids.max`` = the process limit. The cgroup is also how a retired child's whole tree is
killed without its cooperation (``cgroup.kill`` where the kernel has it).

Two halves: :func:`prepare` runs in the worker, on the host's view of ``/sys/fs/cgroup``,
finds which hierarchy is writable — cgroup v2 with the ``memory`` and ``pids`` controllers
delegable to us, else cgroup v1 ``memory`` + ``pids`` (hybrid hosts, where the v2 mount may
still give ``cgroup.kill``) — and makes one parent directory per sandbox; :class:`ChildCgroups`
runs in the fork-server (standard library only) and makes, fills, kills and removes one
directory per child below those parents. Where nothing is writable the sandbox falls back
to rlimits and ``/readyz`` says ``limits: rlimit``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import time
from typing import Any

CGROUP_V2 = "cgroup-v2"
CGROUP_V1 = "cgroup-v1"
RLIMIT = "rlimit"
#: On cgroup v2, the processes of the worker's own cgroup move here (see ``_delegate``).
LEAF = "conveyor-main"
#: Sandbox parent cgroups are named ``conveyor-sandbox-<worker pid>-<n>``.
STALE_PREFIX = "conveyor-sandbox-"


@dataclasses.dataclass(frozen=True, slots=True)
class CgroupPlan:
    """Host directories under which each child gets a cgroup of its own.

    ``dirs`` maps a role to a directory: ``memory`` and ``pids`` (the same directory on v2),
    ``kill`` (a v2 directory whose ``cgroup.kill`` empties it at once; optional on v1).
    """

    version: str
    dirs: dict[str, str]

    def remove(self) -> None:
        """Remove the sandbox's parent directories (children first); best effort."""
        for path in sorted(set(self.dirs.values()), key=len, reverse=True):
            _rmtree_cgroup(path)


def _our_paths() -> dict[str, str]:
    """``controller -> path`` of this process's cgroups (``""`` is the v2 hierarchy)."""
    out: dict[str, str] = {}
    with open("/proc/self/cgroup") as fh:
        for line in fh:
            _hid, controllers, path = line.rstrip("\n").split(":", 2)
            for name in controllers.split(",") if controllers else [""]:
                out[name] = path
    return out


def _mounts() -> dict[str, str]:
    """``controller -> mount point`` of the cgroup hierarchies (``""`` for cgroup2)."""
    out: dict[str, str] = {}
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            left, _, right = line.partition(" - ")
            fields = left.split()
            fstype, _source, options = ([*right.split(), "", "", ""])[:3]
            point = fields[4].replace("\\040", " ")
            if fstype == "cgroup2":
                out.setdefault("", point)
            elif fstype == "cgroup":
                for opt in options.split(","):
                    if opt in ("memory", "pids"):
                        out.setdefault(opt, point)
    return out


def _write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _make(parent: str, name: str) -> str:
    path = os.path.join(parent, name)
    _remove_stale(parent)
    _rmtree_cgroup(path)  # a previous worker with our pid may have left it
    os.mkdir(path, 0o755)
    return path


def _remove_stale(parent: str) -> None:
    """Remove what workers that died without cleaning up left here (``<prefix>-<pid>-…``)."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(parent):
            head, _, rest = entry.name.partition(STALE_PREFIX)
            pid = rest.split("-", 1)[0]
            if head == "" and rest and pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                _rmtree_cgroup(entry.path)


def _rmtree_cgroup(path: str) -> None:
    """rmdir a cgroup directory and its (empty) sub-cgroups; cgroupfs has no other files."""
    if not os.path.isdir(path):
        return
    for entry in os.scandir(path):
        if entry.is_dir(follow_symlinks=False):
            _rmtree_cgroup(entry.path)
    with contextlib.suppress(OSError):
        os.rmdir(path)


def _v2(mounts: dict[str, str], ours: dict[str, str], name: str) -> CgroupPlan | None:
    root = mounts.get("")
    if root is None or "" not in ours:
        return None
    here = os.path.join(root, ours[""].lstrip("/"))
    try:
        with open(os.path.join(here, "cgroup.controllers")) as fh:
            available = set(fh.read().split())
    except OSError:
        return None
    if {"memory", "pids"} <= available:
        try:
            _delegate(here)
            parent = _make(here, name)
            _write(os.path.join(parent, "cgroup.subtree_control"), "+memory +pids")
            return CgroupPlan(CGROUP_V2, {"memory": parent, "pids": parent, "kill": parent})
        except OSError:
            _rmtree_cgroup(os.path.join(here, name))
    return None


def _delegate(here: str) -> None:
    """Enable ``memory`` and ``pids`` for the sub-cgroups of ``here`` (our own cgroup).

    The kernel refuses that while processes sit directly in ``here`` (cgroup v2's "no
    internal processes" rule) — and we are one of them. So, as container entrypoints that
    nest cgroups do, every process of ``here`` is first moved into a leaf of its own
    (:data:`LEAF`), which changes nothing for them: ``here``'s limits still apply above.
    """
    control = os.path.join(here, "cgroup.subtree_control")
    with open(control) as fh:
        if {"memory", "pids"} <= set(fh.read().split()):
            return  # done already (another worker of this cgroup, or the operator)
    try:
        _write(control, "+memory +pids")
        return
    except OSError:
        pass
    leaf = os.path.join(here, LEAF)
    with contextlib.suppress(FileExistsError):
        os.mkdir(leaf, 0o755)
    for _ in range(10):
        with open(os.path.join(here, "cgroup.procs")) as fh:
            pids = fh.read().split()
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):  # exited meanwhile
                _write(os.path.join(leaf, "cgroup.procs"), pid)
    _write(control, "+memory +pids")


def _v1(mounts: dict[str, str], ours: dict[str, str], name: str) -> CgroupPlan | None:
    dirs: dict[str, str] = {}
    try:
        for controller in ("memory", "pids"):
            if controller not in mounts or controller not in ours:
                raise OSError(f"no cgroup v1 {controller} hierarchy")
            here = os.path.join(mounts[controller], ours[controller].lstrip("/"))
            dirs[controller] = _make(here, name)
            if not os.path.exists(os.path.join(dirs[controller], "cgroup.procs")):
                raise OSError(f"{dirs[controller]} is not a cgroup")
    except OSError:
        for path in dirs.values():
            _rmtree_cgroup(path)
        return None
    # Hybrid hosts: the v2 hierarchy (no controllers) still kills a whole cgroup at once.
    root = mounts.get("")
    if root is not None and "" in ours:
        with contextlib.suppress(OSError):
            kill = _make(os.path.join(root, ours[""].lstrip("/")), name)
            if os.path.exists(os.path.join(kill, "cgroup.kill")):
                dirs["kill"] = kill
            else:
                _rmtree_cgroup(kill)
    return CgroupPlan(CGROUP_V1, dirs)


def prepare(name: str) -> CgroupPlan | None:
    """Make the sandbox's parent cgroups (named ``name``) where writable; ``None`` if not."""
    try:
        mounts, ours = _mounts(), _our_paths()
    except OSError:
        return None
    return _v2(mounts, ours, name) or _v1(mounts, ours, name)


class ChildCgroups:
    """The fork-server's side: one cgroup directory per child, below ``dirs`` (its view).

    Parameters: ``version`` (``cgroup-v1`` | ``cgroup-v2``); ``dirs`` as in
    :class:`CgroupPlan`, as paths the fork-server sees (bubblewrap binds them under ``/tmp``,
    which every child's private ``/tmp`` hides).
    """

    def __init__(self, version: str, dirs: dict[str, str]) -> None:
        self.version = version
        self.dirs = dirs

    def create(self, key: str, memory_kb: int, nproc: int) -> dict[str, str]:
        """Make the child's directories and set its limits; returns ``role -> directory``."""
        made: dict[str, str] = {}
        try:
            for role, parent in self.dirs.items():
                path = os.path.join(parent, key)
                if path not in made.values():
                    _rmtree_cgroup(path)
                    os.mkdir(path, 0o755)
                made[role] = path
            mem = str(memory_kb * 1024)
            if self.version == CGROUP_V2:
                _write(os.path.join(made["memory"], "memory.max"), mem)
                with contextlib.suppress(OSError):
                    _write(os.path.join(made["memory"], "memory.swap.max"), "0")
                _write(os.path.join(made["pids"], "pids.max"), str(nproc))
            else:
                _write(os.path.join(made["memory"], "memory.limit_in_bytes"), mem)
                # No swap either (when the kernel accounts it): memsw ≥ memory is required.
                with contextlib.suppress(OSError):
                    _write(os.path.join(made["memory"], "memory.memsw.limit_in_bytes"), mem)
                _write(os.path.join(made["pids"], "pids.max"), str(nproc))
        except OSError:
            self.remove(made)
            raise
        return made

    @staticmethod
    def attach(made: dict[str, str], pid: int) -> None:
        """Move ``pid`` (a fresh child that has not run user code yet) into its cgroups."""
        for path in set(made.values()):
            _write(os.path.join(path, "cgroup.procs"), str(pid))

    @staticmethod
    def procs(made: dict[str, str]) -> list[int]:
        out: set[int] = set()
        for path in set(made.values()):
            with contextlib.suppress(OSError), open(os.path.join(path, "cgroup.procs")) as fh:
                out.update(int(p) for p in fh.read().split())
        return sorted(out)

    def oom_killed(self, made: dict[str, str]) -> bool:
        """Whether the kernel killed a process of this cgroup for its memory limit."""
        name = "memory.events" if self.version == CGROUP_V2 else "memory.oom_control"
        with contextlib.suppress(OSError), open(os.path.join(made["memory"], name)) as fh:
            for line in fh:
                key, _, value = line.partition(" ")
                if key == "oom_kill" and int(value or 0) > 0:
                    return True
        return False

    def kill(self, made: dict[str, str]) -> None:
        """SIGKILL every process of the cgroup (``cgroup.kill``: one kernel pass)."""
        if "kill" in made:
            with contextlib.suppress(OSError):
                _write(os.path.join(made["kill"], "cgroup.kill"), "1")
                return
        # v1 only: pids.max bounds how fast the tree can grow while we walk it.
        for _ in range(100):
            pids = self.procs(made)
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)

    @staticmethod
    def remove(made: dict[str, str]) -> bool:
        """rmdir the child's directories; False while a process (or zombie) is still in one."""
        ok = True
        for path in sorted(set(made.values()), key=len, reverse=True):
            try:
                os.rmdir(path)
            except FileNotFoundError:
                continue
            except OSError:
                ok = False
        return ok

    def retire(self, made: dict[str, str], deadline_s: float = 0.0) -> bool:
        """Kill, then remove; retries until ``deadline_s`` (0: one attempt)."""
        end = time.monotonic() + deadline_s
        while True:
            self.kill(made)
            if self.remove(made):
                return True
            if time.monotonic() >= end:
                return False
            time.sleep(0.002)


def describe(plan: CgroupPlan | None) -> dict[str, Any]:
    """``{"limits": …}`` for ``/readyz``."""
    return {"limits": plan.version if plan else RLIMIT}
