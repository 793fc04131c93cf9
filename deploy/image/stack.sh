#!/usr/bin/env bash
# The try-it stack (deploy/compose.yml) with podman and Debian's podman-compose (1.0.3),
# on the images `make image` builds. tests/deploy/test_stack.py runs exactly this.
#
#   deploy/image/stack.sh up                  # keys, Redis, two elements, registry, ingester
#   deploy/image/stack.sh token --sub alice   # a token signed with the stack's private key
#   deploy/image/stack.sh down                # stop, remove containers and network
#   deploy/image/stack.sh down -v             # ... and the volumes (keys, stored files)
#
# podman-compose 1.0.3 starts every service at once in file order: it ignores
# `depends_on` conditions (so it would start the elements before keygen has written the
# key) and `profiles` (it would start Prometheus and Grafana). `up` therefore starts keygen
# and Redis first, waits for the key and for Redis, then starts the ingester with the rest
# of its dependencies, and waits until it is ready, as `docker compose up --wait` would.
#
#   STACK_PROJECT                      compose project name (default artstore-try)
#   ARTSTORE_INGESTER_IMAGE            default artstore-ingester:<pyproject version>
#   ARTSTORE_REDIS_IMAGE               default artstore-redis:bookworm (make image)
#   ARTSTORE_INGESTER_PUBLISHED_PORT   default 127.0.0.1:8020
#   STACK_WAIT_S                       how long each wait may take (default 120)
set -euo pipefail
# shellcheck source=deploy/image/env.sh
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$REPO_DIR/pyproject.toml")
export ARTSTORE_INGESTER_IMAGE=${ARTSTORE_INGESTER_IMAGE:-artstore-ingester:$version}
export ARTSTORE_REDIS_IMAGE=${ARTSTORE_REDIS_IMAGE:-artstore-redis:bookworm}
export ARTSTORE_INGESTER_PUBLISHED_PORT=${ARTSTORE_INGESTER_PUBLISHED_PORT:-127.0.0.1:8020}
project=${STACK_PROJECT:-artstore-try}
wait_s=${STACK_WAIT_S:-120}
compose=(podman-compose -p "$project" -f "$REPO_DIR/deploy/compose.yml")

container() { echo "${project}_$1_1"; }

# Until the container's healthcheck (as compose declares it) passes.
wait_healthy() {
    local name deadline
    name=$(container "$1")
    deadline=$((SECONDS + wait_s))
    until podman healthcheck run "$name" >/dev/null 2>&1; do
        if [ "$(podman inspect --format '{{.State.Running}}' "$name")" != true ]; then
            podman logs --tail 30 "$name" >&2 || true
            echo "stack: $1 stopped before it was healthy" >&2
            return 1
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            podman logs --tail 30 "$name" >&2 || true
            echo "stack: $1 not healthy after ${wait_s} s" >&2
            return 1
        fi
        sleep 1
    done
}

# Until a one-shot container has exited; it must have succeeded, within `attempts` runs.
wait_completed() {
    local name code attempt attempts=${2:-1}
    name=$(container "$1")
    for ((attempt = 1; ; attempt++)); do
        if ! code=$(timeout "$wait_s" podman wait "$name"); then
            echo "stack: $1 still running after ${wait_s} s" >&2
            return 1
        fi
        [ "$code" = 0 ] && return 0
        podman logs --tail 5 "$name" >&2 || true
        if [ "$attempt" -ge "$attempts" ]; then
            echo "stack: $1 exited with $code" >&2
            return 1
        fi
        echo "stack: $1 exited with $code, running it again" >&2
        podman start "$name" >/dev/null
    done
}

up() {
    "$IMAGE_DIR/deps.sh"
    for image in "$ARTSTORE_INGESTER_IMAGE" "$ARTSTORE_REDIS_IMAGE"; do
        podman image exists "$image" || {
            echo "stack: no image $image here: run make image first" >&2
            return 1
        }
    done
    "${compose[@]}" up -d --no-build keygen redis
    wait_completed keygen
    wait_healthy redis
    "${compose[@]}" up -d --no-build ingester
    # aardvark-dns 1.4 drops lookups while it reloads for a container joining the network
    # (the ingester, started right after): registry-init may then find no "redis". It is
    # idempotent; a second run sees a quiet network.
    wait_completed registry-init 3
    wait_healthy se-edit
    wait_healthy se-rw
    wait_healthy ingester
    echo "stack: ready on http://$ARTSTORE_INGESTER_PUBLISHED_PORT" >&2
}

token() {
    podman run --rm --network none --no-healthcheck \
        -v "${project}_jwt-private:/etc/ingester/keys:ro" \
        "$ARTSTORE_INGESTER_IMAGE" token --key /etc/ingester/keys/private.pem "$@"
}

down() {
    local volumes=() containers
    # podman-compose 1.0.3 leaves the anonymous volumes (the image's spool VOLUME in the
    # containers that do not mount one) and the network behind: found here, removed below.
    containers=$(podman ps -a -q --filter "label=io.podman.compose.project=$project")
    if [ -n "$containers" ]; then
        # shellcheck disable=SC2086
        mapfile -t volumes < <(podman inspect --format \
            '{{range .Mounts}}{{if eq .Type "volume"}}{{.Name}}{{"\n"}}{{end}}{{end}}' \
            $containers | grep -E '^[0-9a-f]{64}$' || true)
    fi
    # The ingester drains uploads in flight for up to INGESTER_SHUTDOWN_GRACE_S (30 s).
    "${compose[@]}" down -t 45 "$@"
    if [ ${#volumes[@]} -gt 0 ]; then
        podman volume rm "${volumes[@]}" >/dev/null
    fi
    if podman network exists "${project}_default"; then
        podman network rm "${project}_default" >/dev/null
    fi
}

case "${1:-}" in
    up) shift; up "$@" ;;
    token) shift; token "$@" ;;
    down) shift; down "$@" ;;
    *) echo "usage: $0 up | token [ingester token options] | down [-v]" >&2; exit 2 ;;
esac
