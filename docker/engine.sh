#!/usr/bin/env bash
# A Docker engine for the image tests (`make engine`), best effort.
#
#   docker/engine.sh
#
# 1. An engine that answers at DOCKER_HOST, the default socket or our private socket is used.
# 2. Otherwise, as root with apt-get: install Debian's docker.io (and debootstrap,
#    docker-registry), then start dockerd on a private socket and data root under
#    IMGCLF_ENGINE_DIR (default /var/lib/imgclf-docker) with no bridge, no iptables rules and
#    no IP forwarding: containers run with `--network none` or `--network host` only.
# 3. The base image debian:bookworm-slim is made from Debian's archive with debootstrap when
#    the engine cannot pull it (no registry reachable); it is kept between runs.
# Prints `DOCKER_HOST=...` for the engine in use, or one line saying why there is none (exit 1).
set -euo pipefail

ENGINE_DIR="${IMGCLF_ENGINE_DIR:-/var/lib/imgclf-docker}"
SOCKET="${ENGINE_DIR}/docker.sock"
PRIVATE_HOST="unix://${SOCKET}"
BASE_IMAGE="${IMGCLF_BASE_IMAGE:-debian:bookworm-slim}"
SUITE="bookworm"

say() { echo "engine: $*" >&2; }

answers() { # the engine at $1 (empty: the docker CLI's default) answers
    if [[ -n "$1" ]]; then
        DOCKER_HOST="$1" timeout 20 docker info >/dev/null 2>&1
    else
        (unset DOCKER_HOST && timeout 20 docker info >/dev/null 2>&1)
    fi
}

apt_install() { # install Debian packages: from the lists apt has, else after an update
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" \
        >/dev/null 2>&1 || {
        apt-get update -qq >/dev/null 2>&1 &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" \
                >/dev/null 2>&1
    }
}

find_engine() {
    if [[ -n "${DOCKER_HOST:-}" ]] && answers "$DOCKER_HOST"; then
        HOST="$DOCKER_HOST"
    elif answers ""; then
        HOST=""
    elif answers "$PRIVATE_HOST"; then
        HOST="$PRIVATE_HOST"
    else
        return 1
    fi
}

start_engine() {
    if [[ "$(id -u)" != 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
        say "no Docker engine answers and this machine cannot start one (needs root and apt-get)"
        return 1
    fi
    local missing=()
    command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
    command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
    command -v docker-registry >/dev/null 2>&1 || missing+=(docker-registry)
    if [[ ${#missing[@]} -gt 0 ]]; then
        say "installing ${missing[*]} (apt-get)"
        apt_install "${missing[@]}" || {
            say "apt-get install ${missing[*]} failed"
            return 1
        }
    fi
    mkdir -p "$ENGINE_DIR/data" "$ENGINE_DIR/exec"
    if [[ -f "$ENGINE_DIR/dockerd.pid" ]] && kill -0 "$(cat "$ENGINE_DIR/dockerd.pid")" 2>/dev/null; then
        say "dockerd $(cat "$ENGINE_DIR/dockerd.pid") is running but does not answer on $SOCKET"
        return 1
    fi
    rm -f "$SOCKET" "$ENGINE_DIR/dockerd.pid"
    say "starting dockerd on $SOCKET (data root $ENGINE_DIR/data, log $ENGINE_DIR/dockerd.log)"
    # No bridge, no iptables rules, no forwarding: containers get loopback or the host's network.
    nohup setsid dockerd \
        --iptables=false --ip-forward=false --ip-masq=false --bridge=none \
        --data-root "$ENGINE_DIR/data" --exec-root "$ENGINE_DIR/exec" \
        --pidfile "$ENGINE_DIR/dockerd.pid" -H "$PRIVATE_HOST" \
        >>"$ENGINE_DIR/dockerd.log" 2>&1 </dev/null &
    local deadline=$((SECONDS + 60))
    until answers "$PRIVATE_HOST"; do
        if ((SECONDS > deadline)); then
            say "dockerd did not answer within 60 s; see $ENGINE_DIR/dockerd.log"
            return 1
        fi
        sleep 1
    done
    HOST="$PRIVATE_HOST"
}

apt_mirror() { # the Debian mirror apt uses here, as `apt-cache policy` shows it
    local mirror
    mirror="$(apt-cache policy 2>/dev/null |
        sed -n "s|^ *[0-9]* \(https\{0,1\}://[^ ]*\) ${SUITE}/main .*|\1|p" | head -1)"
    echo "${mirror:-http://deb.debian.org/debian}"
}

ensure_base() { # debian:bookworm-slim: pulled when a registry answers, else made by debootstrap
    export DOCKER_HOST="$1"
    [[ -n "$DOCKER_HOST" ]] || unset DOCKER_HOST
    docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 && return 0
    timeout 60 docker pull -q "$BASE_IMAGE" >/dev/null 2>&1 && return 0
    command -v debootstrap >/dev/null 2>&1 || {
        say "cannot pull $BASE_IMAGE and debootstrap is not installed (apt-get install debootstrap)"
        return 1
    }
    local root mirror
    mirror="$(apt_mirror)"
    root="$(mktemp -d "${TMPDIR:-/tmp}/imgclf-base.XXXXXX")"
    say "making $BASE_IMAGE with debootstrap --variant=minbase $SUITE from $mirror"
    if ! debootstrap --variant=minbase "$SUITE" "$root" "$mirror" >"$root.log" 2>&1; then
        say "debootstrap failed; see $root.log"
        rm -rf "$root"
        return 1
    fi
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/var/log/*
    tar -C "$root" -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["bash"]' - "$BASE_IMAGE" >/dev/null
    rm -rf "$root" "$root.log"
}

HOST=""
if ! { command -v docker >/dev/null 2>&1 && find_engine; }; then
    start_engine || exit 1
fi
ensure_base "$HOST" || exit 1
echo "DOCKER_HOST=${HOST}"
