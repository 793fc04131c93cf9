#!/usr/bin/env bash
# `make image`: the ingester image and the try-it stack's Redis image, built with podman on
# the locally debootstrapped base (base.sh), for machines with no Docker engine and no
# registry. Where Docker and a registry exist, `docker build -t artstore-ingester:0.1.0 .`
# builds the same Dockerfile on python:3.11-slim-bookworm.
#
#   IMAGE        the ingester image's name (default artstore-ingester:<pyproject version>)
#   REDIS_IMAGE  the Redis image's name (default artstore-redis:bookworm)
set -euo pipefail
# shellcheck source=deploy/image/env.sh
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"

# One build at a time on a machine (a test session and a person at `make image`): podman
# copes, but two debootstraps of the same base would only waste minutes.
exec 9>"${TMPDIR:-/var/tmp}/artstore-image.lock"
flock 9

"$IMAGE_DIR/deps.sh"

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$REPO_DIR/pyproject.toml")
IMAGE=${IMAGE:-artstore-ingester:$version}
REDIS_IMAGE=${REDIS_IMAGE:-artstore-redis:bookworm}

base=$("$IMAGE_DIR/base.sh" | tail -n 1)

# RUN steps reach PyPI and Debian's mirror. Where TLS is intercepted by a proxy whose CA the
# host trusts (added under /usr/local/share/ca-certificates, or named by PIP_CERT and
# friends), the container's stock CA roots fail; the host's bundle, bind-mounted over the
# container's for RUN steps only, works. It never becomes part of an image.
ca_bundle=
for candidate in "${PIP_CERT:-}" "${REQUESTS_CA_BUNDLE:-}" "${SSL_CERT_FILE:-}" \
        /etc/ssl/certs/ca-certificates.crt; do
    if [ -n "$candidate" ] && [ -f "$candidate" ]; then
        ca_bundle=$candidate
        break
    fi
done
build=(podman build --format docker --pull=never)
if [ -n "$ca_bundle" ]; then
    build+=(--volume "$(readlink -f "$ca_bundle"):/etc/ssl/certs/ca-certificates.crt:ro")
fi

image_id() { podman image inspect --format '{{.Id}}' "$1" 2>/dev/null || true; }
previous=("$(image_id "$IMAGE")" "$(image_id "$REDIS_IMAGE")")

# --format docker: the OCI format has no HEALTHCHECK, and podman would drop it.
started=$(date +%s)
"${build[@]}" --build-arg "PYTHON_IMAGE=$base" --tag "$IMAGE" "$REPO_DIR" >&2
"${build[@]}" --build-arg "BASE_IMAGE=$base" --tag "$REDIS_IMAGE" "$IMAGE_DIR/redis" >&2

# A rebuilt image leaves its predecessor untagged: remove it unless a container uses it
# (the builder stage's layers stay, they are the next build's cache).
for old in "${previous[@]}"; do
    if [ -n "$old" ] && [ "$old" != "$(image_id "$IMAGE")" ] \
            && [ "$old" != "$(image_id "$REDIS_IMAGE")" ]; then
        podman rmi "$old" >/dev/null 2>&1 || true
    fi
done
size=$(podman image inspect --format '{{.Size}}' "$IMAGE" | numfmt --to=si)
echo "image: $IMAGE (${size}B) and $REDIS_IMAGE on $base in $(($(date +%s) - started)) s" >&2
