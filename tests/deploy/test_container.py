"""The image ``localhost/conveyor:latest``, built here with podman and run as a container.

The session builds the image once (``configs/container/build.sh``, see ``conftest.py``). Each
container runs on the host network against the test Redis (its own DB index) and a throwaway
PostgreSQL database on loopback, with the sandbox options configs/README.md documents for
podman (``seccomp=configs/seccomp/conveyor-worker.json``, ``unmask=/proc/*``). Checked: the
image's metadata, ``/readyz`` with full sandbox isolation inside the container, a sync webhook
whose code step runs in that sandbox, the non-root uid, the HEALTHCHECK command, and a SIGTERM
(``podman stop``) that drains a running flow and exits 0 within the documented grace.

Needs ``CONVEYOR_TEST_REDIS_URL`` and ``CONVEYOR_TEST_POSTGRES_URL`` (TCP servers the
container can reach); without them, or without podman, the tests skip (fail under CI).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from tests.conftest import TEST_REDIS_DB, _with_db_index, throwaway_database
from tests.deploy.conftest import ROOT, missing, podman
from tests.polling import eventually
from tests.processes import free_port

pytestmark = [pytest.mark.container, pytest.mark.timeout(900)]

SECCOMP = ROOT / "configs" / "seccomp" / "conveyor-worker.json"
#: The podman options configs/README.md documents for a worker container here.
SANDBOX_OPTS = ("--security-opt", f"seccomp={SECCOMP}", "--security-opt", "unmask=/proc/*")
API_KEY = "container-test-api-key"
#: Every container these tests start carries this label (leftovers are removed).
LABEL = "conveyor.test=container"
#: The grace configs/README.md and the Dockerfile document (docker stop -t 90).
STOP_GRACE_S = 90
READY_TIMEOUT_S = 120.0
SLEEP_STEP_S = 4
FLOW: dict[str, Any] = {
    "name": "container-sync",
    "trigger": {"type": "webhook"},
    "steps": [
        {
            "name": "double",
            "type": "code",
            "input": {"n": "{{trigger.body.n}}"},
            "code": (
                "import os, socket\n"
                "def run(input):\n"
                "    return {'double': input['n'] * 2, 'uid': os.getuid(),\n"
                "            'hostname': socket.gethostname()}\n"
            ),
        },
        {"name": "reply", "type": "respond", "input": {"status": 200, "body": "{{double}}"}},
    ],
}
SLOW_FLOW: dict[str, Any] = {
    "name": "container-drain",
    "trigger": {"type": "webhook"},
    "steps": [
        {
            "name": "wait",
            "type": "code",
            "input": {},
            "code": (
                f"import time\ndef run(input):\n    time.sleep({SLEEP_STEP_S})\n    return 'done'\n"
            ),
        }
    ],
}


@pytest.fixture(scope="module")
def servers() -> tuple[str, str]:
    """The test servers' URLs (TCP on loopback, reachable from a host-network container)."""
    redis_url = os.environ.get("CONVEYOR_TEST_REDIS_URL")
    postgres_url = os.environ.get("CONVEYOR_TEST_POSTGRES_URL")
    if not redis_url or not postgres_url:
        missing("the container tests need CONVEYOR_TEST_REDIS_URL and CONVEYOR_TEST_POSTGRES_URL")
    return redis_url, postgres_url


class Container:
    """One ``podman run -d`` of the image with the test servers; removed by :meth:`remove`."""

    def __init__(self, image: str, redis_url: str, postgres_url: str, **env: str) -> None:
        self.name = f"cvtest-ctr-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.port = free_port()
        # A WORKER serves /healthz, /readyz and /metrics on AP_METRICS_PORT, and no API.
        listen = "AP_METRICS_PORT" if env.get("AP_CONTAINER_TYPE") == "WORKER" else "AP_PORT"
        self.base = f"http://127.0.0.1:{self.port}"
        self.env = {
            listen: str(self.port),
            # Host networking: the image's 0.0.0.0 would listen on every host interface.
            "AP_HOST": "127.0.0.1",
            "AP_REDIS_URL": redis_url,
            "AP_POSTGRES_URL": postgres_url,
            "AP_API_KEY": API_KEY,
            "AP_ENCRYPTION_KEY": "ef" * 32,
            "AP_QUEUE_UI_USERNAME": "admin",
            "AP_QUEUE_UI_PASSWORD": "container-test-board",
            "AP_REDIS_KEY_PREFIX": f"cvctr{uuid.uuid4().hex[:8]}",
            **env,
        }
        args = ["run", "-d", "--name", self.name, "--label", LABEL, "--network=host"]
        # No systemd here: the HEALTHCHECK is run on demand (podman healthcheck run).
        args += ["--health-interval=disable", *SANDBOX_OPTS]
        for key, value in self.env.items():
            args += ["--env", f"{key}={value}"]
        self.started = time.monotonic()
        podman(*args, image)

    def logs(self) -> str:
        proc = podman("logs", self.name, check=False)
        return (proc.stdout + proc.stderr)[-4000:]

    def inspect(self) -> dict[str, Any]:
        data: list[dict[str, Any]] = json.loads(podman("inspect", self.name).stdout)
        return data[0]

    async def wait_ready(self, http: aiohttp.ClientSession) -> dict[str, Any]:
        """Poll /readyz until 200 (its body), failing early if the container exits."""

        async def ready() -> dict[str, Any] | None:
            try:
                async with http.get(f"{self.base}/readyz") as r:
                    if r.status == 200:
                        body: dict[str, Any] = await r.json()
                        return body
            except aiohttp.ClientError:
                pass
            assert self.inspect()["State"]["Running"], "the container exited"
            return None

        try:
            return await eventually(
                ready, timeout_s=READY_TIMEOUT_S, interval_s=0.2, what="/readyz 200"
            )
        except AssertionError as exc:
            raise AssertionError(
                f"{self.name} never answered /readyz 200 ({exc}):\n{self.logs()}"
            ) from None

    def remove(self) -> None:
        podman("rm", "-f", "-t", "0", self.name, check=False)


def _labelled() -> dict[str, str]:
    """Name -> id of every container these tests started (any session)."""
    out = podman("ps", "-a", "--filter", f"label={LABEL}", "--format", "{{.Names}} {{.ID}}")
    return dict(line.split() for line in out.stdout.splitlines() if line.strip())


@pytest.fixture(scope="module", autouse=True)
def _no_leftovers(conveyor_image: str) -> Iterator[None]:
    """Containers of dead sessions are removed first; none of this session's outlive it."""
    for name, cid in _labelled().items():
        if not Path(f"/proc/{name.split('-')[2]}").exists():
            podman("rm", "-f", "-t", "0", cid, check=False)
    yield
    mine = [n for n in _labelled() if n.startswith(f"cvtest-ctr-{os.getpid()}-")]
    assert mine == [], f"containers left running: {mine}"


@pytest.fixture(scope="module")
async def database(servers: tuple[str, str]) -> AsyncIterator[str]:
    """A throwaway PostgreSQL database for this module's containers."""
    async with throwaway_database(servers[1], "conveyor_ctr") as url:
        yield url


@pytest.fixture(scope="module")
async def running(
    conveyor_image: str, servers: tuple[str, str], database: str
) -> AsyncIterator[Container]:
    """One WORKER_AND_APP container, ready (/readyz 200), shared by the read-only tests."""
    container = Container(conveyor_image, _redis_url(servers[0]), database)
    try:
        async with aiohttp.ClientSession() as http:
            await container.wait_ready(http)
        yield container
    finally:
        container.remove()


def _redis_url(url: str) -> str:
    """The test Redis with this run's DB index (CONVEYOR_TEST_REDIS_DB)."""
    return _with_db_index(url, TEST_REDIS_DB)


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


async def _create_flow(http: aiohttp.ClientSession, base: str, flow: dict[str, Any]) -> str:
    async with http.post(f"{base}/api/v1/flows", json=flow) as r:
        assert r.status == 401, "the API answered without AP_API_KEY"
    async with http.post(f"{base}/api/v1/flows", json=flow, headers=_auth()) as r:
        assert r.status == 201, await r.text()
        flow_id: str = (await r.json())["id"]
        return flow_id


def test_image_metadata(conveyor_image: str) -> None:
    """Non-root user, tini entrypoint, exec-form HEALTHCHECK, SIGTERM, both ports, the venv."""
    data = json.loads(podman("image", "inspect", conveyor_image).stdout)[0]
    config = data["Config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["/usr/bin/tini", "--", "conveyor"]
    assert config["Cmd"] == ["up"]
    assert config["StopSignal"] == "SIGTERM"
    assert set(config["ExposedPorts"]) == {"8080/tcp", "9090/tcp"}
    assert data["Healthcheck"]["Test"][:2] == ["CMD", "python"]
    env = dict(e.split("=", 1) for e in config["Env"])
    assert env["PATH"].startswith("/opt/venv/bin:")
    assert env["AP_HOST"] == "0.0.0.0"


def test_image_has_the_package_and_no_build_tools(conveyor_image: str) -> None:
    """A non-editable install with its data files; no compiler, pip cache or host CA leaks."""
    script = (
        "import importlib.resources as r, shutil, conveyor, conveyor.store.db;"
        "print(conveyor.__file__);"
        "print(r.files('conveyor').joinpath('store/sql/0001_initial.sql').is_file());"
        "print(shutil.which('gcc'), shutil.which('cc'))"
    )
    proc = podman("run", "--rm", "--entrypoint", "python", conveyor_image, "-c", script)
    path, sql, compilers = proc.stdout.split("\n")[:3]
    assert path.startswith("/opt/venv/lib/python3.11/site-packages/conveyor/")
    assert sql == "True"
    assert compilers == "None None"
    listing = podman(
        "run", "--rm", "--user", "0", "--entrypoint", "ls", conveyor_image, "-A", "/run", "/root"
    ).stdout
    assert "host-ca-certificates.crt" not in listing and ".cache" not in listing


async def test_readyz_reports_full_isolation(running: Container) -> None:
    """/readyz is 200 with Redis, PostgreSQL and sandbox isolation `full` inside the container."""
    async with aiohttp.ClientSession() as http:
        body = await running.wait_ready(http)
    assert body["status"] == "ready"
    assert body["checks"]["redis"]["ok"] and body["checks"]["postgres"]["ok"]
    sandbox = body["checks"]["sandbox"]
    assert sandbox["isolation"] == "full", sandbox
    assert "bubblewrap" in sandbox["mechanism"] and "no network" in sandbox["mechanism"]


async def test_sync_webhook_runs_a_code_step(running: Container) -> None:
    """A flow made through the API answers its sync webhook with the code step's result."""
    async with aiohttp.ClientSession() as http:
        flow_id = await _create_flow(http, running.base, FLOW)
        url = f"{running.base}/api/v1/webhooks/{flow_id}/sync"
        async with http.post(url, json={"n": 21}) as r:
            assert r.status == 200, await r.text()
            body = await r.json()
    # Run inside bubblewrap: the sandbox's own hostname, uid 0 of its user namespace.
    assert body == {"double": 42, "uid": 0, "hostname": "conveyor-sandbox"}


def test_runs_as_non_root(running: Container) -> None:
    """Inside the container, and seen from the host, Conveyor's processes are uid 10001."""
    assert podman("exec", running.name, "id", "-u").stdout.strip() == "10001"
    pid = running.inspect()["State"]["Pid"]
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    assert children, "tini has no child"
    for p in [pid, *map(int, children)]:
        status = Path(f"/proc/{p}/status").read_text()
        uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
        assert set(uids) == {"10001"}, (p, uids)


def test_healthcheck_passes(running: Container, conveyor_image: str) -> None:
    """`podman healthcheck run` passes; the same command on a port with nothing fails."""
    proc = podman("healthcheck", "run", running.name, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    image = json.loads(podman("image", "inspect", conveyor_image).stdout)[0]
    command = image["Healthcheck"]["Test"][1:]
    worker = ["--env", "AP_CONTAINER_TYPE=WORKER", "--env", f"AP_METRICS_PORT={free_port()}"]
    proc = podman("exec", *worker, running.name, *command, check=False)
    assert proc.returncode != 0


async def test_sigterm_drains_and_exits_zero(
    conveyor_image: str, servers: tuple[str, str], database: str
) -> None:
    """`podman stop` mid-run: the running flow finishes, the container exits 0 in the grace."""
    container = Container(conveyor_image, _redis_url(servers[0]), database)
    try:
        async with aiohttp.ClientSession() as http:
            await container.wait_ready(http)
            flow_id = await _create_flow(http, container.base, SLOW_FLOW)
            async with http.post(f"{container.base}/api/v1/webhooks/{flow_id}", json={}) as r:
                assert r.status == 202, await r.text()
                run_id = (await r.json())["run_id"]

            async def picked_up() -> str | None:
                url = f"{container.base}/api/v1/flow-runs/{run_id}"
                async with http.get(url, headers=_auth()) as r:
                    status: str = (await r.json())["status"]
                return status if status != "QUEUED" else None

            status = await eventually(
                picked_up, timeout_s=10, interval_s=0.05, what="the run picked up"
            )
            assert status == "RUNNING"
        proc = podman("stop", "-t", str(STOP_GRACE_S), container.name, timeout=STOP_GRACE_S + 30)
        assert proc.returncode == 0
        state = container.inspect()["State"]
        # A SIGKILL at the end of the grace would be 137.
        assert state["ExitCode"] == 0, container.logs()
        conn = await asyncpg.connect(database)
        try:
            final = await conn.fetchval("SELECT status FROM runs WHERE id = $1", uuid.UUID(run_id))
        finally:
            await conn.close()
        assert final == "SUCCEEDED", container.logs()
    finally:
        container.remove()


async def test_worker_container(
    conveyor_image: str, servers: tuple[str, str], database: str
) -> None:
    """A WORKER container: /readyz on AP_METRICS_PORT, full isolation, HEALTHCHECK passes."""
    container = Container(
        conveyor_image, _redis_url(servers[0]), database, AP_CONTAINER_TYPE="WORKER"
    )
    try:
        async with aiohttp.ClientSession() as http:
            body = await container.wait_ready(http)
            async with http.get(f"{container.base}/metrics") as r:
                assert r.status == 200 and "conveyor_" in await r.text()
        assert body["checks"]["sandbox"]["isolation"] == "full", body
        proc = podman("healthcheck", "run", container.name, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert podman("stop", "-t", str(STOP_GRACE_S), container.name).returncode == 0
        assert container.inspect()["State"]["ExitCode"] == 0, container.logs()
    finally:
        container.remove()
