#!/usr/bin/env bash
# Installs everything the test suite needs (Debian packages and Python packages), then runs
# ruff, mypy and the whole pytest suite. Safe to run again: installs are idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    need=""
    for pkg in qemu-utils libnbd-bin python3-libnbd nbdkit nbdkit-plugin-python fio openssl; do
        dpkg -s "$pkg" >/dev/null 2>&1 || need="$need $pkg"
    done
    if [ -n "$need" ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need >/dev/null
    fi
fi

python3 -m pip install -q -e '.[test]'

python3 -m ruff check protocol nbdserve tests bench
python3 -m mypy
python3 -m pytest -q "$@"
