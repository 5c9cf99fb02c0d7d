"""The step process: locks itself down after the fork, then runs ``run(input)`` per request.

A child is forked by the fork-server (so the interpreter and the pre-imported modules are
already in memory: nothing has to be read from disk after the uid drop), takes its own
session, mount namespace, ``/tmp``, rlimits and uid, and then serves ``run`` requests from
the worker over its own socket until it is told to recycle. It answers exactly once per
request and only from its own pid: a copy made by ``os.fork()`` inside the user's code
exits instead of answering. Before answering it kills every process the step started (it
is their subreaper, so even ``setsid`` + double fork ends up as its child) and empties its
``/tmp``, so the next execution — always of the same flow version — starts clean.
"""

from __future__ import annotations

import asyncio
import builtins
import inspect
import io
import linecache
import os
import resource
import select
import shutil
import signal
import socket
import sys
import traceback
from collections import OrderedDict
from types import CodeType
from typing import Any, NoReturn

import orjson

from conveyor.sandbox import limits as lim
from conveyor.sandbox import seccomp
from conveyor.sandbox.protocol import BlockingReader, ProtocolError

#: The environment a step sees: nothing inherited, so no ``AP_*`` and no secrets.
CLEAN_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/tmp",
    "TMPDIR": "/tmp",
}
_OUTPUT_OPTS = orjson.OPT_NON_STR_KEYS
#: Results that cannot be awaitables (``inspect.isawaitable`` is an ABC check).
_PLAIN = frozenset({dict, list, str, int, float, bool, type(None)})


class CappedLog(io.TextIOBase):
    """stdout/stderr of one execution: keeps the first ``limit`` characters, counts the rest."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self._limit = limit
        self._parts: list[str] = []
        self._room = limit
        self.dropped = 0

    def write(self, s: str) -> int:
        n = len(s)
        if self._room >= n:
            self._parts.append(s)
            self._room -= n
        else:
            if self._room > 0:
                self._parts.append(s[: self._room])
            self.dropped += n - max(self._room, 0)
            self._room = 0
        return n

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def text(self) -> str:
        out = "".join(self._parts)
        if self.dropped:
            out += f"\n[conveyor: {self.dropped} more characters of output dropped]\n"
        return out


def lock_down(  # noqa: PLR0912 - lock-down steps in kernel order
    sock_fd: int,
    uid: int | None,
    limits: lim.Limits,
    *,
    locked: bool,
    own_pidns: bool = False,
    view: dict[str, Any] | None = None,
    probed_view: bool = False,
) -> int:
    """Turn a fresh fork of the fork-server into a step process; returns the socket's fd.

    Order matters: namespaces and mounts need the capabilities we still have as root, the
    rlimits must be in place before the uid drop (``RLIMIT_NPROC`` is checked against the
    new uid from then on), and the uid drop comes last because it takes the capabilities.
    ``view`` (launchers without bubblewrap) says how the host's filesystem is hidden, see
    :func:`~conveyor.sandbox.limits.private_tmp`.
    """
    os.setsid()
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)
    signal.set_wakeup_fd(-1)
    parent = os.getppid()
    # Every descriptor but the socket goes: the fork-server's control socket in particular
    # would let a step spawn or kill other children.
    devnull = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    if sock_fd != 3:
        os.dup2(sock_fd, 3)
    os.closerange(4, 1 << 16)
    os.environ.clear()
    os.environ.update(CLEAN_ENV)
    private_mount = False
    if locked:
        try:
            owner = uid if uid is not None else os.getuid()
            lim.private_tmp(owner, limits, network=limits.network_namespace, view=view)
            private_mount = True
        except OSError:
            if view is not None and probed_view:
                # The fork-server's probe hid the host this way: a child that cannot must
                # not run with less than /readyz reports.
                raise
    if not private_mount:
        # No mount namespace (not root, no bubblewrap, or UNSANDBOXED): a directory of our
        # own instead — never the shared /tmp itself, which the cleanup empties.
        private = fallback_tmp(os.getppid(), os.getpid())
        os.mkdir(private, 0o700)
        if uid is not None:
            os.chown(private, uid, uid)
        os.environ["TMPDIR"] = os.environ["HOME"] = private
    lim.set_child_subreaper()
    if locked:
        lim.apply_rlimits(limits)
        if uid is not None:
            lim.drop_privileges(uid)
        else:
            lim.drop_capabilities()
    # If the fork-server dies, so does the step process (what it started follows through
    # the PID namespace, or the worker's sweep by uid). Set after the uid drop, which
    # clears it; the parent check closes the race with a parent that died meanwhile.
    lim.prctl(lim.PR_SET_PDEATHSIG, signal.SIGKILL)
    # (As init of a PID namespace of its own the parent is outside it: getppid() says 0.)
    if not own_pidns and os.getppid() != parent:
        os._exit(1)
    if locked:
        # Last: from here on no namespaces, mounts, ptrace, bpf, keyrings or CLONE_PARENT.
        seccomp.install()
    os.chdir(os.environ["TMPDIR"])
    return 3


def fallback_tmp(server_pid: int, child_pid: int) -> str:
    """The private directory of a child without a mount namespace; the fork-server removes
    it once the child has exited."""
    return f"/tmp/conveyor-step-{server_pid}-{child_pid}"


class Runner:
    """Executes requests in this process; one instance per child."""

    def __init__(self, limits: lim.Limits, *, locked: bool, own_pidns: bool = False) -> None:
        self.limits = limits
        self.locked = locked
        self.own_pidns = own_pidns
        self.pid = os.getpid()
        self.tmp = os.environ["TMPDIR"]
        #: Compiled code and its source lines (for tracebacks), by source.
        self._codes: OrderedDict[str, tuple[CodeType, list[str]]] = OrderedDict()
        self._log_bytes = limits.log_bytes
        self._loop: Any = None
        # Freed on MemoryError so there is room left to build and send the answer.
        self._reserve: bytearray | None = bytearray(1 << 20)
        # The kernel counts our threads in the link count of /proc/<pid>/task: one fstat
        # after every execution, against its value now (a fresh fork has a single thread).
        try:
            self._task_fd = os.open("/proc/self/task", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            self._one_thread: tuple[int, int, int] | None = _identity(os.fstat(self._task_fd))
        except OSError:
            self._task_fd, self._one_thread = -1, None
        self._empty_tmp_size = _empty_tmpfs_size(self.tmp)

    def warm_up(self) -> None:
        """Run a no-op step once before the first request arrives.

        After the fork every first write to a page shared with the fork-server is a
        copy-on-write fault; a fresh child takes a few hundred of them on its first
        execution. Taking them while the child waits for work moves them off the latency
        of the step that gets the child.
        """
        code = "def run(input):\n    return input\n"
        self.execute({"step": "warm-up", "code": code, "input": {"warm": [1, "up"]}})
        self._codes.clear()
        linecache.cache.pop("<step warm-up>", None)

    def _compile(self, code: str, filename: str) -> CodeType:
        cached = self._codes.get(code)
        if cached is None:
            cached = compile(code, filename, "exec", dont_inherit=True), code.splitlines(True)
            self._codes[code] = cached
            if len(self._codes) > max(self.limits.code_cache, 1):
                self._codes.popitem(last=False)
        else:
            self._codes.move_to_end(code)
        # The traceback shows the user's source lines, which exist only in memory.
        linecache.cache[filename] = (len(code), None, cached[1], filename)
        return cached[0]

    def _await(self, awaitable: Any) -> Any:
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        return self._loop.run_until_complete(awaitable)

    def execute(self, req: dict[str, Any]) -> tuple[bytes, bool]:
        """Run one request; return the encoded answer frame and whether to recycle."""
        step = str(req.get("step") or "step")
        filename = f"<step {step}>"
        # A fresh log per execution: a step may close its stdout or patch its methods, and
        # the next execution in this warm child (another run) must not inherit that.
        log = CappedLog(self._log_bytes)
        status = "SUCCEEDED"
        error: str | None = None
        recycle = False
        out = b"null"
        sys.stdout = sys.stderr = log
        try:
            ns: dict[str, Any] = {"__name__": "__step__", "__builtins__": builtins}
            exec(self._compile(req["code"], filename), ns)
            fn = ns.get("run")
            if not callable(fn):
                raise NameError("the code does not define run(input)")
            result = fn(req.get("input"))
            if type(result) not in _PLAIN and inspect.isawaitable(result):
                result = self._await(result)
            out = orjson.dumps(result, option=_OUTPUT_OPTS)
            if len(out) > self.limits.output_bytes:
                size, out = len(out), b"null"
                raise ValueError(
                    f"run() returned {size} bytes of JSON, over the "
                    f"{self.limits.output_bytes}-byte limit"
                )
        except MemoryError:
            self._reserve = None
            status, recycle = "MEMORY_LIMIT_EXCEEDED", True
            error = f"MemoryError: the step needed more than its {self.limits.memory_kb} KiB"
        except BaseException as exc:
            if os.getpid() != self.pid:
                os._exit(1)
            status, error, recycle = "FAILED", _user_traceback(exc, filename), True
        finally:
            # A copy of this process made by the step's own os.fork() must never answer.
            if os.getpid() != self.pid:
                os._exit(0)
            sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
        recycle = self._cleanup() or recycle
        rest = orjson.dumps(
            {
                "status": status,
                "error": error,
                "logs": log.text(),
                "recycle": recycle,
                "nonce": req.get("nonce"),
            }
        )
        body = b'{"output":' + out + b"," + rest[1:]
        return len(body).to_bytes(4, "big") + body, recycle

    def _cleanup(self) -> bool:  # noqa: PLR0912 - one check per kind of leftover
        """Leave nothing of this execution behind; True when this child must not be reused."""
        dirty = False
        if self._threaded():
            # Threads of the step would outlive it and could answer for the next one.
            dirty = True
        if self.own_pidns:
            lim.reap_own_namespace()
        elif _has_children():
            lim.kill_children(self.pid)
        if self._loop is not None and asyncio.all_tasks(self._loop):
            dirty = True
        try:
            if self._empty_tmp_size is not None and (
                os.stat(self.tmp).st_size == self._empty_tmp_size
            ):
                leftovers = []  # a tmpfs directory's size counts its entries: none
            else:
                leftovers = os.listdir(self.tmp)
        except OSError:
            leftovers = []
            dirty = True
        for name in leftovers:
            path = os.path.join(self.tmp, name)
            try:
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    os.unlink(path)
            except OSError:
                dirty = True
        try:
            if os.getcwd() != self.tmp:
                os.chdir(self.tmp)
        except OSError:
            dirty = True  # its scratch directory is gone: this child cannot be reused
        if self._reserve is None:
            dirty = True
        if self.locked:
            ru = resource.getrusage(resource.RUSAGE_SELF)
            if ru.ru_utime + ru.ru_stime > self.limits.cpu_s / 2:
                dirty = True
        return dirty

    def _threaded(self) -> bool:
        """Whether this process has (or may have) a thread besides this one."""
        if self._one_thread is None:
            return len(os.listdir("/proc/self/task")) != 1
        try:
            return _identity(os.fstat(self._task_fd)) != self._one_thread
        except OSError:
            return True  # the step closed our descriptor: assume the worst


def _identity(st: os.stat_result) -> tuple[int, int, int]:
    """Which directory (device, inode) and, for /proc/<pid>/task, how many threads
    (``st_nlink`` is 2 + the number of threads)."""
    return st.st_dev, st.st_ino, st.st_nlink


def _has_children() -> bool:
    """Whether this process has any child (running or a zombie), in one ``waitpid``.

    A descendant always hangs below a child of ours: orphans re-parent to us (we are their
    subreaper), so no child means nothing of the step is left to kill. A zombie reaped
    here is one fewer for :func:`~conveyor.sandbox.limits.kill_children` to wait for.
    """
    try:
        os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        return False
    return True


def _empty_tmpfs_size(path: str) -> int | None:
    """``st_size`` of the empty directory ``path`` when it is the root of a tmpfs (whose
    directory sizes grow with every entry, so an equal size later means empty again);
    ``None`` elsewhere, where only a listing tells."""
    try:
        with open("/proc/self/mountinfo", "rb") as fh:
            mounts = fh.read().splitlines()
        # The last mount on ``path`` is the one on top, the one we see.
        on_path = [line for line in mounts if line.split()[4:5] == [path.encode()]]
        if not on_path or b" - tmpfs " not in on_path[-1] or os.listdir(path):
            return None
        return os.stat(path).st_size
    except (OSError, ValueError):
        return None


#: Longest error message a step can report (the rest is cut, and the cut is said).
MAX_ERROR_CHARS = 64 * 1024


def _user_traceback(exc: BaseException, filename: str) -> str:
    """The exception with only the frames of the user's own code (none of ours)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == filename]
    lines = traceback.format_exception_only(type(exc), exc)
    if frames:
        lines = ["Traceback (most recent call last):\n", *traceback.format_list(frames), *lines]
    text = "".join(lines).rstrip("\n")
    # Errors are stored with the step and the run: a step must not grow them without bound.
    if len(text) > MAX_ERROR_CHARS:
        text = text[:MAX_ERROR_CHARS] + f"… ({len(text) - MAX_ERROR_CHARS} more characters)"
    return text


def serve(fd: int, limits: lim.Limits, *, locked: bool, own_pidns: bool = False) -> NoReturn:
    """The child's main loop: one answer per request until EOF or a recycle."""
    sock = socket.socket(fileno=fd)
    sock.setblocking(True)
    reader = BlockingReader(sock)
    runner = Runner(limits, locked=locked, own_pidns=own_pidns)
    # Warm up only while idle: when a request is already waiting (fresh children wanted
    # back to back), the warm-up would just delay it.
    if not select.select([sock], [], [], 0)[0]:
        runner.warm_up()
    try:
        while True:
            req = reader.read()
            if req is None:
                break
            frame, recycle = runner.execute(req)
            sock.sendall(frame)
            if recycle:
                break
    except (OSError, ProtocolError):
        pass
    os._exit(0)
