"""What a :class:`~conveyor.sandbox.client.Sandbox` is configured with, and how ``AP_*`` maps.

:class:`SandboxConfig` is the sandbox's own small frozen config, so tests and benchmarks tune
it directly; :meth:`SandboxConfig.from_settings` is the one place ``Settings`` turns into it
(``AP_EXECUTION_MODE``, ``AP_SANDBOX_MEMORY_LIMIT``, ``AP_FLOW_TIMEOUT_SECONDS``,
``AP_WORKER_CONCURRENCY``, ``AP_PIECES_CACHE_MAX_ENTRIES``, ``AP_PREWARM_CACHE_ON_STARTUP``,
and whether Redis/PostgreSQL are embedded, which decides the start-up policy).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

from conveyor.sandbox.limits import Limits
from conveyor.settings import ExecutionMode, Settings

#: Standard-library modules imported by the fork-server before its first fork, so a step
#: that uses them pays nothing for the import (and needs no file access after the uid drop).
PREWARM_MODULES: tuple[str, ...] = (
    "asyncio",
    "base64",
    "calendar",
    "collections",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "enum",
    "fractions",
    "functools",
    "hashlib",
    "hmac",
    "html",
    "itertools",
    "json",
    "math",
    "operator",
    "random",
    "re",
    "statistics",
    "string",
    "textwrap",
    "typing",
    "unicodedata",
    "urllib.parse",
    "uuid",
    "zoneinfo",
)


@dataclasses.dataclass(frozen=True, slots=True)
class SandboxConfig:
    """How the sandbox runs; :meth:`from_settings` maps ``AP_*``, tests tune fields directly.

    Parameters:
        locked: children get limits, uid drop and private ``/tmp`` (False only for
            ``AP_EXECUTION_MODE=UNSANDBOXED``).
        launcher: ``auto`` (bwrap, then unshare, then direct) or one of those names; tests
            force a fallback with it (or with a ``PATH`` that has no ``bwrap``).
        require_network_isolation: refuse to start without it.
        require_full_isolation: refuse to start with anything less than bubblewrap's full
            isolation (production roles, unless ``AP_SANDBOX_ALLOW_PARTIAL_ISOLATION``).
        refuse_unsafe: start, but refuse every code step, when even the safe partial mode
            (the ``unshare`` fallback) is impossible (the embedded default).
        cgroups: a cgroup per child where the host lets us write one (else rlimits only).
        hide: host directories children of a fallback launcher must not see (the config
            directory: embedded servers' data, sockets, keys). Their private root holds
            nothing of the host but ``/usr``, Python and the package anyway; these are
            masked in case one lies under such a path.
        slots: concurrent executions (``AP_WORKER_CONCURRENCY``).
        active: executions handed to children at once before further ones queue for a
            slot coming back (``None``: ``slots``, no cap). With a few per core, short steps
            keep reusing children still in the CPU caches: on an otherwise idle two-core
            host ~50 instead of ~170 µs of child CPU per execution with 32 callers. Where
            the host is busy with other work the children run cold anyway and the queue
            only adds latency (measured: no gain), hence off by default.
        spill_s: an execution running this long stops counting against ``active``, so long
            or sleeping steps never hold up the others beyond this (up to ``slots``).
        limits: per-child limits, see :class:`~conveyor.sandbox.limits.Limits`.
        max_timeout_s: upper bound for any ``timeout_s`` (``AP_FLOW_TIMEOUT_SECONDS``).
        warm: keep a child per slot for the same flow version; False forks per execution.
        per_run: a warm child serves one run only (all of that run's code steps, in one
            locked-down process) — ``SANDBOX_PROCESS`` / ``SANDBOX_CODE_AND_PROCESS``;
            takes effect when ``run_code`` is given ``run_id``.
        warm_max_uses: executions before a warm child is replaced.
        spares: forked, locked-down, unused children kept ready (for all slots together,
            ~3 MB each), so a step that needs a fresh child does not wait for the fork;
            two keep up with back-to-back fresh executions on two cores.
        child_pid_namespace: run every child as init of a PID namespace of its own
            (nothing outside visible to it, its whole tree dies with it). ``None`` (default):
            only where no per-child uid is possible (not root), if the kernel allows.
        uid_base / uid_count: when the fork-server is root every child runs under a uid of
            its own from ``uid_base`` … ``uid_base + uid_count - 1`` (need not exist in
            /etc/passwd), so no two step processes can signal each other and
            ``RLIMIT_NPROC`` counts one child's tree only. ``uid_base=None`` (default)
            picks a window above 60000 from the worker's pid, so the workers of one host
            (one per core with ``AP_PM2_ENABLED``) do not share uids.
        prewarm: modules the fork-server imports before forking.
        start_timeout_s / kill_timeout_s: deadlines for the fork-server's hello and for a
            killed child's tree to be confirmed gone.
    """

    locked: bool = True
    launcher: str = "auto"
    require_network_isolation: bool = False
    require_full_isolation: bool = False
    refuse_unsafe: bool = False
    cgroups: bool = True
    hide: tuple[str, ...] = ()
    slots: int = 1
    active: int | None = None
    spill_s: float = 0.01
    limits: Limits = dataclasses.field(default_factory=Limits)
    max_timeout_s: float = 600.0
    warm: bool = True
    per_run: bool = False
    warm_max_uses: int = 1000
    spares: int = 2
    child_pid_namespace: bool | None = None
    uid_base: int | None = None
    uid_count: int = 256
    prewarm: tuple[str, ...] = PREWARM_MODULES
    start_timeout_s: float = 15.0
    kill_timeout_s: float = 10.0
    python: str = sys.executable
    bwrap_path: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> SandboxConfig:
        locked = settings.execution_mode is not ExecutionMode.UNSANDBOXED
        embedded = settings.embedded_redis and settings.embedded_postgres
        # Production roles (external servers) need bubblewrap; the embedded default may use
        # the safe fallback. AP_SANDBOX_ALLOW_PARTIAL_ISOLATION accepts whatever is there.
        strict = locked and not settings.sandbox_allow_partial_isolation
        limits = Limits(
            memory_kb=settings.sandbox_memory_limit_kb,
            cpu_s=max(settings.flow_timeout_seconds, 1),
            code_cache=max(settings.pieces_cache_max_entries, 1),
        )
        per_run = settings.execution_mode in (
            ExecutionMode.SANDBOX_PROCESS,
            ExecutionMode.SANDBOX_CODE_AND_PROCESS,
        )
        values: dict[str, Any] = {
            "locked": locked,
            "per_run": per_run,
            "launcher": "auto" if locked else "direct",
            "require_network_isolation": strict and not embedded,
            "require_full_isolation": strict and not embedded,
            "refuse_unsafe": strict and embedded,
            "hide": (str(settings.config_path),),
            "slots": settings.worker_concurrency,
            "limits": limits,
            "max_timeout_s": float(settings.flow_timeout_seconds),
            "prewarm": PREWARM_MODULES if settings.prewarm_cache_on_startup else (),
        }
        values.update(overrides)
        return cls(**values)
