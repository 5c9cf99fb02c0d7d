#!/usr/bin/env bash
# Makes the base image `debian:bookworm-slim` locally when podman does not have it: no registry
# is reachable from the CI hosts, so it is debootstrapped (--variant=minbase) from the Debian
# mirror in apt's sources, slimmed like the official image and imported with `podman import`
# as docker.io/library/debian:bookworm-slim, the name `FROM debian:bookworm-slim` resolves to.
#
#   configs/container/base.sh            # no-op when the image exists
#   configs/container/base.sh --force    # re-import (reuses the cached rootfs tarball)
#   configs/container/base.sh --refresh  # debootstrap again, replace the cached tarball
#
# The rootfs tarball is cached in ${CONVEYOR_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/conveyor};
# the cache is never required. DEBIAN_MIRROR overrides the mirror. See configs/README.md.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=setup-podman.sh
. "$here/setup-podman.sh"

BASE_IMAGE="${BASE_IMAGE:-docker.io/library/debian:bookworm-slim}"
SUITE=bookworm
force=0 refresh=0
for arg in "$@"; do
  case "$arg" in
    --force) force=1 ;;
    --refresh) force=1 refresh=1 ;;
    *) echo "base.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

if [ "$force" = 0 ] && podman image exists "$BASE_IMAGE"; then
  exit 0
fi

cache="${CONVEYOR_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/conveyor}"
tarball="$cache/debian-$SUITE-slim-rootfs.tar"
mkdir -p "$cache"

mirror() {
  # The first Debian URI of apt's sources (deb822 or one-line format), else deb.debian.org.
  local uri=""
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    uri="$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)"
  fi
  if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
    uri="$(awk '$1 == "deb" && $0 !~ /security/ {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; exit}}' /etc/apt/sources.list)"
  fi
  echo "${uri:-http://deb.debian.org/debian}"
}

if [ "$refresh" = 1 ] || [ ! -s "$tarball" ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "base.sh: debootstrap needs root" >&2
    exit 1
  fi
  root="$(mktemp -d "$cache/rootfs.XXXXXX")"
  partial="$(mktemp "$cache/rootfs-tar.XXXXXX")"
  trap 'rm -rf "$root" "$partial"' EXIT
  url="${DEBIAN_MIRROR:-$(mirror)}"
  echo "base.sh: debootstrap --variant=minbase $SUITE from $url" >&2
  debootstrap --variant=minbase "$SUITE" "$root" "$url" >"$cache/debootstrap.log" 2>&1 || {
    tail -20 "$cache/debootstrap.log" >&2
    exit 1
  }
  # What the official slim image has: no docs, man pages or locales from later installs, apt
  # that keeps no package cache, deb.debian.org sources (with updates and security).
  cat >"$root/etc/dpkg/dpkg.cfg.d/docker" <<'CFG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
CFG
  cat >"$root/etc/apt/apt.conf.d/docker-clean" <<'CFG'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
CFG
  cat >"$root/etc/apt/apt.conf.d/docker-no-languages" <<'CFG'
Acquire::Languages "none";
CFG
  cat >"$root/etc/apt/apt.conf.d/docker-gzip-indexes" <<'CFG'
Acquire::GzipIndexes "true";
CFG
  cat >"$root/etc/apt/apt.conf.d/docker-autoremove-suggests" <<'CFG'
Apt::AutoRemove::SuggestsImportant "false";
CFG
  rm -f "$root/etc/apt/sources.list"
  cat >"$root/etc/apt/sources.list.d/debian.sources" <<CFG
Types: deb
URIs: http://deb.debian.org/debian
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
CFG
  find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete 2>/dev/null || true
  find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete 2>/dev/null || true
  rm -rf "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/* \
         "$root"/usr/share/groff/* "$root"/usr/share/lintian/* \
         "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin \
         "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/archives/partial/* \
         "$root"/var/cache/debconf/*-old "$root"/var/lib/dpkg/*-old "$root"/var/log/* \
         "$root"/tmp/* "$root"/root/.bash_history
  : >"$root/etc/resolv.conf"
  echo "debian" >"$root/etc/hostname"
  tar --numeric-owner --xattrs -C "$root" -cf "$partial" .
  chmod 0644 "$partial"
  mv "$partial" "$tarball"
  rm -rf "$root"
  trap - EXIT
fi

echo "base.sh: importing $tarball as $BASE_IMAGE" >&2
podman import --quiet \
  --change 'CMD ["bash"]' \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --message "debootstrap --variant=minbase $SUITE (configs/container/base.sh)" \
  "$tarball" "$BASE_IMAGE" >/dev/null
