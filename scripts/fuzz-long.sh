#!/usr/bin/env bash
# Long fuzzing runs of tests/fuzz.rs: each target for MINUTES (default 10) minutes, in rounds of CASES cases
# with fresh random seeds, in release mode. Prints executions and findings per target.
# Usage: scripts/fuzz-long.sh [MINUTES] [TARGET...]
set -uo pipefail
cd "$(dirname "$0")/.."
minutes=${1:-10}; shift || true
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(image_decoding_never_panics query_options_never_panic json_options_never_panic request_bodies_never_panic model_bytes_never_panic model_rewrites_never_panic)
cargo test --release --test fuzz --no-run > /dev/null 2>&1
echo "| target | minutes | executions | findings |"
echo "|---|---|---|---|"
for t in "${targets[@]}"; do
  cases=${CASES:-2000}
  [ "$t" = model_rewrites_never_panic ] || [ "$t" = model_bytes_never_panic ] && cases=$(( cases / 4 ))
  end=$(( $(date +%s) + minutes * 60 )); runs=0; fails=0
  while [ "$(date +%s)" -lt "$end" ]; do
    if ! FUZZ_CASES=$cases cargo test --release --test fuzz "$t" -- --exact > /tmp/fuzz-$t.log 2>&1; then
      fails=$(( fails + 1 )); cp /tmp/fuzz-$t.log /tmp/fuzz-$t-failure-$fails.log
    fi
    runs=$(( runs + 1 ))
  done
  # model targets run a quarter of the cases per round (see cases().div_ceil(4) in tests/fuzz.rs)
  per=$cases; [ "$t" = model_rewrites_never_panic ] || [ "$t" = model_bytes_never_panic ] && per=$(( (cases + 3) / 4 ))
  echo "| $t | $minutes | $(( runs * per )) | $fails |"
done
