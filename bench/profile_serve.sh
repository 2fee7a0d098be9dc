#!/usr/bin/env bash
# Profile `jobserver serve` under wrk load with py-spy (raw collapsed stacks, all non-idle threads).
#   bench/profile_serve.sh [post_job|post_batch] [OUT] [--gil]
# Starts its own server on a free port with a fresh SQLite journal, runs wrk -t2 -c50 for 14 s,
# samples the server for 10 s in the middle, then stops the server (also on failure).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # so --tasks bench.bench_tasks imports
SCRIPT=${1:-post_job}; OUT=${2:-/tmp/jobserver-serve-profile.txt}; GIL=${3:-}
TMP=$(mktemp -d); PID=""
cleanup() {
    if [ -n "$PID" ]; then
        kill "$PID" 2>/dev/null || true
        for _ in $(seq 75); do kill -0 "$PID" 2>/dev/null || break; sleep 0.2; done
        kill -9 "$PID" 2>/dev/null || true
    fi
    rm -rf "$TMP"
}
trap cleanup EXIT
PORT=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
.venv/bin/jobserver serve --db "sqlite:///$TMP/jobs.db" --port "$PORT" --threads 8 --workers 8 \
    --max-queued none --tasks bench.bench_tasks >"$TMP/serve.log" 2>&1 &
PID=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null && break; sleep 0.2; done
cat "bench/lua/$SCRIPT.lua" bench/lua/report.lua >"$TMP/s.lua"
wrk -t2 -c50 -d14s -s "$TMP/s.lua" "http://127.0.0.1:$PORT/jobs" >"$TMP/wrk.out" &
WRK=$!
sleep 2
timeout 60 .venv/bin/py-spy record --pid "$PID" -d 10 -r 200 -f raw $GIL -o "$OUT" >/dev/null 2>&1 || true
wait "$WRK" || true
grep WRKJSON "$TMP/wrk.out" || cat "$TMP/wrk.out"
echo "profile: $OUT"
