#!/usr/bin/env bash
# The same benchmark on two checkouts of jobserver, alternating, in one run: the VM's speed
# drifts by ±20 % within minutes, so a before/after comparison is only fair when the two
# sides take turns under the same conditions.
#
#   bench/before_after.sh OLD_CHECKOUT NEW_CHECKOUT ROUNDS MODULE [ARGS...]
#   bench/before_after.sh /work/wt/before . 2 bench.http_throughput --only js-post,js-get --repeats 1
#
# Each checkout runs `python -m MODULE ARGS` with its own .venv (pip install -e '.[bench]'
# there first); every round runs OLD then NEW, and the JSON of each trial goes to
# bench-results/<module>-<side>-<round>.json under the NEW checkout.
set -euo pipefail
old=$(cd "$1" && pwd); new=$(cd "$2" && pwd); rounds=$3; module=$4; shift 4
out="$new/bench-results"; mkdir -p "$out"
for round in $(seq 1 "$rounds"); do
  for side in old new; do
    dir=$([ "$side" = old ] && echo "$old" || echo "$new")
    echo "== round $round: $side ($dir at $(git -C "$dir" rev-parse --short HEAD))"
    (cd "$dir" && .venv/bin/python -m "$module" "$@" --json-out "$out/$module-$side-$round.json")
  done
done
