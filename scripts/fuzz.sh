#!/usr/bin/env bash
# Builds and runs every fuzz target for SECONDS each (default 20); fails on the first crash.
# cargo-fuzz needs nightly flags; RUSTC_BOOTSTRAP lets the stable toolchain accept them. It must
# be set for every cargo run in fuzz/, or cargo caches a stable probe and the build breaks
# (then delete fuzz/target/.rustc_info.json).
set -euo pipefail
SECONDS_PER_TARGET=${1:-20}
cd "$(dirname "$0")/../fuzz"
export RUSTC_BOOTSTRAP=1
if ! command -v cargo-fuzz >/dev/null; then
  echo "installing cargo-fuzz (once)"
  cargo install cargo-fuzz --locked
fi
targets=$(cargo fuzz list)
cargo fuzz build
for t in $targets; do
  echo "== $t (${SECONDS_PER_TARGET}s)"
  # A scratch copy of the committed seeds, so inputs found in this run stay out of the tree.
  work=$(mktemp -d)
  cp "corpus/$t"/seed-* "$work"/ 2>/dev/null || true
  # The log lives in a scratch directory too: with CARGO_TARGET_DIR set, fuzz/target/ need
  # not exist.
  log="$work.log"
  status=0
  cargo fuzz run "$t" "$work" -- -max_total_time="$SECONDS_PER_TARGET" -print_final_stats=1 \
    >"$log" 2>&1 || status=$?
  rm -rf "$work"
  grep -E "^(Done [0-9]+ runs|stat::number_of_executed_units|stat::average_exec_per_sec)" "$log" || true
  if [ "$status" -eq 0 ]; then
    rm -f "$log"
  fi
  if [ "$status" -ne 0 ]; then
    tail -n 40 "$log" >&2
    echo "fuzz target $t failed (exit $status); full log: $log, inputs: fuzz/artifacts/$t" >&2
    exit "$status"
  fi
done
echo "all fuzz targets ran ${SECONDS_PER_TARGET}s each without a crash"
