"""The fork-server: started once per worker inside the isolation, forks the step processes.

It is a small single-threaded loop over two descriptors — the control socket to the worker
and the wake-up pipe of ``SIGCHLD`` — and never runs user code itself. On ``spawn`` it makes
a socketpair, forks (the child locks itself down, see :mod:`conveyor.sandbox.child`) and
hands the worker its end of the pair, so the worker then talks to the child directly and
every execution costs one round trip, not two. It is the subreaper of everything below it:
when a child dies (recycled, crashed, or killed on the worker's ``kill`` for a timeout)
every process that child left behind is re-parented here and killed before the worker is
told the child is gone — so "exit" means "and nothing of it is left".

A child is never asked to exit: the worker's ``retire`` (done with it) and ``kill`` (wall
time) both SIGKILL it. Where cgroups are writable every child also has a cgroup of its own
(:mod:`conveyor.sandbox.cgroups`, made before the fork, joined before the worker gets the
child's socket): its limits cover the whole tree, and when the child is reaped everything
left in the cgroup is killed and the directory removed before its uid is reused.

When it runs as root every child gets a uid of its own from a pool (``uid_base`` …), held
until the child's whole tree is gone. That makes the cleanup atomic even against a fork
bomb: a helper that takes the child's uid and calls ``kill(-1, SIGKILL)`` inside the PID
namespace kills every process of that uid in one kernel pass (a fork racing with it fails,
its parent having a fatal signal pending), and repeats until nothing of the uid is left.

Modules named in the start-up config are imported before the first fork (piece caching,
``AP_PREWARM_CACHE_ON_STARTUP``), then the heap is frozen so forks share it copy-on-write.

The fork-server, and so every step process, runs under ``SCHED_BATCH``
(:func:`below_the_worker`): the same CPU share as the worker, but a step process woken by
the worker's request does not preempt it. A scheduling hint, not a limit — user code may set
its own policy back (``sched_setscheduler`` needs no privilege to do so); the limits are the
rlimits, the cgroup and the timeout.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import selectors
import shutil
import signal
import socket
import sys
import time
from typing import Any, NoReturn

import orjson

from conveyor.sandbox import limits as lim
from conveyor.sandbox.cgroups import ChildCgroups
from conveyor.sandbox.child import fallback_tmp, lock_down, serve
from conveyor.sandbox.protocol import BlockingReader, ProtocolError, send_frame

#: Exit code of a child that failed to lock itself down (it never ran user code).
LOCKDOWN_FAILED = 70


class ForkServer:
    """State of the fork-server loop; ``config`` is the JSON the worker passed in argv."""

    def __init__(self, ctl: socket.socket, config: dict[str, Any]) -> None:
        self.ctl = ctl
        self.config = config
        self.pid = os.getpid()
        # pid -> [execution id, killed-by-worker, uid or None, cgroup dirs or None]
        self.children: dict[int, list[Any]] = {}
        self._exited: list[dict[str, Any]] = []
        self._dirty_uids: list[int] = []
        # Cgroups of dead children not yet empty: (dirs, uid held until they are removed).
        self._pending_cgroups: list[tuple[dict[str, str], int | None]] = []
        self._pending_rounds = 0
        cg = config.get("cgroup") or None
        self.cgroups = ChildCgroups(cg["version"], cg["dirs"]) if cg else None
        #: How the child's mount namespace hides the host (launchers without bubblewrap).
        self.view: dict[str, Any] | None = config.get("view") or None
        base = int(config.get("uid_base", 60_000))
        self._free_uids = list(range(base + int(config.get("uid_count", 1000)) - 1, base - 1, -1))
        self._pid_namespace = False
        self._view_ok = False
        self._pidns_fd = -1
        self.reader = BlockingReader(ctl, max_frame=1 << 20)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # ------------------------------------------------------------------ start-up
    def prewarm(self) -> list[str]:
        failed: list[str] = []
        for name in self.config.get("prewarm", ()):
            try:
                importlib.import_module(name)
            except Exception as exc:
                failed.append(f"{name}: {type(exc).__name__}: {exc}")
        return failed

    def probe(self) -> dict[str, Any]:
        """What isolation is really in force, measured from inside rather than assumed."""
        try:
            interfaces = sorted(name for _, name in socket.if_nameindex())
        except OSError:
            interfaces = []
        uid = int(self.config.get("probe_uid", 65_000))
        cgroup_ok = self._probe_cgroups()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                lim.private_tmp(os.getuid(), lim.Limits(tmp_kb=1024), network=True, view=self.view)
                code |= 1 | 8
            except BaseException:
                try:
                    lim.private_tmp(
                        os.getuid(), lim.Limits(tmp_kb=1024), network=False, view=self.view
                    )
                    code |= 1
                except BaseException:
                    pass
            try:
                lim.unshare(lim.CLONE_NEWPID)
                code |= 4
            except BaseException:
                pass
            try:
                if os.geteuid() == 0:
                    lim.drop_privileges(uid)
                    code |= 2
            except BaseException:
                pass
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        bits = os.waitstatus_to_exitcode(status)
        return {
            "interfaces": interfaces,
            "network_isolated": interfaces == ["lo"],
            "pid": self.pid,
            "pid_namespace": self.pid <= 2,  # bwrap runs us as 2, unshare as 1
            "private_tmp": bool(bits & 1),
            "host_view_hardened": bool(bits & 1) and self.view is not None,
            "uid_drop": bool(bits & 2),
            "child_pid_namespace": bool(bits & 4),
            "child_network_namespace": bool(bits & 8),
            "cgroup": self.cgroups.version if cgroup_ok and self.cgroups else None,
            "uids": len(self._free_uids),
            "root": os.geteuid() == 0,
        }

    def _probe_cgroups(self) -> bool:
        """Make, join and remove one child cgroup; on any failure run without cgroups."""
        if self.cgroups is None:
            return False
        try:
            made = self.cgroups.create("probe", 65_536, 8)
        except OSError as exc:
            self._complain(f"cgroups unusable, limits fall back to rlimits: {exc}")
            self.cgroups = None
            return False
        hold_r, hold_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(hold_w)
            os.read(hold_r, 1)  # until the parent is done with us
            os._exit(0)
        os.close(hold_r)
        try:
            self.cgroups.attach(made, pid)
            ok = self.cgroups.procs(made) == [pid]
        except OSError as exc:
            self._complain(f"cannot join a child cgroup, limits fall back to rlimits: {exc}")
            ok = False
        os.close(hold_w)
        os.waitpid(pid, 0)
        if not self.cgroups.retire(made, 1.0):
            ok = False
        if not ok:
            self.cgroups = None
        return ok

    @staticmethod
    def _complain(text: str) -> None:
        with contextlib.suppress(OSError):
            os.write(2, f"conveyor sandbox: {text}\n".encode())

    # ------------------------------------------------------------------ loop
    def run(self) -> NoReturn:
        lim.set_child_subreaper()
        # Not ptrace-able and no readable /proc/PID/environ, even for a child that runs
        # under our own uid (no root, so no uid drop).
        lim.prctl(lim.PR_SET_DUMPABLE, 0)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.set_wakeup_fd(self._wake_w)
        # The worker stops us by closing the socket or by SIGTERM; either way: clean up.
        signal.signal(signal.SIGTERM, lambda *_: self.shutdown())
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        failed = self.prewarm()
        probe = self.probe()
        self._pid_namespace = bool(probe["pid_namespace"])
        self._view_ok = bool(probe["host_view_hardened"])
        gc.collect()
        gc.freeze()
        send_frame(self.ctl, {"op": "hello", "probe": probe, "prewarm_failed": failed})
        sel = selectors.DefaultSelector()
        sel.register(self.ctl, selectors.EVENT_READ, "ctl")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        while True:
            # Cgroups of dead children that were not empty yet are retried every few ms,
            # then (one that stays busy: a process stuck in the kernel) twice a second.
            if not self._pending_cgroups:
                self._pending_rounds = 0
            wait = None
            if self._pending_cgroups:
                self._pending_rounds += 1
                wait = 0.005 if self._pending_rounds < 400 else 0.5
            events = sel.select(wait)
            if not events and self._pending_cgroups:
                self.reap()
            for key, _ in events:
                if key.data == "wake":
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)
                    self.reap()
                    continue
                try:
                    data = self.ctl.recv(1 << 16)
                except InterruptedError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    self.shutdown()
                try:
                    frames = self.reader.feed(data)
                except ProtocolError:
                    self.shutdown()
                for msg in frames:
                    self.handle(msg)

    def handle(self, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        if op == "spawn":
            self.spawn(msg)
        elif op in ("kill", "retire"):
            # "kill": wall time is up (reported as killed); "retire": the worker is done
            # with the child. Either way nothing is asked of the child: SIGKILL, and its
            # tree follows when it is reaped (cgroup, PID namespace or uid sweep).
            for pid, info in self.children.items():
                if info[0] == msg["id"]:
                    info[1] = info[1] or op == "kill"
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        elif op == "shutdown":
            self.shutdown()

    def _refuse(self, cid: Any, reason: str) -> None:
        send_frame(
            self.ctl,
            {
                "op": "exit",
                "id": cid,
                "lost": True,
                "code": None,
                "reason": reason,
                "free": len(self._free_uids),
            },
        )

    def spawn(self, msg: dict[str, Any]) -> None:
        limits = lim.Limits.from_wire(msg.get("limits") or {})
        locked = bool(msg.get("locked", True))
        uid = self._free_uids.pop() if msg.get("drop_uid") and self._free_uids else None
        if msg.get("drop_uid") and uid is None:
            self._refuse(msg["id"], "capacity: no free sandbox uid")
            return
        made: dict[str, str] | None = None
        if self.cgroups is not None and locked:
            try:
                made = self.cgroups.create(f"c{msg['id']}", limits.memory_kb, limits.nproc)
            except OSError as exc:
                if uid is not None:
                    self._free_uids.append(uid)
                self._refuse(msg["id"], f"cgroup: {exc}")
                return
        pidns = bool(msg.get("pidns"))
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        if pidns:
            # The next fork becomes init of a new PID namespace: nothing outside it is
            # visible (so signalable) from the step, and its whole tree dies with it.
            lim.unshare(lim.CLONE_NEWPID)
        pid = os.fork()
        if pid != 0 and pidns:
            # Back to our own namespace for later children (a second unshare would fail).
            lim.setns(self._own_pidns_fd(), lim.CLONE_NEWPID)
        if pid == 0:
            try:
                # Detach (not close) so no finaliser can later close a reused descriptor.
                os.close(ours.detach())
                fd = lock_down(
                    theirs.detach(),
                    uid,
                    limits,
                    locked=locked,
                    own_pidns=pidns,
                    view=self.view,
                    probed_view=self._view_ok,
                )
            except BaseException as exc:
                with contextlib.suppress(BaseException):
                    os.write(2, f"conveyor sandbox: lock-down failed: {exc!r}\n".encode())
                os._exit(LOCKDOWN_FAILED)
            serve(fd, limits, locked=locked, own_pidns=pidns)
        theirs.close()
        self.children[pid] = [msg["id"], False, uid, made]
        if made is not None:
            # Before the worker has the child's socket, so before any user code runs.
            try:
                ChildCgroups.attach(made, pid)
            except OSError as exc:
                self._complain(f"cannot move child {pid} into its cgroup: {exc}")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        try:
            send_frame(
                self.ctl, {"op": "spawned", "id": msg["id"], "pid": pid, "fds": 1}, [ours.fileno()]
            )
        finally:
            ours.close()

    def _own_pidns_fd(self) -> int:
        if self._pidns_fd < 0:
            self._pidns_fd = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        return self._pidns_fd

    def _record(self, pid: int, status: int, usage: Any) -> None:
        info = self.children.pop(pid, None)
        if info is None:
            return  # a stray already re-parented to us
        private = fallback_tmp(self.pid, pid)
        if os.path.isdir(private):
            shutil.rmtree(private, ignore_errors=True)
        made: dict[str, str] | None = info[3]
        oom = False
        if made is not None and self.cgroups is not None:
            oom = self.cgroups.oom_killed(made)
            # Whatever the child left in its cgroup dies now; its uid is given back only
            # once the cgroup is empty and removed (see reap).
            self._pending_cgroups.append((made, info[2]))
        elif info[2] is not None:
            self._dirty_uids.append(info[2])
        self._exited.append(
            {
                "op": "exit",
                "id": info[0],
                "pid": pid,
                "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
                "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                "cpu_s": usage.ru_utime + usage.ru_stime,
                "killed": info[1],
                "oom": oom,
            }
        )

    def _collect(self) -> None:
        while True:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._record(pid, status, usage)

    def reap(self) -> None:  # noqa: PLR0912 - three kill mechanisms, one reap
        """Collect exited children; report them only once nothing of their trees is left."""
        self._collect()
        if self._pending_cgroups and self.cgroups is not None:
            for _ in range(3):
                still: list[tuple[dict[str, str], int | None]] = []
                for made, uid in self._pending_cgroups:
                    self.cgroups.kill(made)
                    self._collect()  # killed processes re-parent to us: reap the zombies
                    if ChildCgroups.remove(made):
                        if uid is not None:
                            self._dirty_uids.append(uid)
                    else:
                        still.append((made, uid))
                self._pending_cgroups = still
                if not still:
                    break
        if not self._exited and not self._dirty_uids:
            return
        live = frozenset(self.children)
        # Every process of a dead child's tree is now our child or below one; with none of
        # those there is nothing to sweep (the common case: a recycled child exiting).
        quarantined: set[int] = set()
        if any(p not in live for p in lim.children_of(self.pid)):
            if self._pid_namespace:
                for uid in self._dirty_uids:
                    if not self._sweep_uid(uid):
                        quarantined.add(uid)
                        self._complain(f"uid {uid} still has processes; kept out of the pool")
            lim.kill_children(self.pid, keep=frozenset(self.children))
        self._free_uids.extend(u for u in self._dirty_uids if u not in quarantined)
        self._dirty_uids.clear()
        exited, self._exited = self._exited, []
        try:
            for event in exited:
                event["free"] = len(self._free_uids)
                send_frame(self.ctl, event)
        except OSError:
            self.shutdown()  # the worker is gone

    def _sweep_uid(self, uid: int) -> bool:
        """Kill every process of ``uid`` in our PID namespace, atomically per pass; whether
        the uid is empty afterwards."""
        helper = os.fork()
        if helper == 0:
            try:
                os.setresgid(uid, uid, uid)
                os.setresuid(uid, uid, uid)
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    # kill(-1) reports success whenever any other process exists, so
                    # whether the uid is empty is read from /proc afterwards.
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(-1, signal.SIGKILL)
                    if not lim.uid_processes(uid, uid + 1, exclude=os.getpid()):
                        os._exit(0)
                    time.sleep(0.001)
            except BaseException:
                pass
            os._exit(1)
        # Reap while the helper works: killed processes re-parent here, and their zombies
        # would count as "still there" for the helper until we collect them.
        while True:
            try:
                pid, status, usage = os.wait4(-1, 0)
            except ChildProcessError:
                return False
            if pid == helper:
                return os.waitstatus_to_exitcode(status) == 0
            self._record(pid, status, usage)

    def shutdown(self) -> NoReturn:
        """Kill every child and stray, reap them all (removing their scratch dirs), exit."""
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        while True:
            for pid in lim.children_of(self.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            try:
                pid, status, usage = os.wait4(-1, 0)
            except ChildProcessError:
                break
            self._record(pid, status, usage)
        if self.cgroups is not None:
            for made, _uid in self._pending_cgroups:
                self.cgroups.retire(made, 1.0)
        os._exit(0)


def below_the_worker() -> bool:
    """Move this process (and so every process it forks) to ``SCHED_BATCH``; whether it
    took.

    A worker's request wakes its step process; on a machine with as many busy processes as
    cores a normally scheduled child, woken by the worker's write, preempted the worker in
    that very write (``FrameChannel.send_bytes`` held 15-19 % of the worker's py-spy samples
    in the 4-step sync benchmark on 2 cores; under ``SCHED_BATCH`` 7-10 %). A batch task keeps
    its CPU share (same weight as ``SCHED_OTHER``, same nice value) but never preempts on
    wakeup: it runs when the worker yields or on another core. Lowering one's own policy needs
    no privilege, bubblewrap's namespaces included; a host that refuses it (a seccomp
    profile) simply keeps the default."""
    batch = getattr(os, "SCHED_BATCH", None)
    if batch is None:
        return False
    try:
        os.sched_setscheduler(0, batch, os.sched_param(0))
    except OSError:
        return False
    return True


def main() -> NoReturn:
    """Entry point: ``argv[1]`` is the JSON config, ``config["fd"]`` the control socket."""
    config = orjson.loads(sys.argv[1])
    below_the_worker()
    ctl = socket.socket(fileno=int(config["fd"]))
    ctl.setblocking(True)
    os.set_inheritable(ctl.fileno(), False)
    server = ForkServer(ctl, config)
    try:
        server.run()
    except BaseException:
        # Whatever broke the loop (most often: the worker went away mid-send), children
        # and their scratch directories must not outlive us.
        server.shutdown()
