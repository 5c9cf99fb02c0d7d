"""The package as users get it: sdist → wheel → a fresh venv, not an editable checkout.

An editable install (`pip install -e`, what every other test uses) imports from the source
tree, so a sub-package without ``__init__.py`` or a data file missing from ``package_data``
goes unnoticed there and breaks only ``pip install .`` — which is what the Dockerfile runs.
This test builds the sdist, builds the wheel *from the sdist* (so the sdist is complete too),
installs the wheel into a new virtual environment and checks it from the outside: every module
imports, every data file is there, and ``conveyor up`` on the embedded default gets ready.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import venv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.polling import eventually_sync
from tests.processes import free_port

ROOT = Path(__file__).resolve().parent.parent
_SKIP_DIRS = {".git", ".venv", "dist", "build", "__pycache__", ".pytest_cache", ".mypy_cache"}


def _source_modules(src: Path) -> set[str]:
    """Dotted names of every module in the source tree ``src``."""
    names = set()
    for path in (src / "conveyor").rglob("*.py"):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__main__":
            continue  # importing it runs the CLI, by design
        if parts[-1] == "__init__":
            parts.pop()
        names.add(".".join(parts))
    return names


def _source_data_files(src: Path) -> set[str]:
    """Paths (relative to the package) of every non-Python file in the source tree ``src``."""
    package = src / "conveyor"
    return {
        str(p.relative_to(package))
        for p in package.rglob("*")
        if p.is_file() and p.suffix not in {".py", ".pyc"} and "__pycache__" not in p.parts
    }


def _copy_tree(dest: Path) -> Path:
    """A copy of the checkout without build output (setuptools writes egg-info into it)."""

    def ignore(directory: str, names: list[str]) -> set[str]:
        return {n for n in names if n in _SKIP_DIRS or n.endswith(".egg-info")}

    shutil.copytree(ROOT, dest, ignore=ignore)
    return dest


@dataclass(frozen=True)
class Installed:
    """A venv holding the wheel, and the source tree the wheel was built from."""

    venv: Path
    src: Path


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    """A fresh venv with Conveyor installed from a wheel built from the sdist."""
    work = tmp_path_factory.mktemp("packaging")
    src = _copy_tree(work / "src")
    dist = work / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(dist), str(src)],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    sdists = list(dist.glob("conveyor-*.tar.gz"))
    wheels = list(dist.glob("conveyor-*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, sorted(p.name for p in dist.iterdir())
    env_dir = work / "venv"
    venv.create(env_dir, with_pip=True)
    subprocess.run(
        [str(env_dir / "bin" / "pip"), "install", "-q", str(wheels[0])],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    yield Installed(env_dir, src)


def _run_in(env_dir: Path, code: str) -> str:
    """Run ``code`` with the venv's interpreter outside the checkout; returns stdout."""
    result = subprocess.run(
        [str(env_dir / "bin" / "python"), "-c", code],
        check=False, capture_output=True, text=True, timeout=120, cwd=env_dir,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.timeout(900)
def test_wheel_is_not_the_checkout(installed: Installed) -> None:
    """The venv imports conveyor from its own site-packages, not from a source tree."""
    where = _run_in(installed.venv, "import conveyor; print(conveyor.__file__)").strip()
    assert where.startswith(str(installed.venv)), where


@pytest.mark.timeout(900)
def test_every_module_imports_from_the_wheel(installed: Installed) -> None:
    """Every module of the source tree is in the wheel and imports there."""
    modules = sorted(_source_modules(installed.src))
    assert "conveyor.store.db" in modules
    code = (
        "import importlib, sys\n"
        f"failed = []\nfor name in {modules!r}:\n"
        "    try:\n        importlib.import_module(name)\n"
        "    except Exception as exc:\n        failed.append(f'{name}: {exc!r}')\n"
        "print('\\n'.join(failed))\n"
    )
    assert _run_in(installed.venv, code).strip() == ""


@pytest.mark.timeout(900)
def test_every_data_file_is_in_the_wheel(installed: Installed) -> None:
    """SQL migrations, board templates and static assets, py.typed: all installed."""
    wanted = sorted(_source_data_files(installed.src))
    assert any(f.startswith("store/sql/") for f in wanted)
    assert any(f.startswith("board/templates/") for f in wanted)
    assert any(f.startswith("board/static/") for f in wanted)
    code = (
        "import conveyor, pathlib\n"
        "root = pathlib.Path(conveyor.__file__).parent\n"
        f"print('\\n'.join(f for f in {wanted!r} if not (root / f).is_file()))\n"
    )
    assert _run_in(installed.venv, code).strip() == ""


def _ready(port: int, proc: subprocess.Popen[bytes], timeout_s: float) -> bool:
    """Whether /readyz answered 200 within ``timeout_s`` (False at once if ``proc`` exits)."""

    def answered_or_exited() -> bool:
        if proc.poll() is not None:
            return True
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return bool(r.status == 200)

    try:
        eventually_sync(
            answered_or_exited, timeout_s=timeout_s, interval_s=0.1, what="/readyz 200",
            ignore=(urllib.error.URLError, OSError),
        )  # fmt: skip
    except AssertionError:
        return False
    return proc.poll() is None


@pytest.mark.timeout(900)
def test_installed_conveyor_up_gets_ready(installed: Installed) -> None:
    """`conveyor up` from the wheel: embedded servers start, /readyz 200, SIGTERM exits 0."""
    config = Path(tempfile.mkdtemp(prefix="conveyor-pkg-"))
    config.chmod(0o755)  # the embedded PostgreSQL runs as its own user and must reach in
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AP_", "PYTHONPATH"))}
    env.update({"AP_CONFIG_PATH": str(config / "c"), "AP_PORT": str(port)})
    env["AP_LOG_LEVEL"] = "warning"
    proc = subprocess.Popen(
        [str(installed.venv / "bin" / "conveyor"), "up"], env=env, cwd=config,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        ready = _ready(port, proc, 120)
        if not ready:
            proc.kill()
            _, err = proc.communicate(timeout=30)
            pytest.fail(f"not ready (exit {proc.returncode}): {err.decode()[-2000:]}")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(config, ignore_errors=True)
