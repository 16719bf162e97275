#!/usr/bin/env bash
# The main job: a short vnb-bench campaign. Stock QEMU boots the test guest over our backend in a
# private network namespace, once per configuration: batching off, adaptive:500 and
# adaptive:1000, on iperf-tx, iperf-rx, http and rr, 5 s each, one repetition. Prints the table
# and where the report is. Longer campaigns: target/release/vnb-bench run --help.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
bench=$repo/target/release/vnb-bench
[ -x "$bench" ] || { echo "demo: $bench missing; run 'make build'" >&2; exit 1; }
out=${DEMO_OUT:-$repo/target/demo-report}
exec "$bench" run --modes off,adaptive:500,adaptive:1000 --workloads iperf-tx,iperf-rx,http,rr \
  --reps 1 --duration 5 --out "$out"
