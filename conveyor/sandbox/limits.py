"""Kernel knobs a step's child process is put under: rlimits, uid, namespaces, prctl.

Everything here runs in a freshly forked child of the fork-server, before the user's code
is loaded, and only calls into the kernel (``resource``, ``os`` and a few libc functions via
ctypes) — no allocation-heavy work, no imports beyond the standard library. The order in
:func:`lock_down` matters and is explained where it happens.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import errno
import fcntl
import os
import platform
import resource
import signal
import socket
import struct
from typing import Any

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NEWIPC = 0x08000000
_CAP_VERSION_3 = 0x20080522
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
_MOUNT_ATTR_RDONLY = 0x1
_AT_FDCWD = -100
_AT_RECURSIVE = 0x8000
#: mount_setattr(2): the same number on x86_64 and aarch64 (the generic syscall table).
_SYS_MOUNT_SETATTR = 442
#: pivot_root(2) by architecture (x86_64 has its own table; the others the generic one).
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}
_MNT_DETACH = 2
#: The device nodes a step's private /dev holds (bound from the host's).
_DEVICES = ("null", "zero", "full", "random", "urandom")
_DEV_LINKS = (
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
)


@dataclasses.dataclass(frozen=True, slots=True)
class Limits:
    """What one child may use; sent by the worker with every spawn.

    Parameters:
        memory_kb: ``RLIMIT_AS`` — address space in KiB (``AP_SANDBOX_MEMORY_LIMIT``).
        cpu_s: ``RLIMIT_CPU`` soft limit in seconds of CPU for the child's lifetime (a warm
            child is recycled once it has used half of it); the hard limit is one more.
        nofile: ``RLIMIT_NOFILE`` — open descriptors.
        nproc: ``RLIMIT_NPROC`` — processes and threads of the child's uid (its whole tree).
        fsize_kb: ``RLIMIT_FSIZE`` — largest file the child may write, KiB.
        tmp_kb: size of the child's private ``/tmp`` (tmpfs), KiB.
        log_bytes: stdout + stderr kept per execution; the rest is counted, not stored.
        output_bytes: largest serialised ``run()`` result.
        code_cache: compiled step sources a warm child keeps (``AP_PIECES_CACHE_MAX_ENTRIES``).
        network_namespace: give every child a network namespace of its own, so concurrent
            slots and warm children of other flows cannot reach each other over loopback or
            abstract unix sockets (on by default; costs ~0.6 ms per fresh child).
    """

    memory_kb: int = 1_048_576
    cpu_s: int = 600
    nofile: int = 256
    nproc: int = 128
    fsize_kb: int = 65_536
    tmp_kb: int = 65_536
    log_bytes: int = 1 << 20
    output_bytes: int = 16 << 20
    code_cache: int = 1000
    network_namespace: bool = True

    def to_wire(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> Limits:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def prctl(option: int, arg: int) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0), f"prctl({option})")


def set_child_subreaper() -> None:
    """Orphaned descendants re-parent to us instead of escaping to init, so we can kill them."""
    prctl(PR_SET_CHILD_SUBREAPER, 1)


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def setns(fd: int, nstype: int) -> None:
    _check(_libc.setns(fd, nstype), "setns")


def mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    _check(
        _libc.mount(
            source.encode(),
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {target}",
    )


def private_tmp(
    uid: int,
    limits: Limits,
    *,
    network: bool,
    view: dict[str, Any] | None = None,
) -> None:
    """Mount and IPC namespaces of the child's own, fresh tmpfs on ``/tmp`` and ``/dev/shm``.

    Files one step leaves there vanish with the child, and no two children (of any flow)
    share a writable directory. Requires ``CAP_SYS_ADMIN``, which the fork-server holds
    inside bubblewrap and drops for the child right after.

    ``view`` (:func:`~conveyor.sandbox.isolation.host_view`) is for launchers without
    bubblewrap, where the child would otherwise see the host's filesystem: the child builds
    a root of its own instead (:func:`_private_root`) and pivots into it.
    """
    # Own SysV IPC / POSIX mqueue namespace too: shared-memory segments would otherwise
    # outlive the child and be readable by whichever flow gets its uid next.
    unshare(CLONE_NEWNS | CLONE_NEWIPC | (CLONE_NEWNET if network else 0))
    # Without MS_PRIVATE our mounts could propagate back into the fork-server's view.
    mount("none", "/", None, MS_REC | MS_PRIVATE, None)
    if view is not None:
        _private_root(uid, limits, view)
    else:
        opts = f"size={limits.tmp_kb}k,nr_inodes=4096,mode=0700,uid={uid},gid={uid}"
        mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, opts)
        if os.path.isdir("/dev/shm"):
            mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, opts)
    if network:
        # A new network namespace starts with ``lo`` down; up it so loopback inside the
        # step behaves normally (and still reaches nothing but the step itself).
        _loopback_up()


def _read_only_tree(path: str, *, recursive: bool = True) -> None:
    class _Attr(ctypes.Structure):
        _fields_ = (
            ("attr_set", ctypes.c_uint64),
            ("attr_clr", ctypes.c_uint64),
            ("propagation", ctypes.c_uint64),
            ("userns_fd", ctypes.c_uint64),
        )

    attr = _Attr(_MOUNT_ATTR_RDONLY, 0, 0, 0)
    ret = _libc.syscall(
        _SYS_MOUNT_SETATTR,
        _AT_FDCWD,
        path.encode(),
        _AT_RECURSIVE if recursive else 0,
        ctypes.byref(attr),
        ctypes.sizeof(attr),
    )
    _check(ret, f"mount_setattr {path} read-only")


def _pivot_root() -> None:
    """Make the current directory ``/`` and detach the old root (``pivot_root(".", ".")``)."""
    nr = _SYS_PIVOT_ROOT.get(platform.machine())
    if nr is None:
        raise OSError(errno.ENOSYS, f"pivot_root: unknown syscall on {platform.machine()}")
    _check(_libc.syscall(nr, b".", b"."), "pivot_root")
    # The old root is now stacked on the new one at "/": detach it, with everything below.
    _check(_libc.umount2(b".", _MNT_DETACH), "umount old root")
    os.chdir("/")


def _private_root(uid: int, limits: Limits, view: dict[str, Any]) -> None:
    """Build a read-only root holding only what a step needs, and pivot into it.

    An empty tmpfs (on ``/tmp`` of our own mount namespace, the staging point) gets a
    private writable tmpfs on ``/tmp`` and ``/dev/shm``, the host paths of
    ``view["binds"]`` bound read-only at their own paths (after ``/tmp``, so a checkout
    under the host's ``/tmp`` stays visible), the files of ``view["files"]``, the symlinks
    of ``view["symlinks"]``, a read-only ``/dev`` with only ``null``, ``zero``, ``full``,
    ``random`` and ``urandom``, and a fresh ``/proc`` of our PID namespace;
    ``view["hide"]`` (config directories under an exposed path) get an empty tmpfs and
    ``view["sockets"]`` (unix sockets under an exposed path) ``/dev/null``. Then the old
    root is detached: the host's home directories, ``/etc``, ``/var``, ``/run``, ``/srv``,
    working directories and every unix socket in them, now or later, do not exist for the
    step, whatever its uid may read on the host.
    """
    binds = [(os.open(src, os.O_PATH | os.O_CLOEXEC), dest) for src, dest in view["binds"]]
    files = [(os.open(p, os.O_PATH | os.O_CLOEXEC), p) for p in view.get("files") or ()]
    devices = [
        (os.open(f"/dev/{name}", os.O_PATH | os.O_CLOEXEC), name)
        for name in _DEVICES
        if os.path.exists(f"/dev/{name}")
    ]
    old_umask = os.umask(0o022)
    root = "/tmp"
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=256k,nr_inodes=1024,mode=0755")
    private = f"size={limits.tmp_kb}k,nr_inodes=4096,mode=0700,uid={uid},gid={uid}"
    os.mkdir(root + "/tmp", 0o755)
    mount("tmpfs", root + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, private)
    read_only = [root + "/dev"]
    for fd, dest in binds:
        os.makedirs(root + dest, mode=0o755, exist_ok=True)
        mount(f"/proc/self/fd/{fd}", root + dest, None, MS_BIND | MS_REC, None)
        read_only.append(root + dest)
    for target, link in view.get("symlinks") or ():
        os.makedirs(os.path.dirname(root + link), mode=0o755, exist_ok=True)
        os.symlink(target, root + link)
    for fd, path in files:
        os.makedirs(os.path.dirname(root + path), mode=0o755, exist_ok=True)
        os.close(os.open(root + path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))
        mount(f"/proc/self/fd/{fd}", root + path, None, MS_BIND, None)
        read_only.append(root + path)
    dev = root + "/dev"
    os.mkdir(dev, 0o755)
    mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "size=16k,nr_inodes=64,mode=0755")
    for fd, name in devices:
        os.close(os.open(f"{dev}/{name}", os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o666))
        mount(f"/proc/self/fd/{fd}", f"{dev}/{name}", None, MS_BIND, None)
    for name, target in _DEV_LINKS:
        os.symlink(target, f"{dev}/{name}")
    os.mkdir(f"{dev}/shm", 0o755)
    for fd, _ in (*binds, *files, *devices):
        os.close(fd)
    for path in view.get("hide") or ():
        with contextlib.suppress(OSError):  # gone since the worker looked
            flags = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
            mount("tmpfs", root + path, "tmpfs", flags, "size=4k")
    for path in view.get("sockets") or ():
        with contextlib.suppress(OSError):  # gone, or under a directory hidden above
            if os.path.exists(root + path) and not os.path.isdir(root + path):
                mount("/dev/null", root + path, None, MS_BIND, None)
    os.mkdir(root + "/proc", 0o755)
    # Mounted while the host's /proc is still visible (the kernel asks for that in a user
    # namespace); it shows our PID namespace: the child's own, or the fork-server's.
    mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
    # Read-only: the new root itself (not recursively: /tmp and /dev/shm stay writable),
    # each bound host path with everything below it, and /dev (the nodes stay usable).
    _read_only_tree(root, recursive=False)
    for path in read_only:
        _read_only_tree(path)
    mount("tmpfs", f"{dev}/shm", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, private)
    os.chdir(root)
    _pivot_root()
    os.chdir("/tmp")
    os.umask(old_umask)


def _loopback_up() -> None:
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sh", b"lo", 0)
        flags = struct.unpack("16sh", fcntl.ioctl(s, siocgifflags, req))[1]
        fcntl.ioctl(s, siocsifflags, struct.pack("16sh", b"lo", flags | iff_up))


def apply_rlimits(limits: Limits) -> None:
    """Set every rlimit; soft and hard alike so the child cannot raise them back."""
    mem = limits.memory_kb * 1024
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 1))
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits.nofile, limits.nofile))
    resource.setrlimit(resource.RLIMIT_NPROC, (limits.nproc, limits.nproc))
    fsize = limits.fsize_kb * 1024
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # Over RLIMIT_FSIZE the kernel sends SIGXFSZ, whose default action kills silently;
    # ignored, the write fails with EFBIG and the step sees an ordinary OSError.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def drop_privileges(uid: int) -> None:
    """Become ``uid`` for good: no groups, no capabilities, no way back (no_new_privs)."""
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    prctl(PR_SET_NO_NEW_PRIVS, 1)


class _CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    _fields_ = (
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    )


def drop_capabilities() -> None:
    """Empty the effective, permitted and inheritable sets and set no_new_privs.

    For a child that keeps its uid (no root, so no uid to drop to): the fork-server's
    capabilities inside bubblewrap's user namespace must not reach the step. With
    no_new_privs an ``execve`` cannot give them back, not even as uid 0 of the namespace.
    """
    header = _CapHeader(_CAP_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.capset(ctypes.byref(header), ctypes.byref(data)), "capset")
    prctl(PR_SET_NO_NEW_PRIVS, 1)


def reap_own_namespace() -> int:
    """As init of a PID namespace of our own: kill and reap every other process in it.

    ``kill(-1)`` from a namespace's init reaches every process of the namespace but the
    caller, in one kernel pass, so even a fork bomb cannot outrun it; orphans re-parent to
    us and are reaped until none is left. Returns how many were reaped.
    """
    try:
        if os.waitpid(-1, os.WNOHANG) == (0, 0):
            pass  # children exist, none has exited yet
    except ChildProcessError:
        return 0
    reaped = 0
    with contextlib.suppress(ProcessLookupError):
        os.kill(-1, signal.SIGKILL)
    while True:
        try:
            os.waitpid(-1, 0)
            reaped += 1
        except ChildProcessError:
            return reaped


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` (all its threads), from ``/proc``."""
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as fh:
                out.extend(int(p) for p in fh.read().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return out


def _stop_tree(pid: int, keep: frozenset[int]) -> None:
    """SIGSTOP every descendant of ``pid`` (not in ``keep``) until the tree stops growing.

    A stopped process cannot fork, so repeating the walk until it finds nobody new freezes
    even a fork bomb; killing one generation at a time instead can race it indefinitely.
    """
    stopped: set[int] = set()
    for _ in range(1000):
        found = False
        stack = [p for p in children_of(pid) if p not in keep]
        while stack:
            p = stack.pop()
            if p not in stopped:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGSTOP)
                stopped.add(p)
                found = True
            stack.extend(children_of(p))
        if not found:
            return


def kill_children(pid: int, keep: frozenset[int] = frozenset()) -> int:
    """SIGKILL and reap every descendant of ``pid`` (which must be us) not in ``keep``.

    The tree is frozen first (:func:`_stop_tree`), then killed; the loop continues because
    a killed process re-parents its own children to us (we are a subreaper) and ends when
    no stray child is left. Returns how many processes were signalled.
    """
    killed = 0
    if not any(p not in keep for p in children_of(pid)):
        return 0
    _stop_tree(pid, keep)
    while True:
        strays = [p for p in children_of(pid) if p not in keep]
        if not strays:
            return killed
        stack = list(strays)
        while stack:
            p = stack.pop()
            stack.extend(children_of(p))
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
                killed += 1
        for p in strays:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(p, 0)


def uid_processes(lo: int, hi: int, *, exclude: int | None = None) -> list[int]:
    """Pids (zombies excepted) whose real uid is in ``lo`` ≤ uid < ``hi``, from ``/proc``."""
    found: list[int] = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == exclude:
            continue
        try:
            with open(f"/proc/{name}/status", "rb") as fh:
                state = b""
                for line in fh:
                    if line.startswith(b"State:"):
                        state = line.split()[1]
                    elif line.startswith(b"Uid:"):
                        if lo <= int(line.split()[1]) < hi and state != b"Z":
                            found.append(int(name))
                        break
        except OSError:
            continue
    return found


def kill_uid_range(lo: int, hi: int, *, rounds: int = 200) -> int:
    """Freeze, then kill, every process of the uids ``lo`` … ``hi - 1``; how many are left.

    The last resort when the fork-server itself is gone without a PID namespace around
    it: what its children left behind was re-parented to init, out of anyone's tree, and
    only the uid still says whose it is.
    """
    for _ in range(rounds):
        pids = uid_processes(lo, hi)
        if not pids:
            return 0
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            for p in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(p, sig)
    return len(uid_processes(lo, hi))
