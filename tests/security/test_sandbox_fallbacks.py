"""Issue 10, finding 2: without bubblewrap the sandbox is still closed, or refuses code steps.

The fallbacks (forced here with ``launcher="unshare"`` / ``"direct"``, or by a ``PATH``
without ``bwrap``) must not let a step reach the host: no network (Redis, PostgreSQL,
Conveyor's own port on loopback, the host's unix sockets), no host processes in ``/proc``,
no write that outlives the step, no view of the config directory, and nothing of the host's
filesystem the worker's user could read (home directories, ``/etc``, other checkouts): the
step gets a private root like bubblewrap's with only ``/usr``, Python and the package.
Where a fallback cannot promise that (no namespaces at all), the embedded default refuses
code steps, and production roles refuse anything but bubblewrap unless
``AP_SANDBOX_ALLOW_PARTIAL_ISOLATION`` accepts the risk.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog.testing

from conveyor.sandbox import Limits, Sandbox, SandboxConfig, SandboxStatus, SandboxUnavailable
from conveyor.sandbox.isolation import host_view, package_dir, python_paths
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
    # A private root like bubblewrap's: /tmp and /dev/shm are the step's own (checked above:
    # nothing reached the host's); /var, /etc, /run, /root do not exist or are read-only.
    assert out["writes"]["/tmp"] == "written" and out["writes"]["/dev/shm"] == "written"
    private = ("/tmp", "/dev/shm")
    assert all(out["writes"][d] != "written" for d in WRITABLE if d not in private), out["writes"]


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
        result = await run(sb, _STDLIB, 21)
    assert result.status is SandboxStatus.SUCCEEDED, result.error
    out = result.output
    assert out["double"] == 42 and out["paris"] == "+0100" and out["sha"] == 64
    assert out["sqlite"] == 1 and out["tmp"].startswith("/tmp/")


# Modules the fork-server did not import before forking: read from the private root's
# copy of the Python install after the pivot; tz data from /usr/share/zoneinfo or tzdata.
_STDLIB = """
import datetime, hashlib, sqlite3, tempfile, zoneinfo, xml.dom.minidom, email.mime.text
def run(input):
    paris = datetime.datetime(2026, 1, 1, tzinfo=zoneinfo.ZoneInfo("Europe/Paris"))
    con = sqlite3.connect(":memory:")
    with tempfile.NamedTemporaryFile() as fh:
        tmp = fh.name
    return {
        "double": input * 2,
        "paris": paris.strftime("%z"),
        "sha": len(hashlib.sha256(b"x").hexdigest()),
        "sqlite": con.execute("select 1").fetchone()[0],
        "tmp": tmp,
    }
"""


def _forced(launcher: str) -> None:
    """Skip (or fail in CI) when ``launcher`` cannot be tested on this host."""
    if launcher == "unshare" and shutil.which("unshare") is None:
        if os.environ.get("CONVEYOR_CI"):
            pytest.fail("util-linux unshare is missing on the CI machine")
        pytest.skip("util-linux unshare is not installed")


@pytest.fixture
def host_secrets() -> Iterator[dict[str, str]]:
    """Files the worker's user can read (0644 in 0755 directories), outside /tmp and /run."""
    base = Path("/var/lib") / f"conveyor-test-{uuid.uuid4().hex[:8]}"
    home = base / "home"
    files = {
        "ssh": home / ".ssh" / "id_ed25519",
        "aws": home / ".aws" / "credentials",
        "env": base / "other-project" / ".env",
    }
    for path in files.values():
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        path.write_text(f"secret-{uuid.uuid4().hex}\n")
        path.chmod(0o644)
    for d in (base, home):
        d.chmod(0o755)
    yield {k: str(v) for k, v in files.items()}
    shutil.rmtree(base, ignore_errors=True)


_READ = """
import json
import os
def run(input):
    out = {}
    for name, path in input["paths"].items():
        try:
            with open(path) as fh:
                out[name] = fh.read()
        except OSError as exc:
            out[name] = type(exc).__name__
    out["/"] = sorted(os.listdir("/"))
    out["/dev"] = sorted(os.listdir("/dev"))
    return out
"""


@pytest.mark.parametrize("launcher", ["unshare", "direct"])
async def test_fallbacks_hide_what_the_worker_user_can_read(
    launcher: str, host_secrets: dict[str, str]
) -> None:
    """Keys, credentials, env files, /etc/passwd, the checkout: absent from the step's root."""
    _forced(launcher)
    checkout = package_dir().parent
    paths = {
        **host_secrets,
        "passwd": "/etc/passwd",
        "hosts": "/etc/hosts",
        "setup": str(checkout / "setup.cfg"),
        "cwd": os.path.join(os.getcwd(), "x"),
        "proc1": "/proc/1/environ",
    }
    for name in host_secrets:
        assert Path(paths[name]).read_text().startswith("secret-")  # noqa: ASYNC240
    async with make_sandbox(launcher=launcher, slots=1) as sb:
        if launcher == "direct" and not sb.report.safe:
            pytest.skip("direct fallback without namespaces (not root): refused by policy")
        result = await run(sb, _READ, {"paths": paths})
    assert result.status is SandboxStatus.SUCCEEDED, result.error
    out = result.output
    leaked = {k: v for k, v in out.items() if k in paths and v != "FileNotFoundError"}
    # /proc/1 is the step's own PID namespace's init (the fork-server or itself), never
    # the host's; its environment is the clean one if readable at all.
    assert set(leaked) <= {"proc1"}, leaked
    assert "AP_" not in leaked.get("proc1", "")
    # Only what a Python step needs (the rest of / is an empty read-only tmpfs).
    top = {"usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc", "dev", "proc", "tmp"}
    extra = set(out["/"]) - top
    needed = {p.split("/")[1] for p in (str(package_dir()), *python_paths())}
    assert extra <= needed, out["/"]
    assert set(out["/"]) >= {"usr", "dev", "proc", "tmp"}
    assert set(out["/dev"]) <= {
        "null",
        "zero",
        "full",
        "random",
        "urandom",
        "shm",
        "fd",
        "stdin",
        "stdout",
        "stderr",
    }, out["/dev"]


@pytest.mark.parametrize("launcher", ["unshare", "direct"])
async def test_socket_created_after_start_is_unreachable(launcher: str) -> None:
    """A unix socket a host service opens after the sandbox started: no step connects to it."""
    _forced(launcher)
    code = """
import socket
import subprocess
def run(path):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(2)
    try:
        s.connect(path)
        return "connected"
    except OSError as exc:
        return type(exc).__name__
    finally:
        s.close()
"""
    base = Path("/var/lib") / f"conveyor-test-{uuid.uuid4().hex[:8]}"
    async with make_sandbox(launcher=launcher, slots=1) as sb:
        if launcher == "direct" and not sb.report.safe:
            pytest.skip("direct fallback without namespaces (not root): refused by policy")
        # The fork-server and its spare children exist already; now the service starts.
        base.mkdir(mode=0o755)
        srv = socket.socket(socket.AF_UNIX)
        try:
            path = str(base / "late.sock")
            srv.bind(path)
            os.chmod(path, 0o777)
            srv.listen(4)
            probe = socket.socket(socket.AF_UNIX)
            probe.connect(path)  # the host itself reaches it
            probe.close()
            result = await run(sb, code, path)
        finally:
            srv.close()
            shutil.rmtree(base, ignore_errors=True)
    assert result.status is SandboxStatus.SUCCEEDED, result.error
    assert result.output == "FileNotFoundError"


def test_host_view_exposes_only_what_python_needs(tmp_path: Path) -> None:
    """The private root's plan: /usr, Python, the package; config dirs elsewhere need no mask."""
    outside = tmp_path / "conveyor-home"
    outside.mkdir()
    view = host_view((str(outside),))
    exposed = [dest for _src, dest in view["binds"]]
    assert "/usr" in exposed and str(package_dir()) in {*exposed, *python_paths()}
    assert all(src == dest for src, dest in view["binds"])
    assert not any(p in ("/", "/etc", "/home", "/root", "/var", "/run") for p in exposed)
    assert set(view["files"]) <= {"/etc/ld.so.cache", "/etc/localtime"}
    assert view["hide"] == []  # not under an exposed path: absent from the root anyway


@needs_unshare
async def test_config_dir_under_an_exposed_path_is_masked() -> None:
    """A config directory inside the exposed package directory is an empty directory."""
    inside = package_dir() / f".conveyor-test-{uuid.uuid4().hex[:8]}"
    inside.mkdir()
    try:
        (inside / "encryption.key").write_text("k" * 64)
        assert str(inside) in host_view((str(inside),))["hide"]
        code = "import os\ndef run(path):\n    return sorted(os.listdir(path))\n"
        async with make_sandbox(launcher="unshare", slots=1, hide=(str(inside),)) as sb:
            result = await run(sb, code, str(inside))
    finally:
        shutil.rmtree(inside, ignore_errors=True)
    assert result.status is SandboxStatus.SUCCEEDED, result.error
    assert result.output == []


_NON_ROOT = """
import importlib.util, json, os, sys
spec = importlib.util.spec_from_file_location("limits_copy", sys.argv[1])
lim = importlib.util.module_from_spec(spec)
sys.modules["limits_copy"] = lim
spec.loader.exec_module(lim)
view, paths = json.loads(sys.argv[2]), json.loads(sys.argv[3])
lim.unshare(lim.CLONE_NEWPID)  # as the fork-server does for a child without a uid of its own
pid = os.fork()
if pid == 0:
    lim.private_tmp(os.getuid(), lim.Limits(), network=True, view=view)
    lim.drop_capabilities()
    out = {"/": sorted(os.listdir("/")), "procs": [p for p in os.listdir("/proc") if p.isdigit()]}
    for name, path in paths.items():
        try:
            with open(path) as fh:
                out[name] = fh.read()
        except OSError as exc:
            out[name] = type(exc).__name__
    import sqlite3, xml.dom.minidom  # the standard library, read after the pivot
    with open("/tmp/scratch", "w") as fh:
        out["tmp"] = fh.write("x")
    print(json.dumps(out), flush=True)
    os._exit(0)
sys.exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""


def test_non_root_user_namespace_hides_what_the_worker_user_reads(
    host_secrets: dict[str, str],
) -> None:
    """Not root (``unshare --map-root-user``): the step keeps the worker's uid, reads nothing."""
    if os.geteuid() != 0:
        pytest.skip("needs root to become another user (this run itself is the non-root case)")
    tools = {t: shutil.which(t) for t in ("setpriv", "unshare")}
    python = "/usr/bin/python3"  # the worker's venv may sit where the other user cannot read
    missing = [t for t, p in tools.items() if p is None] + (
        [] if os.path.exists(python) else [python]
    )
    if missing:
        if os.environ.get("CONVEYOR_CI"):
            pytest.fail(f"missing on the CI machine: {missing}")
        pytest.skip(f"not installed: {missing}")
    nobody = 65534
    for path in host_secrets.values():
        probe = subprocess.run(
            [
                str(tools["setpriv"]),
                f"--reuid={nobody}",
                f"--regid={nobody}",
                "--clear-groups",
                "cat",
                path,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert probe.stdout.startswith("secret-"), probe.stderr  # the worker's user can read it
    base = Path(host_secrets["ssh"]).parents[2]
    script, limits_copy = base / "probe.py", base / "limits.py"
    script.write_text(_NON_ROOT)
    shutil.copyfile(package_dir() / "sandbox" / "limits.py", limits_copy)
    for f in (script, limits_copy):
        f.chmod(0o644)
    full = host_view()
    view = {
        **full,
        "binds": [(s, d) for s, d in full["binds"] if d == "/usr" or d.startswith("/lib")],
    }
    paths = {**host_secrets, "passwd": "/etc/passwd", "script": str(script)}
    proc = subprocess.run(
        [
            str(tools["setpriv"]),
            f"--reuid={nobody}",
            f"--regid={nobody}",
            "--clear-groups",
            str(tools["unshare"]),
            "--map-root-user",
            "--net",
            "--pid",
            "--fork",
            "--kill-child",
            "--mount-proc",
            python,
            "-I",
            str(script),
            str(limits_copy),
            json.dumps(view),
            json.dumps(paths),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd="/",
    )
    if proc.returncode != 0 and "unshare failed" in proc.stderr:
        pytest.skip(f"no unprivileged user namespaces here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    leaked = {k: v for k, v in out.items() if k in paths and v != "FileNotFoundError"}
    assert leaked == {}, leaked
    assert out["tmp"] == 1 and out["procs"] == ["1"], out
    assert not {"var", "home", "srv", "root", "run"} & set(out["/"]), out["/"]
