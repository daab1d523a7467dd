#!/usr/bin/env bash
# Builds the images of the compose stack without a container registry, with podman (or ENGINE=docker):
#
#   docker/build-images.sh [base] [prometheus] [server] [ray]     (no argument: base prometheus server)
#
#   base        localhost/amulet-debian:bookworm-python3-cc: Debian bookworm made with debootstrap, plus python3,
#               python3-venv, python-is-python3, ca-certificates, gcc and libc6-dev (the server compiles its CPU kernels
#               at start), imported as a local image (the stand-in for python:3.11-slim, where the Dockerfile
#               installs gcc). Made once; delete the image to make it again.
#   prometheus  localhost/amulet-prometheus:debian: Prometheus from Debian's package, on that base
#               (docker/Containerfile.prometheus; the stand-in for prom/prometheus).
#   server      localhost/amulet-serve:cpu: the project's Dockerfile with VARIANT=cpu on that base, the CPU torch
#               wheel served from build-local/simple (a PEP 503 index made here from $WHEELS), pip trusting
#               $CA_BUNDLE (for a proxy that re-signs TLS).
#   ray         localhost/amulet-serve-ray:cpu: docker/Dockerfile.ray on top of the server image.
#
# Environment: ENGINE (podman), WHEELS (/opt/wheels: a folder holding torch-$TORCH_VERSION+cpu-...whl),
# CA_BUNDLE (/etc/ssl/certs/ca-certificates.crt when present), DEBIAN_MIRROR (http://deb.debian.org/debian),
# PIP_INDEX_URL / PIP_EXTRA_INDEX_URL / PIP_TRUSTED_HOST (passed to the build when set, else taken from the host's
# pip configuration; file: URLs are left out),
# CONTAINERS_CONF (docker/podman/containers.conf unless set: runc, no default ulimits).
# Layers are cached by the engine: a second run rebuilds only what changed (the base and Prometheus are kept).
set -euo pipefail

cd "$(dirname "$0")/.."
ENGINE="${ENGINE:-podman}"
WHEELS="${WHEELS:-/opt/wheels}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
BASE_IMAGE="${BASE_IMAGE:-localhost/amulet-debian:bookworm-python3-cc}"
PROMETHEUS_IMAGE="${PROMETHEUS_IMAGE:-localhost/amulet-prometheus:debian}"
SERVER_IMAGE="${SERVER_IMAGE:-localhost/amulet-serve:cpu}"
RAY_IMAGE="${RAY_IMAGE:-localhost/amulet-serve-ray:cpu}"
if [ -z "${CA_BUNDLE+x}" ] && [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
fi
if [ "$ENGINE" = podman ]; then
    export CONTAINERS_CONF="${CONTAINERS_CONF:-$PWD/docker/podman/containers.conf}"
fi

log() { echo "[build-images $(date +%H:%M:%S)] $*" >&2; }
have_image() { "$ENGINE" image inspect "$1" >/dev/null 2>&1; }

build_base() {
    if have_image "$BASE_IMAGE"; then
        log "$BASE_IMAGE exists"
        return
    fi
    command -v debootstrap >/dev/null || { log "debootstrap is not installed (apt-get install debootstrap)"; exit 3; }
    local root
    root="$(mktemp -d /var/tmp/amulet-debootstrap.XXXXXX)"
    log "debootstrap bookworm into $root"
    debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates,gcc,libc6-dev \
        bookworm "$root" "$DEBIAN_MIRROR" >&2
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    log "importing $BASE_IMAGE"
    tar -C "$root" -c . | "$ENGINE" import --change 'CMD ["python"]' - "$BASE_IMAGE" >&2
    rm -rf "$root"
}

build_prometheus() {
    if have_image "$PROMETHEUS_IMAGE"; then
        log "$PROMETHEUS_IMAGE exists"
        return
    fi
    log "building $PROMETHEUS_IMAGE"
    "$ENGINE" build -f docker/Containerfile.prometheus --build-arg BASE="$BASE_IMAGE" -t "$PROMETHEUS_IMAGE" docker >&2
}

# build-local/: the torch wheel as a simple index, and the CA bundle (hard links where possible: no copy of 190 MB).
fill_build_local() {
    local wheel index=build-local/simple/torch
    wheel="$(find "$WHEELS" -maxdepth 1 -name "torch-${TORCH_VERSION}+cpu-cp311-*.whl" 2>/dev/null | head -n 1)"
    if [ -z "$wheel" ]; then
        log "no torch-${TORCH_VERSION}+cpu wheel in $WHEELS: the build takes it from PyTorch's CPU index"
        return 1
    fi
    mkdir -p "$index"
    ln -f "$wheel" "$index/" 2>/dev/null || cp -f "$wheel" "$index/"
    local name
    name="$(basename "$wheel")"
    printf '<!DOCTYPE html>\n<html><body><a href="%s">%s</a></body></html>\n' "${name//+/%2B}" "$name" > "$index/index.html"
    printf '<!DOCTYPE html>\n<html><body><a href="torch/">torch</a></body></html>\n' > build-local/simple/index.html
}

pip_build_args() {
    local args=()
    if [ -n "${CA_BUNDLE:-}" ]; then
        cp -f "$CA_BUNDLE" build-local/ca-certificates.crt
        args+=(--build-arg PIP_CERT=/build-local/ca-certificates.crt)
    fi
    # The host's pip settings: its environment first, else its pip configuration (file: URLs mean nothing inside).
    local var key value
    for var in PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_TRUSTED_HOST; do
        value="${!var:-}"
        if [ -z "$value" ]; then
            key="$(echo "${var#PIP_}" | tr '[:upper:]_' '[:lower:]-')"
            value="$(python3 -m pip config get "global.$key" 2>/dev/null || true)"
        fi
        if [ -n "$value" ] && [[ "$value" != *file:* ]]; then
            args+=(--build-arg "$var=$value")
        fi
    done
    args+=(--build-arg PIP_DEFAULT_TIMEOUT="${PIP_DEFAULT_TIMEOUT:-180}")
    printf '%s\n' "${args[@]}"
}

build_server() {
    local args=(--build-arg VARIANT=cpu --build-arg CPU_IMAGE="$BASE_IMAGE" --build-arg TORCH_VERSION="$TORCH_VERSION")
    if fill_build_local; then
        args+=(--build-arg TORCH_CPU_INDEX_URL=file:///build-local/simple)
    fi
    mapfile -t -O "${#args[@]}" args < <(pip_build_args)
    log "building $SERVER_IMAGE"
    "$ENGINE" build "${args[@]}" -t "$SERVER_IMAGE" . >&2
}

build_ray() {
    local args=(--build-arg BASE="$SERVER_IMAGE")
    mapfile -t -O "${#args[@]}" args < <(pip_build_args)
    log "building $RAY_IMAGE"
    "$ENGINE" build -f docker/Dockerfile.ray "${args[@]}" -t "$RAY_IMAGE" . >&2
}

targets=("$@")
[ "${#targets[@]}" -gt 0 ] || targets=(base prometheus server)
for target in "${targets[@]}"; do
    case "$target" in
        base) build_base ;;
        prometheus) build_base; build_prometheus ;;
        server) build_base; build_server ;;
        ray) build_ray ;;
        *) log "unknown target $target (base, prometheus, server, ray)"; exit 2 ;;
    esac
done
log "done: ${targets[*]}"
