#!/usr/bin/env bash
# The sidecar against nginx, HAProxy and a naive aiohttp proxy, in one run.
#
#   benchmarks/run.sh              # full run: 3 rounds, 6 s per wrk run (about 8 minutes)
#   benchmarks/run.sh --quick      # 2 rounds, 3 s per wrk run (about 4 minutes)
#   benchmarks/run.sh profile      # py-spy on the sidecar under 16-connection load
#   benchmarks/run.sh --help       # every option (bench.py run --help)
#
# Needs: nginx (+ echo module), haproxy, wrk, curl, taskset (benchmarks/setup.sh installs
# them) and the project's .venv (aiohttp, uvloop, the sidecar). The harness runs on CPU 1 with
# the load generator and the upstream; each proxy under test gets CPU 0 to itself.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${BENCH_PYTHON:-$HERE/../.venv/bin/python}
for tool in nginx haproxy wrk curl taskset; do
    command -v "$tool" >/dev/null || { echo "missing $tool: run $HERE/setup.sh" >&2; exit 2; }
done
[ -e /usr/lib/nginx/modules/ngx_http_echo_module.so ] \
    || { echo "missing nginx echo module: run $HERE/setup.sh" >&2; exit 2; }
[ -x "$PY" ] || { echo "no python at $PY (make the project's .venv, or set BENCH_PYTHON)" >&2; exit 2; }
if [ "$(nproc)" -lt 2 ]; then echo "needs 2 CPUs (proxy on 0, load on 1)" >&2; exit 2; fi
cmd=run
case "${1:-}" in run|profile) cmd=$1; shift ;; esac
exec taskset -c 1 "$PY" "$HERE/bench.py" "$cmd" --python "$PY" "$@"
