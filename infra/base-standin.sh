#!/bin/sh
# A local stand-in for the Dockerfile's base image, python:3.11-slim, on a machine that reaches
# no container registry but does reach a Debian mirror and PyPI (Debian 12 ships Python 3.11).
# Run as root with buildah and debootstrap installed:
#   sh infra/base-standin.sh [TAG]        (TAG: docker.io/library/python:3.11-slim)
# It does nothing when TAG is already in the local image store, and pulls the real image where a
# registry answers; only then does it build the stand-in.
set -eu

TAG=${1:-docker.io/library/python:3.11-slim}
export BUILDAH_ISOLATION="${BUILDAH_ISOLATION:-chroot}"

if buildah inspect --type image "$TAG" >/dev/null 2>&1; then
    echo "base-standin: $TAG already present"
    exit 0
fi
if buildah pull --quiet "$TAG" >/dev/null 2>&1; then
    echo "base-standin: pulled $TAG"
    exit 0
fi
echo "base-standin: $TAG cannot be pulled; building a stand-in with debootstrap"
for tool in buildah debootstrap; do
    command -v "$tool" >/dev/null || { echo "base-standin: $tool is not installed" >&2; exit 2; }
done
[ "$(id -u)" = 0 ] || { echo "base-standin: debootstrap needs root" >&2; exit 2; }

# The Debian mirror apt is configured with (deb822 sources first, then the one-line format).
MIRROR=${DEBIAN_MIRROR:-$(
    { sed -n 's/^URIs: *\([^ ]*\).*/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null
      sed -n 's/^deb  *\(\[[^]]*\] *\)\{0,1\}\([^ ]*\) .*/\2/p' /etc/apt/sources.list 2>/dev/null
    } | grep -v security | head -n 1
)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}

ROOTFS=$(mktemp -d)
trap 'rm -rf "$ROOTFS"' EXIT
echo "base-standin: debootstrap bookworm from $MIRROR"
debootstrap --variant=minbase \
    --include=python3,python3-venv,python3-pip,ca-certificates,passwd \
    bookworm "$ROOTFS" "$MIRROR" >"$ROOTFS.log" 2>&1 || {
    tail -n 20 "$ROOTFS.log" >&2
    exit 1
}
rm -f "$ROOTFS.log"

# What python:3.11-slim offers that Debian's python3 does not: pip may install system-wide,
# and `python` is on PATH under /usr/local/bin.
rm -f "$ROOTFS"/usr/lib/python3.11/EXTERNALLY-MANAGED
ln -sf /usr/bin/python3 "$ROOTFS"/usr/local/bin/python
# Registries may be reached through a proxy whose certificate authority only this host's bundle has.
cp /etc/ssl/certs/ca-certificates.crt "$ROOTFS"/etc/ssl/certs/ca-certificates.crt
printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$ROOTFS"/etc/pip.conf
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*

ctr=$(buildah from scratch)
cp -a "$ROOTFS"/. "$(buildah mount "$ctr")"/
buildah umount "$ctr" >/dev/null
buildah config --env PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 --cmd python3 "$ctr"
buildah commit --rm "$ctr" "$TAG" >/dev/null
echo "base-standin: committed $TAG"
