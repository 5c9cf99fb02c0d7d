#!/usr/bin/env bash
# `podman` with this directory's containers.conf (runc, no ulimit changes): use it like podman.
set -euo pipefail
export CONTAINERS_CONF="${CONTAINERS_CONF:-$(cd "$(dirname "$0")" && pwd)/containers.conf}"
exec podman "$@"
