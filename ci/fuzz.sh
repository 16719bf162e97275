#!/usr/bin/env bash
# `make fuzz`: runs every cargo-fuzz target for FUZZ_RUNS inputs (default 1,000,000), one after
# the other, and prints per target the inputs run, exec/s, corpus size, time and whether it
# found a crash. vhost-net-batch's targets (datapath, shim) run with AddressSanitizer,
# control-msg's parse_frame (safe code only) without, as its bounded test does; cargo-fuzz's
# nightly flags are unlocked on the stable toolchain with RUSTC_BOOTSTRAP=1.
#
# The committed seeds (<crate>/fuzz/corpus/<target>/) are only read; new inputs go to
# target/fuzz-corpus/<target>/ (kept between runs, not committed), crash inputs to
# target/fuzz-artifacts/<target>/, the fuzzer's output to target/fuzz-logs/<target>.log.
# Reproduce a crash: cd <crate> && RUSTC_BOOTSTRAP=1 CARGO_TARGET_DIR=<target dir below>
#   cargo fuzz run <target> --sanitizer <...> <crash file>
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
runs=${FUZZ_RUNS:-1000000}
cargo fuzz --version >/dev/null 2>&1 || {
  echo "fuzz: cargo-fuzz is missing: cargo install cargo-fuzz --locked --version 0.13.2 (ci/setup.sh does)" >&2
  exit 1
}
export RUSTC_BOOTSTRAP=1

# crate directory, target, sanitizer, cargo target dir (under target/), libFuzzer -max_len
targets=(
  "vhost-net-batch datapath address fuzz-vnb 8192"
  "vhost-net-batch shim address fuzz-vnb 8192"
  "control-msg parse_frame none fuzz 4096"
)
mkdir -p "$repo/target/fuzz-logs"
rows=()
failed=0
for t in "${targets[@]}"; do
  read -r crate name san tdir maxlen <<<"$t"
  corpus=$repo/target/fuzz-corpus/$name
  artifacts=$repo/target/fuzz-artifacts/$name
  log=$repo/target/fuzz-logs/$name.log
  mkdir -p "$corpus" "$artifacts"
  echo "fuzz: building $name ($crate, sanitizer $san)" >&2
  if ! (cd "$repo/$crate" && CARGO_TARGET_DIR=$repo/target/$tdir \
    cargo fuzz build "$name" --sanitizer "$san") >"$log" 2>&1; then
    tail -30 "$log" >&2
    echo "fuzz: $name did not build (log: $log)" >&2
    exit 1
  fi
  echo "fuzz: running $name for $runs inputs (log: $log)" >&2
  start=$(date +%s)
  rc=0
  (cd "$repo/$crate" && CARGO_TARGET_DIR=$repo/target/$tdir \
    cargo fuzz run "$name" --sanitizer "$san" "$corpus" "fuzz/corpus/$name" -- \
    -runs="$runs" -max_len="$maxlen" -timeout=30 -rss_limit_mb=4096 -print_final_stats=1 \
    -artifact_prefix="$artifacts/") >>"$log" 2>&1 || rc=$?
  secs=$(($(date +%s) - start))
  stat() { sed -n "s/^stat::$1:[[:space:]]*//p" "$log" | tail -1; }
  executed=$(stat number_of_executed_units)
  execs=$(stat average_exec_per_sec)
  # The in-memory corpus at the end ("corp: units/bytes" on the DONE line), and the files
  # kept in the scratch corpus.
  corp=$(sed -n 's/^#[0-9]*[[:space:]]*DONE .*corp: \([^ ]*\).*/\1/p' "$log" | tail -1)
  files=$(find "$corpus" -type f | wc -l)
  if [ "$rc" -eq 0 ] && [ -n "$executed" ]; then
    result=ok
  else
    result="FAILED (exit $rc; crash inputs in $artifacts)"
    failed=1
    grep -E 'panicked at|ERROR: (AddressSanitizer|libFuzzer)|^assertion|SUMMARY' "$log" | head -5 >&2 || true
  fi
  rows+=("$(printf '%-12s %10s %8s %14s %12s %7ss  %s' "$name" "${executed:-?}" \
    "${execs:-?}" "${corp:-?}" "$files" "$secs" "$result")")
done
printf '%-12s %10s %8s %14s %12s %8s  %s\n' target inputs exec/s "corpus(n/b)" "scratch-files" time result
printf '%s\n' "${rows[@]}"
exit "$failed"
