"""Issue 10, finding 2: without bubblewrap the sandbox is still closed, or refuses code steps.

The fallbacks (forced here with ``launcher="unshare"`` / ``"direct"``, or by a ``PATH``
without ``bwrap``) must not let a step reach the host: no network (Redis, PostgreSQL,
Conveyor's own port on loopback, the host's unix sockets), no host processes in ``/proc``,
no write that outlives the step, no view of the config directory. Where a fallback cannot
promise that (no namespaces at all), the embedded default refuses code steps, and
production roles refuse anything but bubblewrap unless ``AP_SANDBOX_ALLOW_PARTIAL_ISOLATION``
accepts the risk.
"""

from __future__ import annotations

import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog.testing

from conveyor.sandbox import Limits, Sandbox, SandboxConfig, SandboxStatus, SandboxUnavailable
from conveyor.settings import Settings
from tests.sandbox.support import make_sandbox, run

needs_unshare = pytest.mark.skipif(
    shutil.which("unshare") is None and not os.environ.get("CONVEYOR_CI"),
    reason="util-linux unshare is not installed",
)
PG_SOCKETS = [
    p for p in ("/var/run/postgresql/.s.PGSQL.5432", "/tmp/.s.PGSQL.5432") if os.path.exists(p)
]


@pytest.fixture
def host_listener() -> Iterator[int]:
    """A TCP listener on the host's loopback (a stand-in for Conveyor's own port)."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    yield srv.getsockname()[1]
    srv.close()


@pytest.fixture
def unix_listener(tmp_path: Path) -> Iterator[str]:
    """A unix socket the host listens on outside /run and /tmp, world-connectable."""
    base = Path("/var/lib") / f"conveyor-test-{uuid.uuid4().hex[:8]}"
    base.mkdir(mode=0o755)
    path = str(base / "service.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    os.chmod(path, 0o777)
    srv.listen(4)
    yield path
    srv.close()
    shutil.rmtree(base, ignore_errors=True)


_ATTACK = """
import os, socket
def run(input):
    out = {"tcp": {}, "unix": {}, "writes": {}, "procs": [], "hidden": None}
    for port in input["ports"]:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
            out["tcp"][str(port)] = "connected"
        except OSError as exc:
            out["tcp"][str(port)] = type(exc).__name__
    for path in input["sockets"]:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(2)
        try:
            s.connect(path)
            out["unix"][path] = "connected"
        except OSError as exc:
            out["unix"][path] = type(exc).__name__
        finally:
            s.close()
    for d in input["dirs"]:
        try:
            with open(os.path.join(d, input["canary"]), "w") as fh:
                fh.write("left behind")
            out["writes"][d] = "written"
        except OSError as exc:
            out["writes"][d] = type(exc).__name__
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                raw = open(f"/proc/{pid}/cmdline", "rb").read()
                out["procs"].append(raw.decode(errors="replace"))
            except OSError:
                pass
    try:
        out["hidden"] = sorted(os.listdir(input["config_dir"]))
    except OSError as exc:
        out["hidden"] = type(exc).__name__
    out["interfaces"] = [n for _, n in socket.if_nameindex()]
    return out
"""
WRITABLE = ["/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/run", "/var/lib", "/etc", "/root"]


@pytest.mark.parametrize("launcher", ["unshare", "direct"])
async def test_fallbacks_keep_the_step_off_the_host(
    launcher: str, host_listener: int, unix_listener: str, tmp_path: Path
) -> None:
    """Loopback services, host sockets, host processes, lasting writes, the config dir: none."""
    if launcher == "unshare" and shutil.which("unshare") is None:
        if os.environ.get("CONVEYOR_CI"):
            pytest.fail("util-linux unshare is missing on the CI machine")
        pytest.skip("util-linux unshare is not installed")
    config_dir = tmp_path / "conveyor-home"
    config_dir.mkdir(mode=0o755)
    (config_dir / "encryption.key").write_text("k" * 64)
    canary = f"conveyor-canary-{uuid.uuid4().hex}"
    sockets = [unix_listener, *PG_SOCKETS]
    async with make_sandbox(launcher=launcher, slots=1, hide=(str(config_dir),)) as sb:
        health = sb.health()
        if launcher == "direct" and not sb.report.safe:
            pytest.skip("direct fallback without namespaces (not root): refused by policy")
        assert health["isolation"] == "partial" and sb.report.safe, health
        result = await run(
            sb,
            _ATTACK,
            {
                "ports": [6379, 5432, host_listener],
                "sockets": sockets,
                "dirs": WRITABLE,
                "canary": canary,
                "config_dir": str(config_dir),
            },
        )
    assert result.status is SandboxStatus.SUCCEEDED, result.error
    out = result.output
    assert "connected" not in out["tcp"].values(), out["tcp"]
    assert "connected" not in out["unix"].values(), out["unix"]
    assert out["interfaces"] == ["lo"]
    assert out["hidden"] == [] or out["hidden"] in ("PermissionError", "FileNotFoundError")
    # Only the sandbox's own processes (the fork-server, the step): none of the host's.
    argv0 = [c.split("\0")[0] for c in out["procs"]]
    host = [a for a in argv0 if any(n in a for n in ("pytest", "redis", "postgres", "sshd"))]
    assert host == [] and len(argv0) <= 3, out["procs"]
    # Private tmpfs where the host lets anyone write; read-only everywhere else.
    for d in WRITABLE:
        assert not os.path.exists(os.path.join(d, canary)), d  # noqa: ASYNC240 - a stat
    assert out["writes"]["/var/tmp"] == "written" and out["writes"]["/tmp"] == "written"
    assert out["writes"]["/etc"] != "written" and out["writes"]["/var/lib"] != "written"


async def test_unsafe_fallback_refuses_code_steps_in_the_embedded_default() -> None:
    """Embedded default, no safe fallback: the worker starts, code steps fail clearly."""
    # A host where the direct launcher cannot give children a network namespace (forced).
    unsafe = Limits(network_namespace=False)
    sb = Sandbox(SandboxConfig(launcher="direct", refuse_unsafe=True, slots=1, limits=unsafe))
    with structlog.testing.capture_logs() as logs:
        await sb.start()
    assert [e["log_level"] for e in logs if e["event"] == "sandbox.refused"] == ["error"]
    try:
        health = sb.health()
        assert health["code_steps"] == "refused" and health["isolation"] == "none", health
        assert health["ok"] is True  # the rest of the process serves on
        result = await run(sb, "def run(input):\n    return 1\n")
        assert result.status is SandboxStatus.FAILED
        assert "AP_SANDBOX_ALLOW_PARTIAL_ISOLATION" in (result.error or "")
        assert sb.server_pid is None  # no fork-server was left running
    finally:
        await sb.close()


@needs_unshare
async def test_production_roles_refuse_partial_isolation() -> None:
    """External servers, no bubblewrap: start-up fails naming the opt-in; with it, it starts."""
    strict = Sandbox(SandboxConfig(launcher="unshare", require_full_isolation=True, slots=1))
    with pytest.raises(SandboxUnavailable) as info:
        await strict.start()
    await strict.close()
    assert "AP_SANDBOX_ALLOW_PARTIAL_ISOLATION" in str(info.value)
    async with make_sandbox(launcher="unshare", slots=1) as sb:
        assert sb.health()["isolation"] == "partial"
        assert (await run(sb, "def run(input):\n    return 2\n")).output == 2


def test_settings_choose_the_policy() -> None:
    """Production without opt-in needs full isolation; embedded needs a safe one; opt-in: any."""
    external = {
        "AP_REDIS_URL": "redis://127.0.0.1:6379/0",
        "AP_POSTGRES_URL": "postgresql://u:p@127.0.0.1:5432/db",
        "AP_ENCRYPTION_KEY": "ab" * 16,
    }
    prod = SandboxConfig.from_settings(Settings.from_env(external))
    assert prod.require_full_isolation and not prod.refuse_unsafe
    opted = SandboxConfig.from_settings(
        Settings.from_env({**external, "AP_SANDBOX_ALLOW_PARTIAL_ISOLATION": "true"})
    )
    assert not opted.require_full_isolation and not opted.require_network_isolation
    embedded = SandboxConfig.from_settings(Settings.from_env({}))
    assert embedded.refuse_unsafe and not embedded.require_full_isolation
    assert embedded.hide and embedded.hide[0].endswith(("conveyor", ".conveyor"))
    with pytest.raises(Exception, match="AP_SANDBOX_ALLOW_PARTIAL_ISOLATION"):
        Settings.from_env({"AP_SANDBOX_ALLOW_PARTIAL_ISOLATION": "maybe"})


@needs_unshare
async def test_embedded_default_without_bubblewrap_runs_code_steps(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A PATH without bwrap (a fresh laptop): the embedded default picks the safe fallback."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("unshare",):
        found = shutil.which(tool)
        assert found is not None
        (bin_dir / tool).symlink_to(found)
    monkeypatch.setenv("PATH", str(bin_dir))
    cfg = SandboxConfig.from_settings(Settings.from_env({}), slots=1)
    async with make_sandbox(
        **{f: getattr(cfg, f) for f in ("launcher", "refuse_unsafe", "hide", "bwrap_path")}
    ) as sb:
        assert sb.launcher is not None and sb.launcher.name == "unshare"
        assert sb.health()["code_steps"] == "enabled"
        result = await run(sb, "def run(input):\n    return input * 2\n", 21)
    assert result.output == 42
