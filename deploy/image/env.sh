# Sourced by the scripts beside it: the podman configuration for this machine kind, and a
# check that its limits fit under the host's.
# shellcheck shell=bash

IMAGE_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$IMAGE_DIR/../.." && pwd)
export CONTAINERS_CONF="${CONTAINERS_CONF:-$IMAGE_DIR/containers.conf}"

check_limits() {
    local kind=$1 flag=$2 wanted hard
    wanted=$(sed -n "s/^ *\"$kind=[0-9]*:\([0-9]*\)\".*/\1/p" "$CONTAINERS_CONF")
    [ -n "$wanted" ] || return 0
    hard=$(ulimit -H "$flag")
    if [ "$hard" != unlimited ] && [ "$hard" -lt "$wanted" ]; then
        echo "$CONTAINERS_CONF asks for $kind=$wanted, above this shell's hard limit $hard" \
             "(ulimit -H$flag): lower it there" >&2
        return 1
    fi
}
check_limits nofile -n
check_limits nproc -u
