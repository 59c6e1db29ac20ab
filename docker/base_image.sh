#!/usr/bin/env bash
# A Debian bookworm base image made without any image registry: debootstrap --variant=minbase, then
# import the tree. Kept if it already exists (FORCE=1 rebuilds it).
#   docker/base_image.sh [IMAGE]            default IMAGE: localhost/bookworm-min
# Needs root, debootstrap and podman (CONTAINER_ENGINE=docker works too). DEBIAN_MIRROR overrides the mirror.
set -euo pipefail
IMAGE=${1:-localhost/bookworm-min}
ENGINE=${CONTAINER_ENGINE:-podman}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if [ -z "${FORCE:-}" ] && "$ENGINE" image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "base image $IMAGE: present"
  exit 0
fi
root=$(mktemp -d /var/tmp/bookworm-min.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "base image $IMAGE: debootstrap --variant=minbase bookworm from $MIRROR"
debootstrap --variant=minbase bookworm "$root" "$MIRROR" >"$root.log" 2>&1 || { tail -20 "$root.log"; exit 1; }
rm -f "$root.log"

# Security updates too, like the official images.
cat >"$root/etc/apt/sources.list" <<SOURCES
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
SOURCES
# What debian:bookworm-slim does to stay slim: no recommends, no docs, man pages or translations,
# and no downloaded packages left behind after an install.
cat >"$root/etc/apt/apt.conf.d/90slim" <<'APT'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };
Acquire::Languages "none";
APT
cat >"$root/etc/dpkg/dpkg.cfg.d/90slim" <<'DPKG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
DPKG
find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
rm -rf "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/* \
       "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin "$root"/var/lib/apt/lists/* \
       "$root"/var/log/*.log "$root"/var/log/apt/* "$root"/tmp/*

tar --numeric-owner -C "$root" -c . | "$ENGINE" import --quiet --change 'CMD ["/bin/bash"]' - "$IMAGE" >/dev/null
echo "base image $IMAGE: imported ($("$ENGINE" image inspect --format '{{.Size}}' "$IMAGE") bytes)"
