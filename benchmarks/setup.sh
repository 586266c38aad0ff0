#!/usr/bin/env bash
# Install the benchmark's tools (Debian, as root) and py-spy into the project's .venv.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
if ! command -v nginx >/dev/null || ! command -v haproxy >/dev/null || ! command -v wrk >/dev/null \
   || [ ! -e /usr/lib/nginx/modules/ngx_http_echo_module.so ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        nginx-light libnginx-mod-http-echo haproxy wrk curl util-linux
fi
VENV=${BENCH_VENV:-$HERE/../.venv}
"$VENV/bin/python" -c 'import aiohttp, uvloop' \
    || { echo "the project's venv needs aiohttp and uvloop: pip install -e . uvloop" >&2; exit 2; }
"$VENV/bin/pip" install -q py-spy
echo "setup ok"
