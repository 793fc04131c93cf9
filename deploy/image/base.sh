#!/usr/bin/env bash
# The Dockerfile's PYTHON_IMAGE where no container registry is reachable: a minimal Debian
# bookworm made with debootstrap from Debian's own mirror, with Debian's Python 3.11 and pip,
# imported into podman. Prints the image's name as its last line.
#
# Cached by its recipe: the name carries a hash of this file (suite, package list, steps),
# so a run with an unchanged recipe reuses the image and an edited recipe makes a new one.
# Security updates land when the recipe changes or the image is removed:
#   podman rmi "$(deploy/image/base.sh | tail -n1)"
set -euo pipefail
# shellcheck source=deploy/image/env.sh
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"

SUITE=bookworm
# What python:3.11-slim-bookworm offers the Dockerfile: python/python3, pip, CA roots.
PACKAGES=python3,python3-pip,python-is-python3,ca-certificates
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
REPOSITORY=localhost/artstore-base

recipe=$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-12)
name="$REPOSITORY:$SUITE-$recipe"
if podman image exists "$name"; then
    echo "$name"
    exit 0
fi

work=$(mktemp -d "${TMPDIR:-/var/tmp}/artstore-base.XXXXXX")
rootfs="$work/rootfs"
log="$work/log"
cleanup() {
    status=$?
    if [ "$status" -ne 0 ] && [ -s "$log" ]; then
        tail -n 30 "$log" >&2
        echo "base: failed (the last 30 lines of its log above)" >&2
    fi
    # debootstrap or apt may leave /proc or /sys mounted inside after a failure.
    { grep -o " $rootfs/[^ ]*" /proc/mounts || true; } | sort -r | while read -r mount; do
        umount -l "$mount" || true
    done
    rm -rf --one-file-system "$work"
    exit "$status"
}
trap cleanup EXIT

started=$(date +%s)
echo "base: debootstrap $SUITE ($PACKAGES) from $MIRROR" >&2
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$MIRROR" >>"$log" 2>&1

# Point-release and security updates, as the official images carry them.
cat >"$rootfs/etc/apt/sources.list" <<SOURCES
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $SECURITY_MIRROR $SUITE-security main
SOURCES
chroot "$rootfs" apt-get update -qq >>"$log" 2>&1
chroot "$rootfs" env DEBIAN_FRONTEND=noninteractive apt-get -y -qq upgrade >>"$log" 2>&1

# Keep later apt-get installs (the Dockerfile's builder stage, the Redis image) as lean as
# the base: no package caches, compressed lists, no translations, no docs or man pages.
cat >"$rootfs/etc/apt/apt.conf.d/90lean" <<'APT'
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb || true"; };
Acquire::GzipIndexes "true";
Acquire::CompressionTypes::Order:: "gz";
Acquire::Languages "none";
APT
cat >"$rootfs/etc/dpkg/dpkg.cfg.d/excludes" <<'EXCLUDES'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
EXCLUDES
# The Dockerfile installs its wheels with pip into /usr/local, as on python:*-slim; Debian's
# PEP 668 marker would refuse that. Nothing in the image uses Debian's Python packages.
rm -f "$rootfs"/usr/lib/python3.*/EXTERNALLY-MANAGED
chroot "$rootfs" apt-get clean >>"$log" 2>&1
find "$rootfs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
find "$rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete
rm -rf "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/* \
       "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/*.log "$rootfs"/var/log/apt/* \
       "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/debconf/*-old \
       "$rootfs"/var/cache/ldconfig/aux-cache
# The build host's resolver and name are not the container's: podman provides both.
: >"$rootfs/etc/resolv.conf"
: >"$rootfs/etc/hostname"

tar -C "$rootfs" --numeric-owner -c . | podman import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    --change "LABEL org.opencontainers.image.description=Debian $SUITE minbase, Debian's Python 3" \
    --change "LABEL artstore.base.recipe=$recipe" \
    --message "debootstrap --variant=minbase --include=$PACKAGES $SUITE" \
    - "$name" >/dev/null

# Whatever was built on an earlier recipe's base carries its label (labels are inherited):
# the old base, images and build cache, of no use to the next build. Children go before
# their parents, so a few passes; an image a container still uses stays.
for _ in 1 2 3; do
    stale=$(podman images -a --format '{{.ID}} {{index .Labels "artstore.base.recipe"}}' |
        awk -v recipe="$recipe" '$2 != "" && $2 != recipe { print $1 }' | sort -u)
    [ -n "$stale" ] || break
    # shellcheck disable=SC2086
    podman rmi $stale >/dev/null 2>&1 || true
done
echo "base: $name in $(($(date +%s) - started)) s, $(podman image inspect --format '{{.Size}}' "$name" | numfmt --to=si)B" >&2
echo "$name"
