#!/bin/sh
# Checks the system tools kefu needs and installs the Debian packages that are missing.
# Idempotent: does nothing when everything is present.
set -eu

missing=""
command -v java >/dev/null 2>&1 || missing="$missing default-jre-headless"
command -v mvn >/dev/null 2>&1 || missing="$missing maven"
command -v redis-server >/dev/null 2>&1 || missing="$missing redis-server"
command -v docker-compose >/dev/null 2>&1 || missing="$missing docker-compose"
# Headless browser for the dashboard test (Playwright drives it; no browser download).
command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
# Chinese glyphs for the pages' zh screenshots (without them: empty boxes).
[ -d /usr/share/fonts/opentype/noto ] && ls /usr/share/fonts/opentype/noto/NotoSansCJK* >/dev/null 2>&1 \
    || missing="$missing fonts-noto-cjk"
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing="$missing python3-venv"
# The moderation extension (streams/_native) is compiled by `pip install -e .`.
command -v gcc >/dev/null 2>&1 || missing="$missing gcc"
python3 -c 'import os, sysconfig; assert os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h"))' \
    >/dev/null 2>&1 || missing="$missing python3-dev"

[ -z "$missing" ] && exit 0

echo "kefu: installing missing system packages:$missing" >&2
if [ "$(id -u)" = 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
else
    echo "kefu: cannot install$missing: not root and no sudo. Install them and re-run." >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "kefu: no apt-get here; install these packages by hand:$missing" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q >/dev/null || true
# shellcheck disable=SC2086
if ! $SUDO apt-get install -y -q --no-install-recommends $missing >/dev/null; then
    echo "kefu: apt-get could not install:$missing" >&2
    exit 1
fi
# Debian starts redis-server as a system service on install; kefu runs its own.
if [ -n "${missing##*redis-server*}" ] || true; then
    command -v systemctl >/dev/null 2>&1 && $SUDO systemctl disable --now redis-server >/dev/null 2>&1 || true
fi
