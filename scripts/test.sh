#!/usr/bin/env bash
# `make test`: the Rust tests, then the demo page in headless Chromium (scripts/browser-test.sh), then the Open
# Inference Protocol with Triton's and KServe's Python clients and the deployment manifests' validation
# (scripts/oip-test.sh), then one line that counts
# what ran and what was skipped. A skip happens only when asked for (CAMSERVE_SKIP_BROWSER=1; an
# `#[ignore]`d Rust test), and is counted here, at the very end of the output.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p target
log=target/make-test.log
# The disk before and after the build, in the log: a full disk kills the linker (SIGBUS), which CI hit once.
echo "disk before the build: $(df -h . | awk 'NR == 2 {print $4 " free of " $2}')" | tee "$log"
# No incremental-compilation caches: a clean clone builds once, and they only take disk.
CARGO_INCREMENTAL=0 cargo test --locked 2>&1 | tee -a "$log"
echo "disk after the Rust tests: $(df -h . | awk 'NR == 2 {print $4 " free of " $2}'); target/ holds $(du -sh target | cut -f1)" | tee -a "$log"
scripts/browser-test.sh 2>&1 | tee -a "$log"
scripts/oip-test.sh 2>&1 | tee -a "$log"
sum() { grep -o "[0-9]* $1" "$log" | awk '{s += $1} END {print s + 0}'; }
passed=$(sum passed)
ignored=$(sum ignored)
browser_skipped=$(grep -c '^browser test SKIPPED' "$log" || true)
browser_ran=$(grep -c '^browser test passed' "$log" || true)
oip_checks=$(grep -o '^oip clients: [0-9]* checks passed' "$log" | grep -o '[0-9]*' || echo 0)
manifest_checks=$(grep -o '^manifests: [0-9]* checks passed' "$log" | grep -o '[0-9]*' || echo 0)
echo
echo "make test: $passed Rust tests passed, $ignored ignored; browser test $([ "$browser_ran" -gt 0 ] && echo ran || echo 'did not run');" \
  "OIP client checks passed: $oip_checks; manifest checks passed: $manifest_checks;" \
  "skipped: $(( ignored + browser_skipped ))"
