#!/usr/bin/env bash
# Long fuzzing runs of tests/fuzz.rs: each target for MINUTES (default 10) minutes, in rounds of CASES cases
# with fresh random seeds, in release mode. Prints executions and findings per target; exits 1 when any target
# has a finding (its failing rounds' logs are kept as /tmp/fuzz-TARGET-failure-N.log) or the build fails.
# Usage: scripts/fuzz-long.sh [MINUTES] [TARGET...]
set -uo pipefail
cd "$(dirname "$0")/.."
minutes=${1:-10}; shift || true
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(image_decoding_never_panics query_options_never_panic json_options_never_panic request_bodies_never_panic model_bytes_never_panic model_rewrites_never_panic)
# Build once and run a copy of the test binary, so that editing the sources meanwhile does not rebuild it.
bin=$(cargo test --release --test fuzz --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys; print([j["executable"] for j in map(json.loads, sys.stdin) if j.get("executable") and "fuzz" in j["target"]["name"]][-1])') \
  || { echo "fuzz-long: building tests/fuzz.rs failed (cargo test --release --test fuzz --no-run)" >&2; exit 1; }
cp "$bin" /tmp/camserve-fuzz-bin || exit 1
total_fails=0
rm -f /tmp/fuzz-*-failure-*.log
export CARGO_MANIFEST_DIR=$PWD
echo "| target | minutes | executions | findings |"
echo "|---|---|---|---|"
for t in "${targets[@]}"; do
  cases=${CASES:-2000}
  [ "$t" = model_rewrites_never_panic ] || [ "$t" = model_bytes_never_panic ] && cases=$(( cases / 4 ))
  end=$(( $(date +%s) + minutes * 60 )); runs=0; fails=0
  while [ "$(date +%s)" -lt "$end" ]; do
    if ! FUZZ_CASES=$cases /tmp/camserve-fuzz-bin "$t" --exact > /tmp/fuzz-$t.log 2>&1; then
      fails=$(( fails + 1 )); cp /tmp/fuzz-$t.log /tmp/fuzz-$t-failure-$fails.log
    fi
    runs=$(( runs + 1 ))
  done
  # model targets run a quarter of the cases per round (see cases().div_ceil(4) in tests/fuzz.rs)
  per=$cases; [ "$t" = model_rewrites_never_panic ] || [ "$t" = model_bytes_never_panic ] && per=$(( (cases + 3) / 4 ))
  echo "| $t | $minutes | $(( runs * per )) | $fails |"
  total_fails=$(( total_fails + fails ))
done
if [ "$total_fails" -gt 0 ]; then
  echo "fuzz-long: $total_fails failing round(s); logs: $(ls /tmp/fuzz-*-failure-*.log 2>/dev/null | tr '\n' ' ')" >&2
  exit 1
fi
echo "fuzz-long: no findings"
