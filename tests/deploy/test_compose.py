"""Both compose files, run for real with podman-compose: up, a flow, load, a kill, down.

Strategy 1 (``configs/docker-compose.yml``): nginx in front of two WORKER_AND_APP containers.
Strategy 2 (``configs/docker-compose.split.yml``): nginx, two APP and two WORKER containers.
Each test copies ``configs/`` to a temporary directory, fills in the env files, and brings the
stack up under a project name of its own with nginx published on a free loopback port only.
Redis, PostgreSQL and nginx are Debian stand-ins built from ``configs/container/<service>/``
(when missing or changed; they stay in podman's store), selected through the compose files'
image variables.
Then: a sync webhook through nginx answers the flow's body (code step in the sandbox, respond),
async webhooks stream in, one container is killed mid-load (``podman kill``), and every run
that was accepted (202) must reach a terminal state. The stack is removed in every case.

Needs podman (root), PyPI's podman-compose and podman's DNS plugin; the conftest builds
``localhost/conveyor:latest`` (``configs/container/build.sh``) once per session. Without them the
tests skip, or fail under ``CONVEYOR_CI=1``. Each test takes about 1-1.5 minutes here.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, NoReturn

import pytest

from tests.polling import eventually_sync

pytestmark = pytest.mark.compose

ROOT = Path(__file__).resolve().parent.parent.parent
CONFIGS = ROOT / "configs"
CONTAINER = CONFIGS / "container"
CONVEYOR_IMAGE = "localhost/conveyor:latest"
#: service -> (local stand-in image, the compose variable that selects it); built from
#: configs/container/<service>/.
STAND_INS = {
    "redis": ("localhost/conveyor-redis:7.0", "CONVEYOR_REDIS_IMAGE"),
    "postgres": ("localhost/conveyor-postgres:15", "CONVEYOR_POSTGRES_IMAGE"),
    "nginx": ("localhost/conveyor-nginx:1.22", "CONVEYOR_NGINX_IMAGE"),
}
#: Label of a stand-in image: digest of its build context and base (rebuilt when it changes).
DIGEST_LABEL = "org.conveyor.build-digest"
#: Secrets the env examples leave empty.
SECRETS = {
    "AP_API_KEY": "compose-test-api-key",
    "AP_ENCRYPTION_KEY": "0123456789abcdef" * 4,
    "AP_QUEUE_UI_PASSWORD": "compose-test-board",
    "AP_POSTGRES_PASSWORD": "compose-test-db",
}
#: Projects are named <prefix>-<pytest pid>-<random>; leftovers of a dead pytest are removed.
PROJECT_PREFIX = "cvcompose"
TERMINAL = {"SUCCEEDED", "FAILED", "TIMEOUT", "INTERNAL_ERROR", "CANCELED", "MEMORY_LIMIT_EXCEEDED"}
FLOW = """
name: compose-load
trigger: {type: webhook}
steps:
  - name: square
    type: code
    input: {n: "{{trigger.body.n}}"}
    code: |
      import time

      def run(input):
          time.sleep(0.2)
          return {"square": int(input["n"]) ** 2}
  - name: reply
    type: respond
    input: {status: 200, body: {square: "{{square.square}}"}}
"""
READY_TIMEOUT_S = 180.0
#: Webhooks per second of each of the four clients: enough that runs are in flight when the
#: container dies, few enough that two shared cores work the backlog off in seconds.
CLIENT_RATE = 4.0
#: Webhooks accepted (about 4 s of the four clients' load) before the victim is killed: runs
#: are in flight when it dies. The load then goes on for LOAD_AFTER_KILL_S.
KILL_AFTER_ACCEPTED = 64
LOAD_AFTER_KILL_S = 14.0
#: The queue's visibility timeout (60 s) + its reclaim interval + slack: a run the killed
#: container held is reclaimed by a live worker within this.
SETTLE_TIMEOUT_S = 120.0


def _missing(what: str) -> NoReturn:
    if os.environ.get("CONVEYOR_CI") == "1":
        pytest.fail(f"{what} (.ci/run provides it)")
    pytest.skip(what)


def _podman_env() -> dict[str, str]:
    env = dict(os.environ)
    # runc and no ulimit changes: what these hosts need (configs/container/containers.conf).
    env.setdefault("CONTAINERS_CONF", str(CONTAINER / "containers.conf"))
    for key in [k for k in env if k.startswith(("CONVEYOR_", "COMPOSE_"))]:
        del env[key]
    return env


def _podman(*args: str, timeout: float = 120, check: bool = True) -> str:
    proc = subprocess.run(
        ["podman", *args],
        env=_podman_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def _podman_compose() -> list[str]:
    venv_tool = Path(sys.executable).parent / "podman-compose"
    if venv_tool.is_file():
        return [str(venv_tool)]
    found = shutil.which("podman-compose")
    if found is None:
        _missing("podman-compose is not installed (pip install 'podman-compose>=1.6')")
    version = subprocess.run(
        [found, "version"], capture_output=True, text=True, timeout=60, check=False
    ).stdout
    if "podman-compose version 1.0" in version:
        _missing("podman-compose >= 1.6 is needed (Debian's 1.0 reads neither file correctly)")
    return [found]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_projects(select: Callable[[str], bool]) -> None:
    """Containers, volumes and networks of every compose project ``select`` picks."""
    rows = json.loads(_podman("ps", "-a", "--format", "json", check=False) or "[]")
    projects = set()
    for c in rows:
        project = (c.get("Labels") or {}).get("io.podman.compose.project", "")
        if project and select(project):
            projects.add(project)
            _podman("rm", "-f", "-t", "0", c["Id"], check=False)
    for vol in _podman("volume", "ls", "--format", "{{.Name}}", check=False).split():
        if select(vol.split("_", 1)[0]):
            _podman("volume", "rm", "-f", vol, check=False)
    for net in _podman("network", "ls", "--format", "{{.Name}}", check=False).split():
        if select(net.split("_", 1)[0]):
            _podman("network", "rm", "-f", net, check=False)


def _abandoned(project: str) -> bool:
    """A project of these tests whose pytest process is gone (killed by a timeout, say)."""
    match = re.fullmatch(rf"{PROJECT_PREFIX}-(\d+)-[0-9a-f]+", project)
    return bool(match) and not _pid_alive(int(match.group(1)))  # type: ignore[union-attr]


def _context_digest(context: Path, base_id: str) -> str:
    """What a stand-in image is built from: its build context's files and the base image."""
    digest = hashlib.sha256(base_id.encode())
    for path in sorted(p for p in context.rglob("*") if p.is_file()):
        digest.update(path.relative_to(context).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _build_stand_ins(base_image: str) -> None:
    """Build each stand-in whose build context or base changed since it was built."""
    base_id = _podman("image", "inspect", "--format", "{{.Id}}", base_image).strip()
    for service, (image, _) in STAND_INS.items():
        context = CONTAINER / service
        want = _context_digest(context, base_id)
        have = _podman(
            "image",
            "inspect",
            "--format",
            '{{index .Labels "' + DIGEST_LABEL + '"}}',
            image,
            check=False,
        ).strip()
        if have != want:
            _podman(
                "build", "--network=host", "--build-arg", f"BASE={base_image}",
                "--label", f"{DIGEST_LABEL}={want}", "-t", image, str(context),
                timeout=600,
            )  # fmt: skip


@pytest.fixture(scope="module")
def images(base_image: str, conveyor_image: str) -> None:
    """podman-compose, a DNS plugin, the conveyor image (conftest: built once per session) and
    the Redis/PostgreSQL/nginx stand-ins (built when missing or changed)."""
    _podman_compose()
    # Service names (redis, postgres, conveyor-http) resolve on podman's bridge network only
    # with the dnsname plugin (CNI backend) or aardvark-dns (netavark backend).
    backend = _podman("info", "--format", "{{.Host.NetworkBackend}}").strip()
    if backend == "cni" and not Path("/usr/lib/cni/dnsname").is_file():
        _missing("podman's CNI backend lacks the dnsname plugin (apt: ...-plugin-dnsname)")
    if backend == "netavark" and not Path("/usr/lib/podman/aardvark-dns").is_file():
        _missing("podman's netavark backend lacks aardvark-dns (apt: aardvark-dns)")
    assert conveyor_image == CONVEYOR_IMAGE
    _build_stand_ins(base_image)
    _remove_projects(_abandoned)


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Stack:
    """One compose project: copied configs, filled env files, podman-compose around it."""

    def __init__(self, tmp_path: Path, compose_file: str) -> None:
        self.compose_file = compose_file
        # The pid tells a later session whether this project was abandoned.
        self.project = f"{PROJECT_PREFIX}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.dir = tmp_path / "configs"
        shutil.copytree(CONFIGS, self.dir, ignore=shutil.ignore_patterns("helm", "grafana"))
        for name in ("conveyor", "app", "worker"):
            lines = []
            for raw in (CONFIGS / f"{name}.env.example").read_text().splitlines():
                key, sep, value = raw.partition("=")
                empty_secret = sep and not raw.startswith("#") and not value and key in SECRETS
                lines.append(f"{key}={SECRETS[key]}" if empty_secret else raw)
            (self.dir / f"{name}.env").write_text("\n".join(lines) + "\n")
        self.port = _free_loopback_port()
        self.env = _podman_env() | {
            "CONVEYOR_HTTP_PORT": f"127.0.0.1:{self.port}",
            **{var: image for image, var in STAND_INS.values()},
        }
        self.log = tmp_path / "podman-compose.log"

    def compose(self, *args: str, timeout: float = 300) -> None:
        cmd = [
            *_podman_compose(),
            "-p",
            self.project,
            "--env-file",
            "conveyor.env",
            "-f",
            self.compose_file,
            *args,
        ]
        with self.log.open("a") as log:
            log.write(f"$ {' '.join(cmd)}\n")
            log.flush()
            proc = subprocess.run(
                cmd,
                cwd=self.dir,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
            )
        if proc.returncode != 0:
            tail = self.log.read_text()[-4000:]
            raise AssertionError(
                f"podman-compose {' '.join(args)} exited {proc.returncode}\n{tail}"
            )

    def containers(self) -> dict[str, list[str]]:
        """Service -> container names of this project."""
        label = f"label=io.podman.compose.project={self.project}"
        rows = json.loads(_podman("ps", "-a", "--filter", label, "--format", "json") or "[]")
        out: dict[str, list[str]] = {}
        for c in rows:
            service = (c.get("Labels") or {}).get("com.docker.compose.service", "?")
            out.setdefault(service, []).append(c["Names"][0])
        return {k: sorted(v) for k, v in out.items()}

    def dump_logs(self) -> None:
        print(self.log.read_text()[-4000:] if self.log.exists() else "(no podman-compose log)")
        for names in self.containers().values():
            for name in names:
                out = subprocess.run(
                    ["podman", "logs", "--tail", "30", name],
                    env=_podman_env(),
                    capture_output=True,
                    text=True,
                    timeout=60,
                    check=False,
                )
                print(f"----- {name}\n{out.stdout[-3000:]}{out.stderr[-3000:]}")

    def down(self) -> None:
        try:
            self.compose("down", "-v", "-t", "5", timeout=180)
        finally:
            _remove_projects(lambda project: project == self.project)

    # ----------------------------------------------------------------------------- HTTP
    def request(
        self, method: str, path: str, body: Any = None, *, auth: bool = True, timeout: float = 30
    ) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            headers = {"Content-Type": "application/json"}
            if auth:
                headers["Authorization"] = f"Bearer {SECRETS['AP_API_KEY']}"
            data = None if body is None else json.dumps(body).encode()
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
            try:
                return resp.status, json.loads(raw) if raw else None
            except ValueError:
                return resp.status, raw.decode(errors="replace")
        finally:
            conn.close()

    def wait_ready(self, worker_hosts: int) -> float:
        """Seconds until nginx answers the API and ``worker_hosts`` containers run workers."""
        start = time.monotonic()
        last: list[Any] = [None]

        def ready() -> bool:
            try:
                status, body = self.request("GET", "/api/v1/workers", timeout=5)
            except OSError as exc:
                last[0] = exc
                return False
            last[0] = (status, body)
            if status != 200:
                return False
            hosts = {w.get("host") for w in body["data"] if w.get("role") != "APP"}
            return len(hosts) >= worker_hosts

        try:
            eventually_sync(ready, timeout_s=READY_TIMEOUT_S, interval_s=1, what="stack ready")
        except AssertionError:
            raise AssertionError(
                f"stack not ready in {READY_TIMEOUT_S:.0f} s; last answer: {last[0]!r}"
            ) from None
        return time.monotonic() - start


@contextmanager
def running(tmp_path: Path, compose_file: str) -> Iterator[Stack]:
    """The stack, up; its logs printed if the body fails; always removed."""
    stack = Stack(tmp_path, compose_file)
    try:
        stack.compose("up", "-d")
        yield stack
    except BaseException:
        stack.dump_logs()
        raise
    finally:
        stack.down()


# ------------------------------------------------------------------------------- scenario
def _create_flow(stack: Stack) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=30)
    try:
        headers = {
            "Content-Type": "application/yaml",
            "Authorization": f"Bearer {SECRETS['AP_API_KEY']}",
        }
        conn.request("POST", "/api/v1/flows", body=FLOW.encode(), headers=headers)
        resp = conn.getresponse()
        status, body = resp.status, json.loads(resp.read())
    finally:
        conn.close()
    assert status == 201, body
    flow_id: str = body["id"]
    return flow_id


def _fire(
    stack: Stack, flow_id: str, stop: threading.Event, accepted: list[str], other: Counter[str]
) -> None:
    """Async webhooks until ``stop``; run ids of the 202s go to ``accepted``."""
    n = 0
    conn: http.client.HTTPConnection | None = None
    next_at = time.monotonic()
    while not stop.is_set():
        n += 1
        next_at += 1 / CLIENT_RATE
        stop.wait(max(0.0, next_at - time.monotonic()))
        try:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=15)
            conn.request(
                "POST",
                f"/api/v1/webhooks/{flow_id}",
                body=json.dumps({"n": n}).encode(),
                headers={"Content-Type": "application/json"},
            )
            resp = conn.getresponse()
            raw = resp.read()
            if resp.status == 202:
                accepted.append(json.loads(raw)["run_id"])
            else:
                other[str(resp.status)] += 1
                time.sleep(0.05)  # the load client's back-off after a refusal, not a wait
        except (OSError, http.client.HTTPException) as exc:
            other[type(exc).__name__] += 1
            if conn is not None:
                conn.close()
            conn = None
            time.sleep(0.1)  # the load client's back-off before reconnecting
    if conn is not None:
        conn.close()


def _load_and_kill(stack: Stack, flow_id: str, victim: str) -> dict[str, Any]:
    """Four clients; ``victim`` is killed once KILL_AFTER_ACCEPTED webhooks were accepted and
    the load goes on for LOAD_AFTER_KILL_S. Then every accepted run is polled until terminal.
    Returns the figures."""
    stop = threading.Event()
    accepted: list[str] = []
    other: Counter[str] = Counter()
    threads = [
        threading.Thread(target=_fire, args=(stack, flow_id, stop, accepted, other), daemon=True)
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    try:
        eventually_sync(
            lambda: len(accepted) >= KILL_AFTER_ACCEPTED,
            timeout_s=60,
            interval_s=0.1,
            what=f"{KILL_AFTER_ACCEPTED} webhooks accepted before the kill",
        )
    except AssertionError as exc:
        stop.set()
        raise AssertionError(f"{exc}; {len(accepted)} accepted, others {dict(other)}") from None
    before_kill = len(accepted)
    _podman("kill", victim)
    # Fault schedule: the load goes on while the victim's runs are taken over (a bounded
    # window; "nothing accepted after the kill" is asserted below, so no event ends it).
    time.sleep(LOAD_AFTER_KILL_S)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert accepted, f"no webhook was accepted: {dict(other)}"
    assert len(accepted) > before_kill, "nothing was accepted after the kill"

    pending = set(accepted)
    final: dict[str, str] = {}
    attempts: Counter[Any] = Counter()
    settle_start = time.monotonic()

    def settled() -> bool:
        for run_id in list(pending):
            try:
                status, body = stack.request("GET", f"/api/v1/flow-runs/{run_id}", timeout=10)
            except OSError:
                break
            if status == 200 and body["status"] in TERMINAL:
                final[run_id] = body["status"]
                attempts[body.get("attempt")] += 1
                pending.discard(run_id)
        return not pending

    with suppress(AssertionError):  # what is still pending is reported and asserted below
        eventually_sync(settled, timeout_s=SETTLE_TIMEOUT_S, interval_s=2, what="runs terminal")
    figures = {
        "accepted": len(accepted),
        "accepted_before_kill": before_kill,
        "terminal": len(final),
        "by_status": dict(Counter(final.values())),
        "attempts": {str(k): v for k, v in attempts.items()},
        "not_accepted": dict(other),
        "settle_s": round(time.monotonic() - settle_start, 1),
        "victim": _podman(
            "inspect", "--format", "{{.State.Status}} restarts={{.RestartCount}}", victim
        ).strip(),
    }
    print(f"compose figures ({stack.compose_file}): {json.dumps(figures)}")
    assert not pending, f"{len(pending)} accepted runs never ended: {figures}"
    return figures


def _check_sync_webhook(stack: Stack, flow_id: str) -> None:
    status, body = stack.request("POST", f"/api/v1/webhooks/{flow_id}/sync", {"n": 7}, auth=False)
    if status != 200 and isinstance(body, dict) and "run_id" in body:
        _, run = stack.request("GET", f"/api/v1/flow-runs/{body['run_id']}")
        body = {"answer": body, "run": run}
    assert status == 200, body
    assert str(body["square"]) == "49", body


def _check_sandbox_full(container: str, port: int) -> None:
    """/readyz inside ``container``: code steps run in bubblewrap, the compose file's
    security options (seccomp profile, unmasked /proc, AppArmor) passed through podman."""
    probe = (
        "import json, urllib.request; "
        f"print(json.dumps(json.load(urllib.request.urlopen('http://127.0.0.1:{port}/readyz'))))"
    )
    out = _podman("exec", container, "python3", "-c", probe, timeout=60)
    sandbox = json.loads(out)["checks"]["sandbox"]
    assert sandbox["isolation"] == "full", sandbox


def _check_nginx_hides_internals(stack: Stack) -> None:
    for path in ("/metrics", "/readyz"):
        status, _ = stack.request("GET", path, auth=False)
        assert status == 404, path


# The first deploy test of a session also pays for the image builds (cold: minutes).
@pytest.mark.timeout(1200)
def test_compose_strategy_one_survives_a_killed_instance(images: None, tmp_path: Path) -> None:
    """Strategy 1 runs; killing one WORKER_AND_APP mid-load loses no accepted run."""
    started = time.monotonic()
    with running(tmp_path, "docker-compose.yml") as stack:
        services = stack.containers()
        assert len(services["conveyor"]) == 2, services
        stack.wait_ready(worker_hosts=2)
        print(f"compose strategy 1: up to ready in {time.monotonic() - started:.1f} s")
        _check_sandbox_full(services["conveyor"][0], 8080)
        _check_nginx_hides_internals(stack)
        flow_id = _create_flow(stack)
        _check_sync_webhook(stack, flow_id)
        figures = _load_and_kill(stack, flow_id, services["conveyor"][0])
        assert figures["by_status"].get("SUCCEEDED", 0) > 0


# The first deploy test of a session also pays for the image builds (cold: minutes).
@pytest.mark.timeout(1200)
def test_compose_strategy_two_survives_a_killed_worker(images: None, tmp_path: Path) -> None:
    """Strategy 2 runs; killing one WORKER mid-load loses no accepted run."""
    started = time.monotonic()
    with running(tmp_path, "docker-compose.split.yml") as stack:
        services = stack.containers()
        assert len(services["app"]) == 2 and len(services["worker"]) == 2, services
        stack.wait_ready(worker_hosts=2)
        print(f"compose strategy 2: up to ready in {time.monotonic() - started:.1f} s")
        _check_sandbox_full(services["worker"][0], 9090)
        _check_nginx_hides_internals(stack)
        flow_id = _create_flow(stack)
        _check_sync_webhook(stack, flow_id)
        figures = _load_and_kill(stack, flow_id, services["worker"][0])
        assert figures["by_status"].get("SUCCEEDED", 0) > 0
