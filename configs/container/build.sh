#!/usr/bin/env bash
# Builds localhost/conveyor:latest with podman on a machine with no registry (the CI hosts):
# installs podman/runc/debootstrap if missing (setup-podman.sh), makes the base image locally if
# absent (base.sh), then `podman build` of the repository's Dockerfile with this directory's
# containers.conf, host networking, and the host's CA bundle and pip index for pip.
#
#   configs/container/build.sh [extra podman build options]
#
# IMAGE overrides the tag. See configs/README.md, "Build the image".
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
# shellcheck source-path=SCRIPTDIR source=setup-podman.sh
. "$here/setup-podman.sh"
"$here/base.sh"

IMAGE="${IMAGE:-localhost/conveyor:latest}"
args=(--format=docker --network=host --pull=never --layers --tag "$IMAGE" --file "$repo/Dockerfile")

# pip inside the build trusts what pip here trusts: the host's CA bundle (a TLS-intercepting
# proxy's CA included), a build secret mounted for the pip steps only, never in the image.
# (Not a volume over the image's /etc/ssl/certs/ca-certificates.crt: installing Debian's
# ca-certificates rewrites that file, and a volume's mount point stays in every stage.)
ca="${CONVEYOR_BUILD_CA:-${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}}"
if [ -s "$ca" ]; then
  args+=(--secret "id=pip_cert,src=$ca" --build-arg PIP_CERT=/run/secrets/pip_cert)
fi
# ... and the same index (PIP_INDEX_URL or pip's configured index-url; default PyPI).
index="${PIP_INDEX_URL:-}"
if [ -z "$index" ] && command -v pip3 >/dev/null 2>&1; then
  index="$(pip3 config get global.index-url 2>/dev/null || true)"
fi
case "$index" in
  http://*|https://*) args+=(--build-arg "PIP_INDEX_URL=$index") ;;
esac

exec podman build "${args[@]}" "$@" "$repo"
