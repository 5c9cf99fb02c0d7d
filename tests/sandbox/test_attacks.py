"""The attacks of issue 5: each must end with its status, leave the worker healthy, and leave
no process behind. No test here sends a packet beyond loopback — network isolation is
proved from the step's view of its interfaces and routes, and by being refused on loopback
ports that are open on the host."""

from __future__ import annotations

import socket
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

import conveyor
from conveyor.sandbox import Limits, Sandbox, SandboxStatus, seccomp
from tests.sandbox.support import assert_no_strays, make_sandbox, needs_bwrap, run

CHECKOUT = Path(conveyor.__file__).resolve().parent.parent


async def healthy(sb: Sandbox) -> None:
    """The sandbox still runs an ordinary step and nothing is left over."""
    result = await run(sb, "def run(input):\n    return 'ok'\n")
    assert result.status is SandboxStatus.SUCCEEDED, result.error
    await assert_no_strays(sb)


@pytest.fixture
async def tight() -> AsyncIterator[Sandbox]:
    """A sandbox with small limits so the attacks hit them quickly."""
    limits = Limits(memory_kb=512 * 1024, cpu_s=30, nofile=64, nproc=32, fsize_kb=8 * 1024)
    async with make_sandbox(limits=limits, slots=1) as sb:
        yield sb


@pytest.fixture
def host_listener() -> Iterator[int]:
    """A TCP listener on the host's loopback; its port, for the step to try."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    yield srv.getsockname()[1]
    srv.close()


async def test_allocate_4gb(tight: Sandbox) -> None:
    """Allocating 4 GB ends MEMORY_LIMIT_EXCEEDED (RLIMIT_AS)."""
    result = await run(tight, "def run(input):\n    return len(bytearray(4 * 1024**3))\n")
    assert result.status is SandboxStatus.MEMORY_LIMIT_EXCEEDED
    await healthy(tight)


async def test_allocate_gradually(tight: Sandbox) -> None:
    """Growing a list until memory runs out also ends MEMORY_LIMIT_EXCEEDED."""
    code = "def run(input):\n    x = []\n    while True:\n        x.append(bytearray(1 << 20))\n"
    result = await run(tight, code)
    assert result.status is SandboxStatus.MEMORY_LIMIT_EXCEEDED
    await healthy(tight)


async def test_busy_loop_hits_wall_time(sandbox: Sandbox) -> None:
    """``while True: pass`` ends TIMEOUT at the step's timeout_s."""
    result = await run(sandbox, "def run(input):\n    while True:\n        pass\n", timeout_s=1)
    assert result.status is SandboxStatus.TIMEOUT
    await healthy(sandbox)


async def test_busy_loop_hits_cpu_limit() -> None:
    """With a CPU limit below the timeout, RLIMIT_CPU ends the loop as TIMEOUT."""
    async with make_sandbox(limits=Limits(cpu_s=1), slots=1) as sb:
        result = await run(sb, "def run(input):\n    while True:\n        pass\n", timeout_s=20)
        assert result.status is SandboxStatus.TIMEOUT
        assert "CPU" in (result.error or "")
        await healthy(sb)


async def test_sleep_past_timeout(sandbox: Sandbox) -> None:
    """Sleeping past timeout_s ends TIMEOUT and the child is replaced."""
    code = "import time\ndef run(input):\n    time.sleep(60)\n"
    result = await run(sandbox, code, timeout_s=0.5)
    assert result.status is SandboxStatus.TIMEOUT
    assert "0.5 s" in (result.error or "")
    await healthy(sandbox)


async def test_fork_bomb(tight: Sandbox) -> None:
    """A fork bomb is stopped by RLIMIT_NPROC and the wall time; every fork is killed."""
    code = (
        "import os\n"
        "def run(input):\n"
        "    while True:\n"
        "        try:\n"
        "            os.fork()\n"
        "        except OSError:\n"
        "            pass\n"
    )
    result = await run(tight, code, timeout_s=2)
    assert result.status is SandboxStatus.TIMEOUT
    await healthy(tight)


async def test_fork_bomb_that_gives_up(tight: Sandbox) -> None:
    """A fork bomb that lets the error escape fails; its copies never answer."""
    code = "import os\ndef run(input):\n    while True:\n        os.fork()\n"
    result = await run(tight, code, timeout_s=5)
    assert result.status is SandboxStatus.FAILED
    assert "BlockingIOError" in (result.error or "")
    await healthy(tight)


async def test_fork_bomb_left_running_after_return(tight: Sandbox) -> None:
    """A fork bomb still exploding when run() returns is frozen and killed before the answer."""
    code = (
        "import os, time\n"
        "def run(input):\n"
        "    if os.fork() == 0:\n"
        "        while True:\n"
        "            try:\n"
        "                os.fork()\n"
        "            except OSError:\n"
        "                pass\n"
        "    time.sleep(0.5)\n"
        "    return 'returned'\n"
    )
    result = await run(tight, code, timeout_s=20)
    assert result.status is SandboxStatus.SUCCEEDED and result.output == "returned"
    await healthy(tight)


async def test_open_10000_files(tight: Sandbox) -> None:
    """Opening 10,000 files fails at RLIMIT_NOFILE."""
    code = "def run(input):\n    return len([open('/dev/null') for _ in range(10_000)])\n"
    result = await run(tight, code)
    assert result.status is SandboxStatus.FAILED
    assert "Too many open files" in (result.error or "")
    await healthy(tight)


async def test_write_2gb_file(tight: Sandbox) -> None:
    """Writing a 2 GB file fails at RLIMIT_FSIZE / the private /tmp size."""
    code = (
        "def run(input):\n"
        "    chunk = b'x' * (1 << 20)\n"
        "    with open('big.bin', 'wb') as fh:\n"
        "        for _ in range(2048):\n"
        "            fh.write(chunk)\n"
    )
    result = await run(tight, code)
    assert result.status is SandboxStatus.FAILED
    assert "File too large" in (result.error or "") or "No space" in (result.error or "")
    await healthy(tight)


async def test_host_loopback_services_refused(sandbox: Sandbox, host_listener: int) -> None:
    """Connecting to the host's Redis, Postgres or any host loopback port is refused."""
    code = (
        "import socket\n"
        "def run(input):\n"
        "    out = {}\n"
        "    for port in input:\n"
        "        try:\n"
        "            socket.create_connection(('127.0.0.1', port), timeout=2).close()\n"
        "            out[port] = 'connected'\n"
        "        except OSError as exc:\n"
        "            out[port] = type(exc).__name__\n"
        "    return out\n"
    )
    result = await run(sandbox, code, [6379, 5432, host_listener])
    assert result.status is SandboxStatus.SUCCEEDED, result.error
    assert "connected" not in result.output.values(), result.output
    assert result.output[str(host_listener)] in ("ConnectionRefusedError", "OSError")


async def test_no_interface_but_loopback_and_no_route(sandbox: Sandbox) -> None:
    """The step sees only ``lo`` and an empty routing table (read, never connected)."""
    code = (
        "import os, socket\n"
        "def run(input):\n"
        "    routes = open('/proc/net/route').read().splitlines()[1:]\n"
        "    sysnet = os.listdir('/sys/class/net') if os.path.isdir('/sys/class/net') else []\n"
        "    names = [name for _, name in socket.if_nameindex()]\n"
        "    v6 = open('/proc/net/ipv6_route').read().split() if os.path.exists("
        "'/proc/net/ipv6_route') else []\n"
        "    return {'routes': routes, 'sys': sysnet, 'names': names, 'v6': v6}\n"
    )
    result = await run(sandbox, code)
    assert result.status is SandboxStatus.SUCCEEDED, result.error
    assert result.output["names"] == ["lo"]
    assert result.output["routes"] == []
    assert set(result.output["sys"]) <= {"lo"}


async def test_environment_has_no_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither os.environ nor /proc/1/environ nor the parent's environ shows any AP_*."""
    canary = "c0ffee" * 8
    monkeypatch.setenv("AP_ENCRYPTION_KEY", canary)
    monkeypatch.setenv("AP_POSTGRES_PASSWORD", canary)
    code = (
        "import os\n"
        "def run(input):\n"
        "    seen = {'env': sorted(os.environ)}\n"
        "    for path in ('/proc/1/environ', f'/proc/{os.getppid()}/environ', "
        "'/proc/self/environ'):\n"
        "        try:\n"
        "            seen[path] = open(path, 'rb').read().decode(errors='replace')\n"
        "        except OSError as exc:\n"
        "            seen[path] = type(exc).__name__\n"
        "    return seen\n"
    )
    async with make_sandbox(slots=1) as sb:
        result = await run(sb, code)
    assert result.status is SandboxStatus.SUCCEEDED, result.error
    text = repr(result.output)
    assert canary not in text
    assert not [k for k in result.output["env"] if k.startswith("AP_")]
    assert "AP_" not in result.output["/proc/1/environ"]


async def test_cannot_read_host_secrets_or_checkout(sandbox: Sandbox, tmp_path: Path) -> None:
    """/etc/shadow, a 0700 config dir and the project checkout are unreadable."""
    config_dir = tmp_path / "conveyor-config"
    config_dir.mkdir(mode=0o700)
    (config_dir / "keys").write_text("secret-key")
    targets = [
        "/etc/shadow",
        str(config_dir / "keys"),
        str(CHECKOUT / "setup.cfg"),
        str(CHECKOUT / "tests" / "conftest.py"),
        "/root/.bash_history",
    ]
    code = (
        "def run(input):\n"
        "    out = {}\n"
        "    for path in input:\n"
        "        try:\n"
        "            out[path] = open(path).read()[:20]\n"
        "        except OSError as exc:\n"
        "            out[path] = type(exc).__name__\n"
        "    return out\n"
    )
    result = await run(sandbox, code, targets)
    assert result.status is SandboxStatus.SUCCEEDED, result.error
    for path in targets:
        assert result.output[path] in ("FileNotFoundError", "PermissionError"), (path, result)


async def test_kill_parent_fails(sandbox: Sandbox) -> None:
    """os.kill of the parent (the fork-server) and of pid 1 is refused; the worker lives on."""
    code = (
        "import os, signal\n"
        "def run(input):\n"
        "    out = []\n"
        "    for pid in (os.getppid(), 1):\n"
        "        try:\n"
        "            os.kill(pid, signal.SIGKILL)\n"
        "            out.append('killed')\n"
        "        except OSError as exc:\n"
        "            out.append(type(exc).__name__)\n"
        "    return out\n"
    )
    result = await run(sandbox, code)
    assert result.status is SandboxStatus.SUCCEEDED, result.error
    if sandbox.probe.get("uid_drop"):
        assert result.output == ["PermissionError", "PermissionError"]
    await healthy(sandbox)


@pytest.mark.parametrize(
    "spawn",
    [
        "subprocess.Popen(['sleep', '300'])",
        "subprocess.Popen(['sleep', '300'], start_new_session=True)",
        "subprocess.Popen(['sh', '-c', 'setsid sleep 300 & sleep 300 &'])",
        "double_fork()",
    ],
    ids=["plain", "setsid", "shell-background", "double-fork"],
)
async def test_no_background_process_survives(sandbox: Sandbox, spawn: str) -> None:
    """Background processes (plain, setsid, shell &, double fork) die with the step, warm or not."""
    code = (
        "import os, subprocess, time\n"
        "def double_fork():\n"
        "    if os.fork() == 0:\n"
        "        os.setsid()\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(300)\n"
        "        os._exit(0)\n"
        "def run(input):\n"
        f"    {spawn}\n"
        "    time.sleep(0.2)\n"
        "    import sys\n"
        "    return sys.__dict__.setdefault('_identity', os.urandom(8).hex())\n"
    )
    first = await run(sandbox, code, flow_id=f"bg-{spawn}")
    assert first.status is SandboxStatus.SUCCEEDED, first.error
    await assert_no_strays(sandbox)
    second = await run(sandbox, code, flow_id=f"bg-{spawn}")
    assert second.output == first.output  # the warm child was kept, its strays were not
    await assert_no_strays(sandbox)


async def test_background_thread_recycles_child(sandbox: Sandbox) -> None:
    """A thread left running after run() returns gets the child retired, not reused."""
    code = (
        "import os, threading, time\n"
        "def run(input):\n"
        "    threading.Thread(target=time.sleep, args=(300,), daemon=True).start()\n"
        "    import sys\n"
        "    return sys.__dict__.setdefault('_identity', os.urandom(8).hex())\n"
    )
    first = await run(sandbox, code, flow_id="thread")
    second = await run(sandbox, code, flow_id="thread")
    assert first.status is second.status is SandboxStatus.SUCCEEDED
    assert first.output != second.output


async def test_subclasses_walk_reaches_os_but_not_the_host(sandbox: Sandbox) -> None:
    """The ``__subclasses__()`` walk reaches ``os``, and the OS boundary still holds."""
    code = (
        "def run(input):\n"
        "    subs = ().__class__.__base__.__subclasses__()\n"
        "    wrap = [c for c in subs if c.__name__ == '_wrap_close'][0]\n"
        "    os = wrap.__init__.__globals__['sys'].modules['os']\n"
        "    out = {'uid': os.getuid()}\n"
        "    for path in ('/etc/shadow', '/root/.bashrc'):\n"
        "        try:\n"
        "            out[path] = os.open(path, os.O_RDONLY)\n"
        "        except OSError as exc:\n"
        "            out[path] = type(exc).__name__\n"
        "    out['system'] = os.system('cat /etc/shadow >/dev/null 2>&1')\n"
        "    out['env'] = [k for k in os.environ if k.startswith('AP_')]\n"
        "    return out\n"
    )
    result = await run(sandbox, code)
    assert result.status is SandboxStatus.SUCCEEDED, result.error
    out = result.output
    assert out["/etc/shadow"] in ("FileNotFoundError", "PermissionError")
    assert out["/root/.bashrc"] in ("FileNotFoundError", "PermissionError")
    assert out["system"] != 0
    assert out["env"] == []


async def test_print_100mb(sandbox: Sandbox) -> None:
    """Printing 100 MB succeeds with the logs capped and the overflow counted."""
    code = (
        "def run(input):\n    for _ in range(100):\n        print('x' * (1 << 20))\n    return 1\n"
    )
    result = await run(sandbox, code, timeout_s=30)
    assert result.status is SandboxStatus.SUCCEEDED, result.error
    cap = sandbox.config.limits.log_bytes
    assert cap <= len(result.logs) < cap + 200
    assert "more characters of output dropped" in result.logs
    fd_level = "import os\ndef run(input):\n    os.write(1, b'y' * (64 << 20))\n    return 2\n"
    quiet = await run(sandbox, fd_level, timeout_s=30)
    assert quiet.status is SandboxStatus.SUCCEEDED and quiet.output == 2


async def test_no_state_crosses_flows() -> None:
    """Module attributes and /tmp files one flow leaves are invisible to the next flow."""
    leave = (
        "import json, os, tempfile\n"
        "def run(input):\n"
        "    json.leaked = 'flow-a'\n"
        "    open('/tmp/leak.txt', 'w').write('flow-a')\n"
        "    open(os.path.join(tempfile.gettempdir(), 'leak2.txt'), 'w').write('a')\n"
        "    open('/dev/shm/leak3', 'w').write('a')\n"
        "    return sorted(os.listdir('/tmp'))\n"
    )
    look = (
        "import json, os\n"
        "def run(input):\n"
        "    return {'attr': getattr(json, 'leaked', None), 'tmp': os.listdir('/tmp'),\n"
        "            'shm': os.listdir('/dev/shm'), 'cwd': os.listdir('.')}\n"
    )
    async with make_sandbox(slots=1) as sb:
        left = await run(sb, leave, flow_id="flow-a")
        assert left.status is SandboxStatus.SUCCEEDED, left.error
        seen = await run(sb, look, flow_id="flow-b")
        again = await run(sb, look, flow_id="flow-a")
    assert seen.status is SandboxStatus.SUCCEEDED, seen.error
    assert seen.output == {"attr": None, "tmp": [], "shm": [], "cwd": []}
    # Within one flow version a warm child keeps imported modules but /tmp starts empty.
    assert again.output["tmp"] == [] and again.output["shm"] == []


@needs_bwrap
async def test_filesystem_view_is_read_only(sandbox: Sandbox) -> None:
    """Outside its private /tmp the step can write nowhere, not even in the Python install."""
    targets = ["/usr/evil", f"{sys.prefix}/evil", "/opt/conveyor/conveyor/evil", "/evil"]
    code = (
        "def run(input):\n"
        "    out = {}\n"
        "    for path in input:\n"
        "        try:\n"
        "            open(path, 'w').write('x')\n"
        "            out[path] = 'written'\n"
        "        except OSError as exc:\n"
        "            out[path] = type(exc).__name__\n"
        "    return out\n"
    )
    result = await run(sandbox, code, targets)
    assert result.status is SandboxStatus.SUCCEEDED, result.error
    assert "written" not in result.output.values(), result.output
    assert not (Path(sys.prefix) / "evil").exists()


@pytest.mark.parametrize(
    "attack",
    [
        "os.write(3, b'\\xff' * 64)",
        "os.write(3, (10**9).to_bytes(4, 'big'))",
        "os.close(3)",
    ],
    ids=["garbage", "huge-length", "close"],
)
async def test_broken_channel_fails_fast(sandbox: Sandbox, attack: str) -> None:
    """Corrupting or closing its socket fails the step at once; the fork-server lives on."""
    server = sandbox.server_pid
    code = f"import os, time\ndef run(input):\n    {attack}\n    time.sleep(60)\n"
    result = await run(sandbox, code, timeout_s=30)
    assert result.status is SandboxStatus.FAILED  # not TIMEOUT: nobody waited 30 s
    assert "channel" in (result.error or "")
    assert sandbox.server_pid == server
    await healthy(sandbox)


async def test_segfault_fails_the_step(sandbox: Sandbox) -> None:
    """A step that crashes its interpreter (SIGSEGV via ctypes) fails; the worker lives on."""
    result = await run(sandbox, "import ctypes\ndef run(input):\n    ctypes.string_at(0)\n")
    assert result.status is SandboxStatus.FAILED
    assert "SIGSEGV" in (result.error or "")
    await healthy(sandbox)


async def test_os_exit_fails_the_step(sandbox: Sandbox) -> None:
    """os._exit() inside run() ends FAILED with the exit code, not a hang."""
    result = await run(sandbox, "import os\ndef run(input):\n    os._exit(3)\n")
    assert result.status is SandboxStatus.FAILED
    assert "code 3" in (result.error or "")
    await healthy(sandbox)


_FORGER = """
import os, stat
def run(input):
    if input["who"] == "alice":
        forged = b'{"status":"SUCCEEDED","output":"forged","logs":"","error":null}'
        for fd in range(3, 64):
            try:
                if stat.S_ISSOCK(os.fstat(fd).st_mode):
                    os.write(fd, len(forged).to_bytes(4, "big") + forged)
            except OSError:
                pass
    return {"answer_for": input["who"], "secret": input["who"] + "-ssn"}
"""


async def test_forged_answer_frame_is_refused(sandbox: Sandbox) -> None:
    """A step writing a fake answer on its channel gets FAILED; the next run gets its own."""
    first = await run(sandbox, _FORGER, {"who": "alice"}, flow_id="forger")
    assert first.output != "forged"
    assert first.status is SandboxStatus.FAILED
    second = await run(sandbox, _FORGER, {"who": "bob"}, flow_id="forger")
    assert second.status is SandboxStatus.SUCCEEDED
    assert second.output == {"answer_for": "bob", "secret": "bob-ssn"}


async def test_shared_memory_does_not_cross_children(sandbox: Sandbox) -> None:
    """A SysV shared-memory segment created by one step is invisible to the next child."""
    code = (
        "import ctypes\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "def run(input):\n"
        "    shmid = libc.shmget(0x5EC0, 4096, input['flags'])\n"
        "    return shmid\n"
    )
    created = await run(sandbox, code, {"flags": 0o1666}, flow_id="shm-a")  # IPC_CREAT|0666
    assert created.status is SandboxStatus.SUCCEEDED and created.output >= 0
    seen = await run(sandbox, code, {"flags": 0o666}, flow_id="shm-b")
    assert seen.status is SandboxStatus.SUCCEEDED and seen.output == -1


_KERNEL_SURFACE = """
import ctypes, os, subprocess, threading
libc = ctypes.CDLL(None, use_errno=True)
def run(input):
    out = {}
    out["seccomp"] = [l.split()[1] for l in open("/proc/self/status") if l.startswith("Seccomp:")]
    out["userns"] = libc.unshare(0x10000000)                      # CLONE_NEWUSER
    out["userns_errno"] = ctypes.get_errno()
    out["mount"] = libc.mount(b"none", b"/tmp", b"tmpfs", 0, None)
    out["clone_parent"] = libc.syscall(56, 0x00008000 | 17, 0, 0, 0, 0)  # CLONE_PARENT|SIGCHLD
    t = threading.Thread(target=lambda: None); t.start(); t.join()
    out["thread"] = True
    out["subprocess"] = subprocess.run(["/bin/true"]).returncode
    pid = os.fork()
    if pid == 0:
        os._exit(7)
    out["fork"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    return out
"""


@pytest.mark.skipif(not seccomp.supported(), reason="no syscall table for this architecture")
async def test_kernel_surface_is_closed_but_python_works(sandbox: Sandbox) -> None:
    """User namespaces, mounts and CLONE_PARENT are refused; threads, fork, subprocess work."""
    result = await run(sandbox, _KERNEL_SURFACE)
    assert result.status is SandboxStatus.SUCCEEDED, result.error
    out = result.output
    assert out["seccomp"] == ["2"]
    assert out["userns"] == -1 and out["userns_errno"] == 1  # EPERM
    assert out["mount"] == -1 and out["clone_parent"] == -1
    assert out["thread"] is True and out["subprocess"] == 0 and out["fork"] == 7
