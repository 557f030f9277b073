#!/usr/bin/env bash
# Build a minimal Debian base image from Debian's archive alone (no container registry needed):
# debootstrap a minbase root filesystem and import it into podman (or docker) as a local image.
#
#   docker/bootstrap-debian.sh [IMAGE] [SUITE] [MIRROR]
#   defaults:  localhost/debian-bootstrap:bookworm  bookworm  http://deb.debian.org/debian
#
# Used where no registry is reachable (CI sandboxes, air-gapped build hosts) to build the images
# FROM a base we made ourselves:  make images BASE_IMAGE=localhost/debian-bootstrap:bookworm TORCH_SPEC=torch==2.13.0
# Needs root (or `podman unshare`), debootstrap and podman/docker. Skips the work when IMAGE exists.
set -euo pipefail

IMAGE=${1:-localhost/debian-bootstrap:bookworm}
SUITE=${2:-bookworm}
MIRROR=${3:-http://deb.debian.org/debian}
ENGINE=${CONTAINER_ENGINE:-$(command -v podman || command -v docker || true)}

die() { echo "bootstrap-debian: $*" >&2; exit 1; }
[ -n "$ENGINE" ] || die "neither podman nor docker found (apt-get install podman)"
command -v debootstrap >/dev/null || die "debootstrap not found (apt-get install debootstrap)"
[ "$(id -u)" = 0 ] || die "debootstrap needs root; run under sudo or 'podman unshare'"

if "$ENGINE" image exists "$IMAGE" 2>/dev/null || "$ENGINE" image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "bootstrap-debian: $IMAGE already exists"
  exit 0
fi

ROOTFS=$(mktemp -d "${TMPDIR:-/tmp}/debian-rootfs.XXXXXX")
trap 'rm -rf "$ROOTFS"' EXIT
echo "bootstrap-debian: debootstrap --variant=minbase $SUITE from $MIRROR (a few minutes)"
debootstrap --variant=minbase --include=ca-certificates "$SUITE" "$ROOTFS" "$MIRROR" >"$ROOTFS.log" 2>&1 \
  || { tail -n 20 "$ROOTFS.log" >&2; die "debootstrap failed (full log: $ROOTFS.log)"; }
rm -f "$ROOTFS.log"
# an image, not a machine: no package lists, caches or machine identity
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/cache/apt/archives/*.deb \
       "$ROOTFS"/var/log/*.log "$ROOTFS"/etc/machine-id
tar -C "$ROOTFS" --numeric-owner -c . | "$ENGINE" import \
  --change 'CMD ["/bin/bash"]' --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --message "debootstrap --variant=minbase $SUITE $MIRROR" - "$IMAGE" >/dev/null
echo "bootstrap-debian: imported $IMAGE"
