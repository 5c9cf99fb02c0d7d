#!/usr/bin/env bash
# Installs what building and running Conveyor's images here needs, with apt, skipping what is
# present: podman, runc (crun refuses these hosts' hybrid cgroups), debootstrap (the base image
# is made locally, no registry is reachable), uidmap and the CNI plugins.
# Sourcing this file also exports CONTAINERS_CONF=configs/container/containers.conf.
# See configs/README.md, "Build the image".
set -euo pipefail
_here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$_here/containers.conf}"

_need=()
command -v podman >/dev/null 2>&1 || _need+=(podman)
command -v runc >/dev/null 2>&1 || _need+=(runc)
command -v debootstrap >/dev/null 2>&1 || _need+=(debootstrap)
command -v newuidmap >/dev/null 2>&1 || _need+=(uidmap)
[ -x /usr/lib/cni/bridge ] || _need+=(containernetworking-plugins)
if [ ${#_need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup-podman: missing ${_need[*]}; run as root or: sudo apt-get install ${_need[*]}" >&2
    exit 1
  fi
  echo "setup-podman: installing ${_need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${_need[@]}" >/dev/null
fi
