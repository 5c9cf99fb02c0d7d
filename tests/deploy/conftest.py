"""podman helpers shared by the deploy tests: the configured ``podman``, and the images.

``configs/container/build.sh`` is the one command that builds ``localhost/conveyor:latest``
here (it installs podman if missing, makes the Debian base with debootstrap if absent, and
builds with podman's layer cache); ``configs/container/base.sh`` makes only the base. The
session fixtures below call them once per test session. Without podman (or without root, which
debootstrap and the CI hosts' podman need) the tests skip, or fail when ``CONVEYOR_CI=1``.
Set ``CONVEYOR_TEST_IMAGE_REBUILD=0`` to use an existing image as it is.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import NoReturn

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
CONTAINER_DIR = ROOT / "configs" / "container"
CONTAINERS_CONF = CONTAINER_DIR / "containers.conf"
BUILD_SH = CONTAINER_DIR / "build.sh"
BASE_SH = CONTAINER_DIR / "base.sh"
CONVEYOR_IMAGE = "localhost/conveyor:latest"
#: What ``FROM debian:bookworm-slim`` resolves to in podman's store (base.sh imports it).
BASE_IMAGE = "docker.io/library/debian:bookworm-slim"
#: A cold build (apt installs, debootstrap, pip) takes a few minutes; a warm one seconds.
BUILD_TIMEOUT_S = 840.0


def missing(what: str) -> NoReturn:
    """Skip for a missing machine tool, or fail under CI (``.ci/run`` installs it)."""
    if os.environ.get("CONVEYOR_CI") == "1":
        pytest.fail(f"{what} (.ci/run provides it)", pytrace=False)
    pytest.skip(what)


def podman_env() -> dict[str, str]:
    """This environment with the repository's containers.conf (runc, no ulimit changes)."""
    env = dict(os.environ)
    env.setdefault("CONTAINERS_CONF", str(CONTAINERS_CONF))
    return env


def podman(
    *args: str, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run ``podman args``; with ``check`` a non-zero exit fails with podman's stderr."""
    proc = subprocess.run(
        ["podman", *args],
        env=podman_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} -> {proc.returncode}: {proc.stderr[-2000:]}")
    return proc


def image_exists(image: str) -> bool:
    return podman("image", "exists", image, check=False).returncode == 0


def _require_podman() -> None:
    if os.geteuid() != 0:
        missing("the container tests build and run images as root (debootstrap, podman here)")
    if shutil.which("podman") is None or shutil.which("runc") is None:
        missing("podman and runc are not installed (configs/container/setup-podman.sh)")


def _run_script(script: Path, log: Path) -> float:
    """Run a build script, its output in ``log``; returns the seconds it took."""
    started = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.run(
            [str(script)],
            env=podman_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=BUILD_TIMEOUT_S,
            check=False,
        )
    if proc.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-40:])
        pytest.fail(f"{script.name} exited {proc.returncode}:\n{tail}", pytrace=False)
    return time.monotonic() - started


@pytest.fixture(scope="session")
def base_image(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The local ``debian:bookworm-slim`` (configs/container/base.sh; a no-op when present)."""
    _require_podman()
    if not image_exists(BASE_IMAGE):
        _run_script(BASE_SH, tmp_path_factory.mktemp("base") / "base.log")
    return BASE_IMAGE


@pytest.fixture(scope="session")
def conveyor_image(base_image: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """``localhost/conveyor:latest`` built from this checkout, once per session (build.sh).

    Tests using it need ``@pytest.mark.timeout(900)``: the first one pays for the build.
    """
    rebuild = os.environ.get("CONVEYOR_TEST_IMAGE_REBUILD", "1") != "0"
    if rebuild or not image_exists(CONVEYOR_IMAGE):
        _run_script(BUILD_SH, tmp_path_factory.mktemp("build") / "build.log")
    return CONVEYOR_IMAGE
