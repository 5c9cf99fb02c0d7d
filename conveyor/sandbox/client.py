"""The worker's side of the sandbox: :class:`Sandbox` — ``run_code`` for the engine.

One :class:`Sandbox` per worker process owns one fork-server (started once, inside the
strongest isolation :mod:`conveyor.sandbox.isolation` finds) and ``slots`` step processes,
one per concurrent execution. A slot's process is warm for one flow version at a time: the
next execution of the same ``(flow_id, flow_version)`` reuses it, any other flow version
replaces it, and it is recycled after ``warm_max_uses`` executions or after any error,
limit or timeout. An idle slot is handed out most recently used first (its child is the
likeliest to still be in the CPU caches), and callers waiting for one are served in arrival
order. ``active`` can cap the executions out at once below ``slots`` (more then queue, and
one running past ``spill_s`` stops counting, so a long step never holds the queue up): on
an otherwise idle host a burst then reuses a few warm children instead of waking a cold one
per slot. The worker talks
to a child over the child's own socket (one round trip per execution) and enforces wall
time itself: past ``timeout_s`` it has the fork-server SIGKILL the child, and the
fork-server answers only once every process of that child's tree is gone. A child the
worker is done with is *retired*: the fork-server SIGKILLs it (its cooperation is never
needed), kills what is left in its cgroup, reaps, and only then gives its uid back.
:meth:`Sandbox.health` is the ``/readyz`` check (capacity, fork-server, mode, limits); how
outcomes map to statuses is :mod:`conveyor.sandbox.outcome`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import time
from collections import Counter, deque
from collections.abc import Callable
from types import TracebackType
from typing import Any

import orjson
import structlog

from conveyor.sandbox import cgroups
from conveyor.sandbox.channel import FrameChannel
from conveyor.sandbox.config import SandboxConfig
from conveyor.sandbox.isolation import (
    FIX,
    Isolation,
    IsolationReport,
    Launcher,
    SandboxUnavailable,
    assess,
    cgroup_binds,
    host_view,
    launchers,
    missing_isolation_error,
)
from conveyor.sandbox.limits import kill_uid_range
from conveyor.sandbox.outcome import SandboxResult, SandboxStatus, explain_exit
from conveyor.sandbox.protocol import encode

log = logging.getLogger("conveyor.sandbox")

_BOOT = (
    "import sys; sys.path.insert(0, {root!r}); from conveyor.sandbox.forkserver import main; main()"
)
#: How long a child whose socket closed gets to be reported dead before it is killed.
_DIED_GRACE_S = 0.25
#: The fork-server's whole environment: nothing of the worker's reaches it.
_SERVER_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
#: A fork-server that died on its own is started again after this long.
_RESTART_DELAY_S = 1.0
_instances = iter(range(1, 1 << 62))


class _Child:
    """One step process as the worker sees it."""

    __slots__ = ("channel", "dead", "exit", "id", "key", "pid", "uses", "waiter")

    def __init__(self, cid: int, pid: int, key: tuple[str, str]) -> None:
        self.id = cid
        self.pid = pid  # in the fork-server's PID namespace
        self.key = key
        self.uses = 0
        self.dead = False
        self.channel: FrameChannel | None = None
        self.waiter: asyncio.Future[Any] | None = None
        self.exit: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

    def on_frame(self, frame: Any) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(frame)
        else:
            # An answer nobody asked for (forged by the step): never trust this child again.
            self.dead = True

    def on_close(self, exc: BaseException | None) -> None:
        self.dead = True
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionResetError(str(exc) if exc else "child closed"))


@dataclasses.dataclass(slots=True)
class _Slot:
    index: int
    busy: bool = False
    child: _Child | None = None
    #: Loop time the current execution took the slot.
    since: float = 0.0


class _Timeout(Exception):
    pass


class Sandbox:
    """Runs ``code`` steps in isolated, limited, warm child processes of one fork-server.

    Use ``async with Sandbox(config)`` or :meth:`start` / :meth:`close`. ``run_code`` never
    raises for anything the step does; it raises only if the sandbox cannot be started
    (:class:`~conveyor.sandbox.isolation.SandboxUnavailable`) or is closed.
    """

    def __init__(self, config: SandboxConfig | None = None) -> None:
        self.config = config or SandboxConfig()
        self.report = IsolationReport(Isolation.NONE, "not started")
        self.launcher: Launcher | None = None
        self.probe: dict[str, Any] = {}
        self._proc: asyncio.subprocess.Process | None = None
        self._ctl: FrameChannel | None = None
        self._stderr_task: asyncio.Task[None] | None = None
        self._stderr_tail: deque[str] = deque(maxlen=20)
        self._hello: asyncio.Future[dict[str, Any]] | None = None
        self._spawning: dict[int, tuple[asyncio.Future[_Child], tuple[str, str]]] = {}
        self._children: dict[int, _Child] = {}
        # Slots live as long as the Sandbox (a restart only drops their children), so a
        # step still holding one across a restart gives back a slot that is still counted.
        self._slots = [_Slot(i) for i in range(max(self.config.slots, 1))]
        #: Idle slots, most recently used last; ``_busy`` counts the others.
        self._idle: list[_Slot] = list(reversed(self._slots))
        self._busy = 0
        self._active = min(
            len(self._slots),
            self.config.active or len(self._slots),
        )
        self._waiters: deque[tuple[asyncio.Future[_Slot], tuple[str, str]]] = deque()
        self._spill_timer: asyncio.TimerHandle | None = None
        self._random = b""
        self._random_pos = 0
        self._next_id = 0
        #: Counters for metrics: executions per status, ``forks``, ``starts``.
        self.stats: Counter[str] = Counter()
        self._start_lock = asyncio.Lock()
        self._closed = False
        self._drop_uid = False
        self._pidns = False
        self._name = f"conveyor-sandbox-{os.getpid()}-{next(_instances)}"
        self._cgroups: cgroups.CgroupPlan | None = None
        #: Set when policy refuses code steps on this host (the message they fail with).
        self.refused: str | None = None
        self._free_uids: int | None = None
        self._exhausted = False
        self._restart: asyncio.Task[None] | None = None
        self._report: dict[str, Any] = {}
        self._refresh_report()
        self._limits_wire = self.config.limits.to_wire()
        # Room for every slot's child and the spares, plus children still being swept.
        self.uid_count = max(
            self.config.uid_count, 4 * (max(self.config.slots, 1) + self.config.spares)
        )
        self._spares: deque[asyncio.Future[_Child]] = deque()
        self.uid_base = (
            self.config.uid_base
            if self.config.uid_base is not None
            else 60_000 + (os.getpid() % 2048) * self.uid_count
        )
        self._max_frame = (
            self.config.limits.output_bytes + 6 * self.config.limits.log_bytes + 65_536
        )

    # ------------------------------------------------------------------ lifecycle
    @property
    def contained(self) -> bool:
        """Whether a code step run now can have no effect outside the sandbox but its output:
        children are locked down (not ``UNSANDBOXED``), the isolation in force is safe — no
        network, no writes outside the sandbox, the host's services and processes out of reach
        — and code steps are not refused. (A warm child's Python state may carry over to later
        executions of the same flow version, as documented; that stays inside the sandbox.)
        The worker then holds code steps' checkpoints like those of the other steps without
        effects (:mod:`conveyor.engine.worker`)."""
        return self.config.locked and self.report.safe and not self.refused

    @property
    def isolation(self) -> dict[str, Any]:
        """The ``/readyz`` sandbox check, one dict kept current in place (see :meth:`health`)."""
        return self._report

    def health(self) -> dict[str, Any]:
        """``{"ok", "isolation", "mechanism", "limits", "code_steps", …}``, fresh.

        ``ok`` is False while the fork-server is down or no uid is left for a new child
        (capacity exhausted); ``limits`` is ``cgroup-v2`` | ``cgroup-v1`` | ``rlimit``;
        ``code_steps`` is ``refused`` when policy forbids them on this host.
        """
        self._refresh_report()
        return dict(self._report)

    def _refresh_report(self) -> None:
        report: dict[str, Any] = self.report.as_dict()
        report["limits"] = (
            str(self.probe.get("cgroup")) if self.probe.get("cgroup") else cgroups.RLIMIT
        )
        report["code_steps"] = "refused" if self.refused else "enabled"
        if self._free_uids is not None:
            report["free_uids"] = self._free_uids
        report["timeouts"] = self.stats["TIMEOUT"]
        report["capacity_exhausted"] = self.stats["capacity_exhausted"]
        error = None
        if self.refused:
            error = None  # refused by policy: the rest of the process is fine
        elif self._closed:
            error = "sandbox closed"
        elif not self.running:
            error = "sandbox fork-server is not running"
        elif self._exhausted:
            error = "sandbox capacity exhausted: no free uid for a new step process"
        report["ok"] = error is None
        if error:
            report["error"] = error
        if self.refused:
            report["refused"] = self.refused
        self._report.clear()
        self._report.update(report)

    @property
    def running(self) -> bool:
        return self._ctl is not None and not self._ctl.closed

    @property
    def server_pid(self) -> int | None:
        """Host pid of the launched fork-server process (bubblewrap's, when used)."""
        return self._proc.pid if self._proc else None

    async def __aenter__(self) -> Sandbox:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Start the fork-server in the strongest isolation available; idempotent."""
        async with self._start_lock:
            if self._closed:
                raise RuntimeError("sandbox is closed")
            if self.running:
                return
            await self._start()

    async def _start(self) -> None:
        tried: list[str] = []
        self.refused = None
        if self.config.locked and self.config.cgroups and self._cgroups is None:
            self._cgroups = await asyncio.to_thread(cgroups.prepare, self._name)
        dirs = self._cgroups.dirs if self._cgroups else None
        candidates = launchers(self.config.launcher, self.config.bwrap_path, dirs)
        if self.config.launcher in ("auto", "bwrap") and not any(
            c.name == "bwrap" for c in candidates
        ):
            tried.append("bwrap: bubblewrap is not installed")
        for launcher in candidates:
            try:
                probe = await self._launch(launcher)
            except (OSError, TimeoutError, ConnectionError) as exc:
                # Stopped first so the launcher's own complaint (bwrap's stderr) is read.
                await self._stop_server()
                tail = " / ".join(self._stderr_tail) or str(exc) or type(exc).__name__
                tried.append(f"{launcher.name}: {tail}")
                continue
            report = assess(
                launcher.name,
                probe,
                locked=self.config.locked,
                child_pidns=self._will_use_pidns(probe),
                child_netns=bool(probe.get("child_network_namespace"))
                and self.config.limits.network_namespace,
            )
            refusal = self._policy_refuses(report)
            if refusal:
                tried.append(f"{launcher.name}: {refusal}")
                await self._stop_server()
                continue
            self.launcher, self.probe, self.report = launcher, probe, report
            self.stats["starts"] += 1
            self._drop_uid = bool(probe.get("uid_drop"))
            self._pidns = self._will_use_pidns(probe)
            # A kernel (or container) that refuses children a network namespace of their
            # own: spawn them without one rather than lose their private mounts too.
            self._limits_wire["network_namespace"] = bool(
                self.config.limits.network_namespace and probe.get("child_network_namespace")
            )
            self._free_uids = int(probe["uids"]) if self._drop_uid and "uids" in probe else None
            self._exhausted = False
            self._prepare_spares()
            self._refresh_report()
            if self.config.locked and report.isolation is not Isolation.FULL:
                _loud(
                    "warning",
                    "sandbox.partial_isolation",
                    message=(
                        "SANDBOX ISOLATION IS PARTIAL: code steps run without bubblewrap. "
                        "Install bubblewrap for full isolation."
                    ),
                    isolation=str(report.isolation),
                    safe=report.safe,
                    launcher=launcher.name,
                    mechanism=report.mechanism,
                    limits=self._report["limits"],
                    tried="; ".join(tried) or None,
                )
            else:
                log.info("sandbox started: %s (%s)", report.isolation, report.mechanism)
            return
        if self.config.require_full_isolation:
            raise missing_isolation_error(tried, "isolate them fully")
        if self.config.require_network_isolation:
            raise missing_isolation_error(tried)
        if self.config.refuse_unsafe:
            self.refused = (
                "code steps are disabled: this host cannot sandbox them safely ("
                + "; ".join(tried)
                + "). "
                + FIX
            )
            self.report = IsolationReport(Isolation.NONE, "refused: " + "; ".join(tried))
            self._refresh_report()
            _loud(
                "error",
                "sandbox.refused",
                message="SANDBOX REFUSES CODE STEPS: " + self.refused,
                tried="; ".join(tried),
            )
            return
        raise SandboxUnavailable("cannot start the sandbox fork-server: " + "; ".join(tried))

    def _policy_refuses(self, report: IsolationReport) -> str | None:
        """Why the configured policy will not run code steps under ``report`` (or None)."""
        if not self.config.locked:
            return None
        if self.config.require_network_isolation and not report.network_isolated:
            return "network not isolated"
        if self.config.require_full_isolation and report.isolation is not Isolation.FULL:
            return f"isolation is {report.isolation} ({report.mechanism})"
        if self.config.refuse_unsafe and not report.safe:
            return f"isolation is {report.isolation} and not safe ({report.mechanism})"
        return None

    def _will_use_pidns(self, probe: dict[str, Any]) -> bool:
        if not self.config.locked or not probe.get("child_pid_namespace"):
            return False
        if self.config.child_pid_namespace is not None:
            return self.config.child_pid_namespace
        # Without a per-child uid, or (direct launcher) without a PID namespace around the
        # fork-server, whose /proc would list the host's processes.
        return not probe.get("uid_drop") or not probe.get("pid_namespace")

    async def _launch(self, launcher: Launcher) -> dict[str, Any]:
        self._stderr_tail.clear()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            config: dict[str, Any] = {
                "fd": theirs.fileno(),
                "prewarm": list(self.config.prewarm),
                "probe_uid": self.uid_base + self.uid_count - 1,
                "uid_base": self.uid_base,
                "uid_count": self.uid_count - 1,
            }
            if self._cgroups is not None:
                dirs = self._cgroups.dirs
                if launcher.name == "bwrap":
                    dirs = cgroup_binds(dirs)[1]
                config["cgroup"] = {"version": self._cgroups.version, "dirs": dirs}
            if launcher.name != "bwrap" and self.config.locked:
                config["view"] = host_view(self.config.hide)
            argv = [
                *launcher.argv,
                self.config.python,
                "-I",
                "-c",
                _BOOT.format(root=launcher.package_root),
                orjson.dumps(config).decode(),
            ]
            self._proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                pass_fds=(theirs.fileno(),),
                env=_SERVER_ENV,
                start_new_session=True,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        assert self._proc.stderr is not None
        self._stderr_task = asyncio.create_task(self._pump_stderr(self._proc.stderr))
        loop = asyncio.get_running_loop()
        self._hello = loop.create_future()
        self._ctl = FrameChannel(
            ours, self._on_ctl, self._on_ctl_close, max_frame=1 << 20, accept_fds=True
        )
        hello = await asyncio.wait_for(self._hello, self.config.start_timeout_s)
        for failure in hello.get("prewarm_failed") or ():
            log.warning("sandbox prewarm import failed: %s", failure)
        probe: dict[str, Any] = hello.get("probe") or {}
        return probe

    async def _pump_stderr(self, stream: asyncio.StreamReader) -> None:
        while True:
            line = await stream.readline()
            if not line:
                return
            text = line.decode(errors="replace").rstrip()
            self._stderr_tail.append(text)
            log.warning("sandbox fork-server: %s", text)

    async def close(self) -> None:
        """Stop every child and the fork-server; bounded by ``kill_timeout_s``."""
        self._closed = True
        if self._restart is not None and not self._restart.done():
            self._restart.cancel()
        await asyncio.shield(self._stop_server())
        self._refresh_report()

    async def _stop_server(self) -> None:
        ctl, self._ctl = self._ctl, None
        if ctl is not None and not ctl.closed:
            with contextlib.suppress(ConnectionError):
                ctl.send({"op": "shutdown"})
            ctl.close()
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                await asyncio.wait_for(proc.wait(), self.config.kill_timeout_s)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
            self._sweep_orphans()
        plan, self._cgroups = self._cgroups, None
        if plan is not None:
            await asyncio.to_thread(plan.remove)
        task, self._stderr_task = self._stderr_task, None
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, 1.0)
        self._fail_all("sandbox fork-server stopped")

    # ------------------------------------------------------------------ control channel
    def _on_ctl(self, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        if op == "exit":
            # The child's socket is left alone: an answer it sent before exiting may still be
            # unread there, and EOF follows because every process holding it is gone.
            if "free" in msg and self._free_uids is not None:
                self._free_uids = int(msg["free"])
                if self._free_uids > 0:
                    self._exhausted = False
            reason = str(msg.get("reason") or "")
            if reason.startswith("capacity"):
                self._exhausted = True
                self.stats["capacity_exhausted"] += 1
                log.error("sandbox capacity exhausted: %s", reason)
            self._refresh_report()
            pending = self._spawning.pop(msg["id"], None)
            if pending is not None and not pending[0].done():
                pending[0].set_exception(
                    ConnectionError(f"fork-server could not spawn a child ({reason or 'lost'})")
                )
            child = self._children.pop(msg["id"], None)
            if child is not None:
                child.dead = True
                if not child.exit.done():
                    child.exit.set_result(msg)
        elif op == "spawned":
            fd = self._ctl.fds.popleft() if self._ctl and self._ctl.fds else -1
            pending = self._spawning.pop(msg["id"], None)
            if fd < 0:
                if pending is not None and not pending[0].done():
                    pending[0].set_exception(ConnectionError("fork-server sent no socket"))
                return
            sock = socket.socket(fileno=fd)
            # Registered here, not when the spawner resumes: the child's exit event may be
            # in the same read as this message.
            child = _Child(msg["id"], int(msg["pid"]), pending[1] if pending else ("", ""))
            self._children[child.id] = child
            child.channel = FrameChannel(
                sock, child.on_frame, child.on_close, max_frame=self._max_frame
            )
            if pending is None or pending[0].done():
                child.dead = True
                child.channel.close()
                return
            pending[0].set_result(child)
        elif op == "hello" and self._hello is not None and not self._hello.done():
            self._hello.set_result(msg)

    def _on_ctl_close(self, exc: BaseException | None) -> None:
        if self._hello is not None and not self._hello.done():
            self._hello.set_exception(ConnectionError("fork-server exited before hello"))
        self._fail_all("sandbox fork-server exited")
        self._sweep_orphans()
        self._refresh_report()
        # Died on its own (not stopped by us): start it again, so readiness comes back
        # without waiting for the next code step.
        if (
            self._ctl is not None
            and not self._closed
            and self.launcher is not None
            and (self._restart is None or self._restart.done())
        ):
            self._restart = asyncio.ensure_future(self._restart_later())

    async def _restart_later(self) -> None:
        await asyncio.sleep(_RESTART_DELAY_S)
        try:
            await self._ensure_running()
        except Exception as exc:
            log.error("sandbox fork-server restart failed: %r", exc)
        self._refresh_report()

    def _sweep_orphans(self) -> None:
        """After the fork-server is gone: kill what its children left, when no PID
        namespace did so already (direct launcher). Such processes hang off init now, in
        sessions of their own; only their uid (from our window) says whose they are."""
        if not self._drop_uid or self.probe.get("pid_namespace"):
            return
        left = kill_uid_range(self.uid_base, self.uid_base + self.uid_count)
        if left:
            log.error("sandbox: %d step processes survived the fork-server", left)

    def _fail_all(self, why: str) -> None:
        for fut, _key in self._spawning.values():
            if not fut.done():
                fut.set_exception(ConnectionError(why))
        self._spawning.clear()
        for child in self._children.values():
            child.dead = True
            if not child.exit.done():
                child.exit.set_result({"op": "exit", "id": child.id, "lost": True})
            if child.channel is not None:
                child.channel.close()
        self._children.clear()
        for slot in self._slots:
            slot.child = None
        while self._spares:
            self._spares.popleft().cancel()

    # ------------------------------------------------------------------ slots
    async def _acquire(self, key: tuple[str, str]) -> _Slot:
        """A slot for ``key``: at once while fewer than ``active`` executions are out, else
        in arrival order as slots come back (or as running ones turn long, see
        :meth:`_admissible`)."""
        if not self._waiters and self._idle and self._admissible():
            return self._take(key)
        waiter: asyncio.Future[_Slot] = asyncio.get_running_loop().create_future()
        self._waiters.append((waiter, key))
        self._arm_spill()
        try:
            return await waiter
        except (Exception, asyncio.CancelledError):
            # Handed a slot and cancelled at once: give it back, or it stays busy for good.
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._release(waiter.result())
            raise

    def _admissible(self) -> bool:
        """Whether one more execution may go to a child now.

        Up to ``active`` at once (a few per core): a burst of short steps then queues for
        the same few warm children, whose memory is still in the CPU caches, instead of
        waking one child per slot — each of which would run cold and cost several times the
        CPU. An execution that has been running for ``spill_s`` no longer counts (a long or
        sleeping step must not hold the others up), so up to ``slots`` can run at once.
        """
        busy = self._busy
        if busy < self._active:
            return True
        if busy >= len(self._slots):
            return False
        horizon = asyncio.get_running_loop().time() - self.config.spill_s
        short = sum(1 for s in self._slots if s.busy and s.since > horizon)
        return short < self._active

    def _take(self, key: tuple[str, str]) -> _Slot:
        """Mark an idle slot busy: the most recently used one warm for ``key``, else one with
        no child, else the least recently used (its child is replaced)."""
        idle = self._idle
        pick = -1
        for i in range(len(idle) - 1, -1, -1):
            child = idle[i].child
            if child is not None and child.key == key:
                pick = i
                break
        if pick < 0:
            pick = next((i for i, s in enumerate(idle) if s.child is None), 0)
        slot = idle.pop(pick)
        slot.busy = True
        slot.since = asyncio.get_running_loop().time()
        self._busy += 1
        return slot

    def _release(self, slot: _Slot) -> None:
        if not slot.busy:
            return
        slot.busy = False
        self._busy -= 1
        self._idle.append(slot)
        self._dispatch()

    def _dispatch(self) -> None:
        """Hand idle slots to queued callers, first come first served, while admissible."""
        waiters = self._waiters
        while waiters and self._idle:
            waiter, key = waiters[0]
            if waiter.done():
                waiters.popleft()
                continue
            if not self._admissible():
                self._arm_spill()
                return
            waiters.popleft()
            waiter.set_result(self._take(key))

    def _arm_spill(self) -> None:
        """Re-check the queue when the oldest running execution turns long."""
        if self._spill_timer is not None or not self._waiters or self._busy >= len(self._slots):
            return
        started = [s.since for s in self._slots if s.busy]
        if not started:
            return
        loop = asyncio.get_running_loop()
        delay = max(min(started) + self.config.spill_s - loop.time(), 0.0) + 1e-4
        self._spill_timer = loop.call_later(delay, self._on_spill)

    def _on_spill(self) -> None:
        self._spill_timer = None
        self._dispatch()
        self._arm_spill()

    def _retire(self, slot: _Slot) -> None:
        """Let go of the slot's warm child: the fork-server SIGKILLs it and its tree.

        Closing the socket alone would ask the child to exit, and a step can make its own
        process refuse (replace ``os._exit``, ignore signals, loop in ``finally``).
        """
        child, slot.child = slot.child, None
        if child is None:
            return
        if child.channel is not None:
            child.channel.close()
        if not child.exit.done() and self._ctl is not None and not self._ctl.closed:
            with contextlib.suppress(ConnectionError):
                self._ctl.send({"op": "retire", "id": child.id})
            self.stats["retired"] += 1

    async def _fork(self) -> _Child:
        """Have the fork-server fork a locked-down child."""
        if self._ctl is None or self._ctl.closed:
            raise ConnectionError("sandbox fork-server is not running")
        self._next_id += 1
        cid = self._next_id
        fut: asyncio.Future[_Child] = asyncio.get_running_loop().create_future()
        self._spawning[cid] = (fut, ("", ""))
        self._ctl.send(
            {
                "op": "spawn",
                "id": cid,
                "drop_uid": self._drop_uid and self.config.locked,
                "pidns": self._pidns,
                "limits": self._limits_wire,
                "locked": self.config.locked,
            }
        )
        try:
            self.stats["forks"] += 1
            return await asyncio.wait_for(fut, self.config.start_timeout_s)
        finally:
            self._spawning.pop(cid, None)

    def _prepare_spares(self) -> None:
        while len(self._spares) < self.config.spares and self.running:
            spare = asyncio.ensure_future(self._fork())
            # Consumed later or never (fork-server gone): either way, no "never retrieved".
            spare.add_done_callback(lambda f: None if f.cancelled() else f.exception())
            self._spares.append(spare)

    async def _fresh(self, slot: _Slot, key: tuple[str, str]) -> _Child:
        """A never-used child for ``slot``: a ready spare when there is one, else a fork."""
        child: _Child | None = None
        while child is None and self._spares:
            spare = self._spares.popleft()
            try:
                child = await asyncio.shield(spare)
            except asyncio.CancelledError:
                if not spare.cancelled():
                    self._spares.appendleft(spare)
                raise
            except (OSError, TimeoutError, ConnectionError):
                child = None
            if child is not None and child.dead:
                child = None
        if child is None:
            child = await self._fork()
        child.key = key
        slot.child = child
        return child

    async def settle(self) -> None:
        """Wait until every spare being forked is registered (tests and benchmarks)."""
        for spare in list(self._spares):
            with contextlib.suppress(Exception):
                await asyncio.shield(spare)

    def child_pids(self) -> set[int]:
        """Pids (in the fork-server's PID namespace) of every step process not yet reaped."""
        # A child leaves this map only when the fork-server reports it reaped.
        return {c.pid for c in self._children.values()}

    # ------------------------------------------------------------------ execution
    async def run_code(
        self,
        *,
        flow_id: str,
        flow_version: int | str,
        step: str,
        code: str,
        input: Any,
        timeout_s: float | None = None,
        run_id: str | None = None,
        on_started: Callable[[], object] | None = None,
    ) -> SandboxResult:
        """Run ``code``'s ``run(input)`` for one step and say how it ended (never raises for
        anything the step does). ``timeout_s`` is capped by ``max_timeout_s``; ``run_id``
        keeps a run's code steps in a child of their own when ``per_run`` is set;
        ``on_started()`` is called once the request is on its way to the child (after any
        wait for a slot or a fresh child)."""
        started = time.perf_counter()
        if self.refused:
            self.stats["refused"] += 1
            return SandboxResult(SandboxStatus.FAILED, None, self.refused, "", 0.0)
        if not self.running:
            await self._ensure_running()
            if self.refused:
                return SandboxResult(SandboxStatus.FAILED, None, self.refused, "", 0.0)
        limit = self.config.max_timeout_s
        timeout = min(float(timeout_s), limit) if timeout_s and timeout_s > 0 else limit
        key = (str(flow_id), str(flow_version))
        if self.config.per_run and run_id is not None:
            key = (key[0], f"{key[1]}/{run_id}")
        slot = await self._acquire(key)
        try:
            request = {
                "op": "run",
                "step": step,
                "code": code,
                "input": input,
                "timeout_s": timeout,
                # Echoed in the answer: a frame forged by the step's own code on the channel
                # cannot pass for the answer (see _valid_answer).
                "nonce": self._nonce(),
            }
            status, output, error, logs = await self._run_in_slot(
                slot, key, request, on_started or _nothing
            )
        finally:
            # The next spare is forked after the step, not while it runs: on two cores the
            # fork and the new child's warm-up would otherwise slow the step down.
            self._prepare_spares()
            self._release(slot)
        self.stats[status] += 1
        if status == "TIMEOUT":
            self._refresh_report()
        return SandboxResult(
            _STATUS_OF[status], output, error, logs, (time.perf_counter() - started) * 1e3
        )

    def _nonce(self) -> str:
        """128 unpredictable bits, hex; drawn from ``os.urandom`` a block at a time."""
        pos = self._random_pos
        if pos >= len(self._random):
            self._random, pos = os.urandom(16 * 256), 0
        self._random_pos = pos + 16
        return self._random[pos : pos + 16].hex()

    async def _ensure_running(self) -> None:
        if self._closed:
            raise RuntimeError("sandbox is closed")
        async with self._start_lock:
            if not self.running:
                await self._stop_server()
                await self._start()

    async def _run_in_slot(
        self,
        slot: _Slot,
        key: tuple[str, str],
        request: dict[str, Any],
        on_started: Callable[[], object],
    ) -> tuple[str, Any, str | None, str]:
        limit_s: float = request["timeout_s"]
        try:
            frame_out = encode(request)
        except TypeError as exc:
            return "FAILED", None, f"step input is not JSON-serialisable: {exc}", ""
        child = slot.child
        if child is not None and (child.dead or child.key != key or not self.config.warm):
            self._retire(slot)
            child = None
        try:
            if child is None:
                try:
                    child = await self._fresh(slot, key)
                except ConnectionError as exc:
                    # No uid left: idle warm children of other slots hold them. Retire
                    # those, wait until their uids are back, and try once more.
                    if "capacity" not in str(exc) or not await self._evict_idle():
                        raise
                    child = await self._fresh(slot, key)
        except (OSError, TimeoutError, ConnectionError) as exc:
            self._retire(slot)
            return "INTERNAL_ERROR", None, f"sandbox could not start a step process: {exc}", ""
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        child.waiter = waiter
        timer = loop.call_later(limit_s, _expire, waiter)
        try:
            assert child.channel is not None
            child.channel.send_bytes(frame_out)
            on_started()
            frame = await waiter
        except _Timeout:
            return await self._kill(slot, child, limit_s)
        except ConnectionError:
            return await self._died(slot, child, limit_s)
        except (Exception, asyncio.CancelledError):
            # Cancelled by the engine (run cancelled, worker stopping): the step must not
            # go on running unobserved.
            await asyncio.shield(self._kill(slot, child, limit_s))
            raise
        finally:
            timer.cancel()
        if not _valid_answer(frame, request["nonce"]):
            # The step wrote on its channel: this child can no longer be trusted for anything.
            await self._kill(slot, child, limit_s)
            return "FAILED", None, "step process broke its channel to the worker", ""
        child.uses += 1
        if (
            frame.get("recycle")
            or not self.config.warm
            or child.uses >= self.config.warm_max_uses
            or child.dead
        ):
            self._retire(slot)
        return (
            frame.get("status", "INTERNAL_ERROR"),
            frame.get("output"),
            frame.get("error"),
            frame.get("logs") or "",
        )

    async def _kill(
        self, slot: _Slot, child: _Child, limit_s: float
    ) -> tuple[str, Any, str | None, str]:
        """Wall time is up: SIGKILL the child, wait until its whole tree is gone."""
        child.dead = True
        slot.child = None
        if self._ctl is not None and not self._ctl.closed:
            with contextlib.suppress(ConnectionError):
                self._ctl.send({"op": "kill", "id": child.id})
        await self._await_exit(child)
        if child.channel is not None:
            child.channel.close()
        return "TIMEOUT", None, f"step exceeded its time limit of {limit_s:g} s", ""

    async def _died(
        self, slot: _Slot, child: _Child, limit_s: float
    ) -> tuple[str, Any, str | None, str]:
        """The child's socket closed or carried garbage before an answer: find out why.

        A child that died on its own is reported by the fork-server within moments; one
        that is still alive broke the protocol (closed or scribbled on its socket) and is
        killed — without waiting for the wall time — then reported as FAILED.
        """
        slot.child = None
        try:
            event = await asyncio.wait_for(asyncio.shield(child.exit), _DIED_GRACE_S)
        except TimeoutError:
            if self._ctl is not None and not self._ctl.closed:
                with contextlib.suppress(ConnectionError):
                    self._ctl.send({"op": "kill", "id": child.id})
            event = await self._await_exit(child)
            if event.get("killed") and event.get("signal") == signal.SIGKILL:
                return "FAILED", None, "step process broke its channel to the worker", ""
        if child.channel is not None:
            child.channel.close()
        status, error = explain_exit(event, self.config.limits, limit_s)
        return status, None, error, ""

    async def _evict_idle(self) -> bool:
        """Retire every idle slot's warm child and wait for their exits; whether any was."""
        idle = [s for s in self._slots if not s.busy and s.child is not None]
        children = [s.child for s in idle if s.child is not None]
        for slot in idle:
            self._retire(slot)
        for child in children:
            await self._await_exit(child)
        return bool(children)

    async def _await_exit(self, child: _Child) -> dict[str, Any]:
        try:
            return await asyncio.wait_for(asyncio.shield(child.exit), self.config.kill_timeout_s)
        except TimeoutError:
            # The fork-server did not confirm: it is wedged. Restart it (which kills every
            # process of the sandbox) rather than trust it again.
            log.error("sandbox fork-server did not reap child %s; restarting it", child.id)
            self.stats["reap_timeouts"] += 1
            await self._stop_server()
            return {"op": "exit", "id": child.id, "lost": True}


def _loud(level: str, event: str, **fields: Any) -> None:
    """A start-up line operators must not miss, structured (JSON with ``AP_LOG_PRETTY`` off).

    The logger is looked up per call so that it follows the current structlog
    configuration (these lines are rare: start-up and restarts only).
    """
    getattr(structlog.get_logger("conveyor.sandbox"), level)(event, **fields)


_STATUSES = frozenset(s.value for s in SandboxStatus)
_STATUS_OF = {s.value: s for s in SandboxStatus}


def _valid_answer(frame: Any, nonce: str) -> bool:
    """The child's genuine answer to this request, in the shape the worker relies on."""
    return (
        isinstance(frame, dict)
        and frame.get("nonce") == nonce
        and frame.get("status") in _STATUSES
        and isinstance(frame.get("logs", ""), str)
        and (frame.get("error") is None or isinstance(frame.get("error"), str))
    )


def _nothing() -> None:
    """No-op ``on_started``."""


def _expire(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_exception(_Timeout())
