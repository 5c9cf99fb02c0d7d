"""Isolation detection, the /readyz report, the start-up policy and the settings mapping."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import tempfile

import psutil
import pytest
import structlog
import structlog.testing

from conveyor.sandbox import Limits, Sandbox, SandboxConfig, SandboxStatus, SandboxUnavailable
from conveyor.sandbox.isolation import Isolation, assess, bwrap_launcher
from conveyor.sandbox.limits import uid_processes
from conveyor.settings import ExecutionMode, Settings
from tests.polling import eventually
from tests.sandbox.support import config, make_sandbox, needs_bwrap, run, runs_sleep, step_in_flight

HOST_HAS_NETWORK = any(name != "lo" for _, name in socket.if_nameindex())
FULL_PROBE = {
    "network_isolated": True,
    "pid_namespace": True,
    "uid_drop": True,
    "private_tmp": True,
}


def test_assess_levels() -> None:
    """bwrap with every probe passing is full; missing pieces make it partial; off is none."""
    assert assess("bwrap", FULL_PROBE, locked=True).isolation is Isolation.FULL
    partial = assess("bwrap", {**FULL_PROBE, "uid_drop": False}, locked=True)
    assert partial.isolation is Isolation.PARTIAL
    direct = assess("direct", {"network_isolated": False}, locked=True)
    assert direct.isolation is Isolation.PARTIAL and not direct.network_isolated
    assert assess("bwrap", FULL_PROBE, locked=False).as_dict()["isolation"] == "none"


def test_bwrap_argv_hides_root_and_cuts_network() -> None:
    """The bubblewrap command line unshares the network and never binds /root itself."""
    argv = bwrap_launcher("/usr/bin/bwrap").argv
    assert "--unshare-net" in argv and "--unshare-pid" in argv and "--die-with-parent" in argv
    binds = [argv[i + 1] for i, a in enumerate(argv) if a in ("--ro-bind", "--bind")]
    assert "/root" not in binds and "/" not in binds
    assert "--bind" not in argv  # nothing of the host is writable


def test_not_root_uses_a_user_namespace_and_per_child_pid_namespaces(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Not root: bwrap in a user namespace, per-child PID namespaces in place of per-child uids."""
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    argv = bwrap_launcher("/usr/bin/bwrap").argv
    assert "--unshare-user" in argv
    caps = [argv[i + 1] for i, a in enumerate(argv) if a == "--cap-add"]
    assert caps == ["CAP_SYS_ADMIN", "CAP_NET_ADMIN"]
    probe = {**FULL_PROBE, "uid_drop": False}
    assert assess("bwrap", probe, locked=True).isolation is Isolation.PARTIAL
    report = assess("bwrap", probe, locked=True, child_pidns=True)
    assert report.isolation is Isolation.FULL
    assert "per-child pid namespace" in report.mechanism


@pytest.mark.skipif(not HOST_HAS_NETWORK, reason="the host itself has no interface but lo")
async def test_refuses_without_network_isolation_when_required() -> None:
    """Isolation required but impossible: start() fails naming the missing piece and fix."""
    # No network namespace for the children either: the step would share the host's.
    sb = Sandbox(
        config(
            launcher="direct",
            require_network_isolation=True,
            limits=Limits(network_namespace=False),
        )
    )
    with pytest.raises(SandboxUnavailable) as info:
        await sb.start()
    assert "bubblewrap" in str(info.value) and "AP_EXECUTION_MODE" in str(info.value)
    await sb.close()


@pytest.mark.skipif(not HOST_HAS_NETWORK, reason="the host itself has no interface but lo")
async def test_embedded_mode_starts_partial_with_warning() -> None:
    """Without network isolation (opted in) it starts, warns loudly (structured), says partial."""
    with structlog.testing.capture_logs() as logs:
        async with make_sandbox(launcher="direct", slots=1) as sb:
            assert sb.isolation["isolation"] == "partial"
            result = await run(sb, "def run(input):\n    return input + 1\n", 41)
    assert result.status is SandboxStatus.SUCCEEDED and result.output == 42
    warning = next(e for e in logs if e["event"] == "sandbox.partial_isolation")
    assert warning["log_level"] == "warning" and "PARTIAL" in warning["message"]
    assert warning["launcher"] == "direct" and "safe" in warning


async def test_unsandboxed_mode_reports_none() -> None:
    """UNSANDBOXED: isolation none, and the step's scratch dir is never the host's /tmp."""
    settings = Settings.from_env({"AP_EXECUTION_MODE": "UNSANDBOXED"})
    cfg = SandboxConfig.from_settings(settings, slots=1)
    assert not cfg.locked and cfg.launcher == "direct"
    fd, canary = tempfile.mkstemp(prefix="conveyor-canary-", dir="/tmp")
    os.close(fd)
    try:
        async with make_sandbox(**{f: getattr(cfg, f) for f in ("locked", "launcher")}) as sb:
            assert sb.isolation["isolation"] == "none"
            code = "import os\ndef run(input):\n    open('f', 'w').write('x')\n"
            code += "    return os.getcwd()\n"
            result = await run(sb, code)
            assert result.status is SandboxStatus.SUCCEEDED
            assert result.output != "/tmp" and result.output.startswith("/tmp/conveyor-step-")
        # The per-execution cleanup empties the step's own directory, never the host's /tmp.
        assert os.path.exists(canary)  # noqa: ASYNC240 - a stat, in a test
        assert not os.path.exists(result.output)  # noqa: ASYNC240
    finally:
        os.unlink(canary)


def test_from_settings_maps_variables() -> None:
    """AP_* variables map onto the sandbox config (limits, timeout, slots, policy)."""
    settings = Settings.from_env(
        {
            "AP_SANDBOX_MEMORY_LIMIT": "524288",
            "AP_FLOW_TIMEOUT_SECONDS": "42",
            "AP_WORKER_CONCURRENCY": "3",
            "AP_PIECES_CACHE_MAX_ENTRIES": "7",
            "AP_PREWARM_CACHE_ON_STARTUP": "false",
        }
    )
    cfg = SandboxConfig.from_settings(settings)
    assert cfg.locked and cfg.launcher == "auto"
    assert cfg.limits.memory_kb == 524288 and cfg.limits.cpu_s == 42
    assert cfg.limits.code_cache == 7 and cfg.prewarm == ()
    assert cfg.max_timeout_s == 42 and cfg.slots == 3
    assert not cfg.require_network_isolation  # embedded servers: laptop mode
    external = Settings.from_env(
        {
            "AP_REDIS_URL": "redis://127.0.0.1:6379/0",
            "AP_POSTGRES_URL": "postgresql://u:p@127.0.0.1:5432/db",
            "AP_ENCRYPTION_KEY": "ab" * 16,
            "AP_EXECUTION_MODE": ExecutionMode.SANDBOX_CODE_ONLY.value,
        }
    )
    assert SandboxConfig.from_settings(external).require_network_isolation
    process = Settings.from_env({"AP_EXECUTION_MODE": "SANDBOX_PROCESS"})
    assert SandboxConfig.from_settings(process).per_run
    assert not cfg.per_run


@needs_bwrap
async def test_bubblewrap_satisfies_the_production_policy() -> None:
    """With bubblewrap, a sandbox that requires network isolation starts with it."""
    async with make_sandbox(require_network_isolation=True, slots=1) as sb:
        assert sb.launcher is not None and sb.launcher.name == "bwrap"
        assert sb.probe["network_isolated"] is True


@pytest.mark.skipif(shutil.which("unshare") is None, reason="util-linux unshare missing")
async def test_unshare_fallback_isolates_network() -> None:
    """Without bubblewrap, ``unshare`` still gives the fork-server no network (partial)."""
    code = "import socket\ndef run(input):\n    return [n for _, n in socket.if_nameindex()]\n"
    try:
        async with make_sandbox(launcher="unshare", slots=1) as sb:
            assert sb.isolation["isolation"] == "partial"
            assert sb.probe["network_isolated"] is True
            result = await run(sb, code)
    except SandboxUnavailable as exc:  # e.g. no user namespaces for a non-root user
        pytest.skip(f"unshare not permitted here: {exc}")
    assert result.status is SandboxStatus.SUCCEEDED and result.output == ["lo"]


async def test_direct_mode_fork_server_death_leaves_nothing() -> None:
    """Without a PID namespace, a killed fork-server's detached grandchildren are swept by uid."""
    code = (
        "import subprocess, time\n"
        "def run(input):\n"
        "    subprocess.Popen(['sleep', '300'], start_new_session=True)\n"
        "    time.sleep(60)\n"
    )
    async with make_sandbox(launcher="direct", slots=1) as sb:
        if not sb.probe.get("uid_drop"):
            pytest.skip("needs root (per-child uids)")
        task = asyncio.create_task(run(sb, code, timeout_s=30))
        # Killed once the detached grandchild exists: the uid sweep must find it.
        await eventually(
            lambda: runs_sleep(uid_processes(sb.uid_base, sb.uid_base + sb.uid_count)),
            timeout_s=10,
        )
        assert sb.server_pid is not None
        os.kill(sb.server_pid, signal.SIGKILL)
        result = await asyncio.wait_for(task, 15)
        assert result.status is SandboxStatus.INTERNAL_ERROR
        assert uid_processes(sb.uid_base, sb.uid_base + sb.uid_count) == []


async def test_step_process_dies_with_fork_server() -> None:
    """A step process (uid already dropped) is killed by the kernel when the fork-server dies."""
    code = "import time\ndef run(input):\n    time.sleep(60)\n"
    async with make_sandbox(launcher="direct", slots=1, spares=0) as sb:
        task = asyncio.create_task(run(sb, code, timeout_s=30))
        assert sb.server_pid is not None
        server = psutil.Process(sb.server_pid)
        await eventually(lambda: step_in_flight(sb), timeout_s=10, what="step running")
        children = server.children()
        assert children
        sb._drop_uid = False  # disable the uid sweep: prove PR_SET_PDEATHSIG on its own
        os.kill(sb.server_pid, signal.SIGKILL)
        await asyncio.wait_for(task, 15)
        _gone, alive = psutil.wait_procs(children, timeout=5)
        assert alive == []
