#!/usr/bin/env bash
# Make sure Debian's headless-capable `chromium` is installed, installing the `chromium` package with
# apt-get when it is missing (about 30 s on a Debian 12 box whose package lists are fresh). The browser
# tests drive it with Playwright (`executable_path`); Playwright's own browser downloads are never used.
#
# Exit status: 0 and the browser's path on stdout when Chromium is available;
#              3 when it cannot be installed here (no apt-get, or not root) - callers skip;
#              anything else: the install was attempted and failed - callers fail.
set -euo pipefail

if command -v chromium >/dev/null 2>&1; then
    command -v chromium
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "chromium is not installed and apt-get is not available to install it" >&2
    exit 3
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "chromium is not installed and installing it with apt-get needs root" >&2
    exit 3
fi

export DEBIAN_FRONTEND=noninteractive
if ! ls /var/lib/apt/lists/*_Packages >/dev/null 2>&1; then
    apt-get update -qq >&2
fi
if ! apt-get install -y -qq --no-install-recommends chromium fonts-liberation >&2; then
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends chromium fonts-liberation >&2
fi

command -v chromium
