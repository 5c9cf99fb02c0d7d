"""Which isolation wraps the fork-server, how to launch it, and what to report in /readyz.

Launchers are tried strongest first: **bubblewrap** (network, PID, IPC and UTS namespaces,
a read-only private filesystem view holding only ``/usr``, the Python install and the
``conveyor`` package), then **unshare** (network and PID namespaces; every child builds a
private read-only root like bubblewrap's, holding only ``/usr``, the Python install and the
package — see :func:`host_view`), then **direct** (rlimits and uid; as root also that
private root, a network and a PID namespace per child). What is in force is not assumed
from the launcher: the fork-server probes it from inside (interfaces, pid,
whether it can mount, drop uid, and give a child its own network namespace) and
:func:`assess` turns that probe into the report. Whether code steps may run with what was
found is the policy of :class:`~conveyor.sandbox.config.SandboxConfig` (see
``docs/configuration.md``, ``AP_SANDBOX_ALLOW_PARTIAL_ISOLATION``).
"""

from __future__ import annotations

import dataclasses
import enum
import os
import shutil
import site
import sys
from pathlib import Path
from typing import Any

from conveyor.errors import ConfigError

#: Where the ``conveyor`` package appears inside bubblewrap (read-only).
PACKAGE_ROOT = "/opt/conveyor"
#: Capabilities the fork-server keeps inside bubblewrap (when started as root): mounting
#: each child's private /tmp, dropping to each child's uid, killing children of other uids.
#: Children lose them all at the uid drop.
#: CAP_NET_ADMIN brings up ``lo`` in each child's own network namespace.
_CAPS = (
    "CAP_SYS_ADMIN",
    "CAP_SETUID",
    "CAP_SETGID",
    "CAP_KILL",
    "CAP_CHOWN",
    "CAP_NET_ADMIN",
)
#: Where bubblewrap binds the sandbox's cgroup directories: under ``/tmp``, which every
#: child's private ``/tmp`` covers, so no step sees them.
CGROUP_VIEW = "/tmp/.conveyor-cgroup"


class Isolation(enum.StrEnum):
    FULL = "full"
    PARTIAL = "partial"
    NONE = "none"


class SandboxUnavailable(ConfigError):
    """The configured execution mode needs isolation this host cannot provide (a
    :class:`~conveyor.errors.ConfigError`: the operator must change the host or the mode)."""

    code = "SANDBOX_UNAVAILABLE"


@dataclasses.dataclass(frozen=True, slots=True)
class Launcher:
    """A way to start the fork-server: ``argv`` goes before ``python -I -c …``."""

    name: str
    argv: tuple[str, ...]
    package_root: str


@dataclasses.dataclass(frozen=True, slots=True)
class IsolationReport:
    """What ``/readyz`` shows under ``checks.sandbox``."""

    isolation: Isolation
    mechanism: str
    network_isolated: bool = False
    #: Partial, but without a way out: no network, nothing written outlives the step, the
    #: host's services and processes out of reach (the ``unshare`` fallback).
    safe: bool = False

    def as_dict(self) -> dict[str, str]:
        return {"isolation": str(self.isolation), "mechanism": self.mechanism}


def package_dir() -> Path:
    return Path(__file__).resolve().parent.parent


def python_paths() -> list[str]:
    """Directories the interpreter needs (prefixes, site-packages), minus ``/usr``."""
    exe_prefix = str(Path(os.path.realpath(sys.executable)).parent.parent)
    candidates = [sys.base_prefix, sys.prefix, exe_prefix, *site.getsitepackages()]
    user_site = site.getusersitepackages()
    if isinstance(user_site, str) and os.path.isdir(user_site):
        candidates.append(user_site)
    out: list[str] = []
    for path in sorted({os.path.realpath(p) for p in candidates if os.path.isdir(p)}, key=len):
        if path == "/usr" or path.startswith("/usr/"):
            continue
        if any(path == o or path.startswith(o + "/") for o in out):
            continue
        out.append(path)
    return out


def cgroup_binds(dirs: dict[str, str]) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """``(host, inside)`` bind pairs for bubblewrap and ``role -> inside path``."""
    inside: dict[str, str] = {}
    binds: list[tuple[str, str]] = []
    for role, host in dirs.items():
        known = next((dest for src, dest in binds if src == host), None)
        if known is None:
            known = f"{CGROUP_VIEW}/{len(binds)}"
            binds.append((host, known))
        inside[role] = known
    return binds, inside


def bwrap_launcher(bwrap: str, cgroup_dirs: dict[str, str] | None = None) -> Launcher:
    """bubblewrap argv: no network, own PID namespace, a read-only view of what Python needs.

    ``/root`` (0700 on the host) is never bound; when the Python install lives under it,
    its parents are recreated inside the sandbox with mode 0755 so the slot uids can read
    the standard library — the host's ``/root`` keeps its permissions.
    """
    argv: list[str] = [
        bwrap,
        "--die-with-parent",
        "--new-session",
        "--unshare-net",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--hostname",
        "conveyor-sandbox",
    ]
    if os.geteuid() == 0:
        argv += ["--cap-drop", "ALL"]
        for cap in _CAPS:
            argv += ["--cap-add", cap]
    else:
        # Not root: in a user namespace of its own the fork-server is uid 0 with just
        # CAP_SYS_ADMIN, enough for each child's private /tmp and PID namespace (a uid per
        # child is impossible: the namespace maps one uid). Children drop it (capset).
        argv += ["--unshare-user", "--uid", "0", "--gid", "0", "--cap-drop", "ALL"]
        argv += ["--cap-add", "CAP_SYS_ADMIN", "--cap-add", "CAP_NET_ADMIN"]
    argv += ["--ro-bind", "/usr", "/usr"]
    for top in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        host = f"/{top}"
        if os.path.islink(host):
            argv += ["--symlink", os.readlink(host), host]
        elif os.path.isdir(host):
            argv += ["--ro-bind", host, host]
    for etc in ("/etc/ld.so.cache", "/etc/localtime"):
        argv += ["--ro-bind-try", etc, etc]
    argv += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
    made: set[str] = {"/", "/usr", "/tmp", "/proc", "/dev"}
    binds = [(p, p) for p in python_paths()]
    binds.append((str(package_dir()), f"{PACKAGE_ROOT}/conveyor"))
    for _src, dest in binds:
        parents = list(Path(dest).parents)[::-1]
        for parent in parents:
            p = str(parent)
            if p not in made:
                argv += ["--perms", "0755", "--dir", p]
                made.add(p)
    for src, dest in binds:
        argv += ["--ro-bind", src, dest]
        made.add(dest)
    # The only writable host paths: the sandbox's own cgroup directories, for the
    # fork-server (children cannot reach them, see CGROUP_VIEW).
    for src, dest in cgroup_binds(cgroup_dirs or {})[0]:
        argv += ["--bind", src, dest]
    argv += ["--chdir", "/tmp", "--"]
    return Launcher("bwrap", tuple(argv), PACKAGE_ROOT)


def unshare_launcher(unshare: str) -> Launcher:
    argv = [unshare]
    if os.geteuid() != 0:
        argv.append("--map-root-user")
    argv += ["--net", "--pid", "--fork", "--kill-child", "--mount-proc", "--"]
    return Launcher("unshare", tuple(argv), str(package_dir().parent))


def direct_launcher() -> Launcher:
    return Launcher("direct", (), str(package_dir().parent))


def launchers(
    preference: str, bwrap_path: str | None = None, cgroup_dirs: dict[str, str] | None = None
) -> list[Launcher]:
    """Candidates in order for ``preference`` = ``auto`` | ``bwrap`` | ``unshare`` | ``direct``."""
    bwrap = bwrap_path or shutil.which("bwrap")
    unshare = shutil.which("unshare")
    out: list[Launcher] = []
    if preference in ("auto", "bwrap") and bwrap:
        out.append(bwrap_launcher(bwrap, cgroup_dirs))
    if preference in ("auto", "unshare") and unshare:
        out.append(unshare_launcher(unshare))
    if preference in ("auto", "direct"):
        out.append(direct_launcher())
    return out


def _listening_unix_sockets() -> list[str]:
    """Paths of the unix sockets listening on this host (as seen from the worker)."""
    out: set[str] = set()
    try:
        with open("/proc/net/unix") as fh:
            next(fh, None)
            for line in fh:
                parts = line.split()
                # Num RefCount Protocol Flags Type St Inode Path; flag 0x10000 = listening
                if len(parts) >= 8 and int(parts[3], 16) & 0x10000 and parts[7][:1] == "/":
                    out.add(parts[7])
    except OSError:
        pass
    return sorted(out)


def _under(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def host_view(hide: tuple[str, ...] = ()) -> dict[str, Any]:
    """The private root a child without bubblewrap builds (see ``limits.private_tmp``).

    Like bubblewrap's view, not the host's: an empty tmpfs as ``/`` holding, read-only,
    only ``binds`` (``/usr``, the real ``/bin``, ``/lib*`` directories, the Python
    install and the ``conveyor`` package, each at its own path), ``files``
    (``/etc/ld.so.cache``, ``/etc/localtime``), ``symlinks`` (``/bin -> usr/bin`` on
    merged-/usr hosts), a minimal ``/dev``, a fresh ``/proc`` and private tmpfs on ``/tmp``
    and ``/dev/shm``. Nothing else of the host exists for the step: home directories,
    ``/etc``, ``/var``, ``/run``, ``/srv``, the worker's checkout and working directory,
    the config directory, and every unix socket created there, now or later.

    ``hide``: directories to cover with an empty tmpfs should one lie under an exposed
    path (the config directory inside the Python install, say); ``sockets``: unix sockets
    listening under an exposed path when the sandbox starts, covered with ``/dev/null``.
    """
    binds: list[tuple[str, str]] = []
    symlinks: list[tuple[str, str]] = []
    roots = ["/usr"]
    for top in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        host = f"/{top}"
        if os.path.islink(host):
            symlinks.append((os.readlink(host), host))
        elif os.path.isdir(host):
            roots.append(host)
    for path in (str(package_dir()), *python_paths()):
        if not _under(path, roots):
            roots.append(path)
    # Shortest first; a path inside another is already visible through it.
    for path in sorted({os.path.realpath(r) for r in roots}, key=len):
        if not _under(path, [dest for _src, dest in binds]):
            binds.append((path, path))
    exposed = [dest for _src, dest in binds]
    files = [p for p in ("/etc/ld.so.cache", "/etc/localtime") if os.path.isfile(p)]
    hidden = [p for p in hide if p and os.path.isdir(p) and _under(os.path.realpath(p), exposed)]
    sockets = [s for s in _listening_unix_sockets() if _under(s, exposed)]
    return {
        "binds": binds,
        "symlinks": symlinks,
        "files": files,
        "hide": sorted({os.path.realpath(p) for p in hidden}),
        "sockets": sockets,
    }


def assess(  # noqa: PLR0912 - one branch per probed property
    launcher: str,
    probe: dict[str, Any],
    *,
    locked: bool,
    child_pidns: bool = False,
    child_netns: bool | None = None,
) -> IsolationReport:
    """Turn the fork-server's self-probe into the report (see module docstring)."""
    if not locked:
        return IsolationReport(
            Isolation.NONE, "unsandboxed: reused child process without limits", False
        )
    net = bool(probe.get("network_isolated"))
    if child_netns is None:
        child_netns = bool(probe.get("child_network_namespace"))
    parts: list[str] = []
    if launcher == "bwrap":
        parts.append("bubblewrap")
    elif launcher == "unshare":
        parts.append("unshare")
    if net:
        parts.append("no network")
    if probe.get("pid_namespace"):
        parts.append("pid namespace")
    if launcher == "bwrap":
        parts.append("read-only private filesystem")
    elif probe.get("host_view_hardened"):
        parts.append("read-only private filesystem per child")
    if child_netns:
        parts.append("per-child network namespace")
    if probe.get("uid_drop"):
        parts.append("per-child uid")
    if child_pidns:
        parts.append("per-child pid namespace")
        if not probe.get("uid_drop"):
            parts.append("one uid for all children (not root)")
    if probe.get("private_tmp"):
        parts.append("private /tmp")
    parts += ["rlimits", "subreaper cleanup"]
    full = (
        launcher == "bwrap"
        and net
        and bool(probe.get("pid_namespace"))
        and (bool(probe.get("uid_drop")) or child_pidns)
        and bool(probe.get("private_tmp"))
    )
    # Safe without bubblewrap: the step has no network (the fork-server's namespace or its
    # own), sees a private read-only root (not the host's), and no host process (a PID
    # namespace with its own /proc: the fork-server's, or the child's own).
    safe = full or (
        launcher != "bwrap"
        and (net or child_netns)
        and bool(probe.get("host_view_hardened"))
        and (bool(probe.get("pid_namespace")) or child_pidns)
    )
    level = Isolation.FULL if full else Isolation.PARTIAL
    return IsolationReport(level, ", ".join(parts), net or child_netns, safe)


#: How to get full isolation, or accept less: the tail of every refusal.
FIX = (
    "Fix: install bubblewrap (apt-get install bubblewrap; in containers allow user "
    "namespaces or grant CAP_SYS_ADMIN, see configs/); or accept the risk explicitly with "
    "AP_SANDBOX_ALLOW_PARTIAL_ISOLATION=true (code steps in the partial sandbox) or "
    "AP_EXECUTION_MODE=UNSANDBOXED (no sandbox at all)."
)


def missing_isolation_error(
    tried: list[str], what: str = "cut their network off"
) -> SandboxUnavailable:
    """The message for a production deploy that cannot isolate code steps."""
    why = "; ".join(tried) if tried else "no launcher available"
    return SandboxUnavailable(
        f"AP_EXECUTION_MODE runs code steps sandboxed, but this host cannot {what} ({why}). "
        f"With external Redis/PostgreSQL a step could reach them. {FIX}"
    )
