#!/usr/bin/env bash
# Usage: ensure_debian_package.sh BINARY PACKAGE...
# Make sure BINARY is on PATH, installing the Debian PACKAGEs with apt-get when it is missing (the tests'
# Prometheus and Chromium: a few seconds to a minute on a Debian 12 box whose package lists are fresh).
#
# Exit status: 0 and the binary's path on stdout when it is available;
#              3 when it cannot be installed here (no apt-get, or not root) - callers skip;
#              anything else: the install was attempted and failed - callers fail.
set -euo pipefail

binary="$1"
shift

if command -v "$binary" >/dev/null 2>&1; then
    command -v "$binary"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "$binary is not installed and apt-get is not available to install it" >&2
    exit 3
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "$binary is not installed and installing it with apt-get needs root" >&2
    exit 3
fi

export DEBIAN_FRONTEND=noninteractive
# One install at a time among the suite's workers (apt holds its lock and a second apt-get would fail at once);
# a worker that waited finds the binary another one installed.
exec 9>/tmp/amulet-tests-apt.lock
flock 9
if command -v "$binary" >/dev/null 2>&1; then
    command -v "$binary"
    exit 0
fi
# Refresh the package lists only when they are missing or the first install attempt fails.
if ! ls /var/lib/apt/lists/*_Packages >/dev/null 2>&1; then
    apt-get update -qq >&2
fi
install=(apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=300 "$@")
if ! "${install[@]}" >&2; then
    apt-get update -qq >&2
    "${install[@]}" >&2
fi
# A package's post-install may try to start a system service; tests run their own instance and never
# rely on it (in containers policy-rc.d normally forbids the start anyway).

command -v "$binary"
