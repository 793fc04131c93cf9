#!/usr/bin/env bash
# What `make image` and the container tests (tests/deploy/test_image.py, test_stack.py) need
# on a Debian bookworm machine, installed with apt-get when missing. Root only: podman runs
# rootful here, so the rootless helpers (uidmap, slirp4netns, fuse-overlayfs) are not needed.
#
# One line per need: a command on PATH (or an absolute path) and the Debian package that
# provides it. Kept in this one place so the list can move into a shared `deps` mechanism.
set -euo pipefail

NEEDS='
podman                              podman
runc                                runc
conmon                              conmon
/usr/lib/podman/netavark            netavark
/usr/lib/podman/aardvark-dns        aardvark-dns
iptables                            iptables
podman-compose                      podman-compose
debootstrap                         debootstrap
gpgv                                gpgv
/usr/share/keyrings/debian-archive-keyring.gpg  debian-archive-keyring
'

missing=()
while read -r need package; do
    [ -n "$need" ] || continue
    case "$need" in
        /*) [ -e "$need" ] && continue ;;
        *) command -v "$need" >/dev/null 2>&1 && continue ;;
    esac
    missing+=("$package")
done <<<"$NEEDS"

if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "deploy/image/deps.sh: missing ${missing[*]}; run as root, or: apt-get install --no-install-recommends ${missing[*]}" >&2
    exit 1
fi
echo "deploy/image/deps.sh: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
