#!/usr/bin/env bash
# Soak: DURATION seconds (default 1800) of mixed traffic against one camserve serving ResNet-50 (torchvision's
# topology, random weights, built by scripts/make_resnet50.py without PyTorch) and the demo model. The load
# generator and its goals are in scripts/soak_load.py: every method, all three request forms, 12 % bad requests,
# 8 % client disconnects mid-request; no 5xx, every request answered, RSS growth under 5 % after warm-up, a stable
# p99 per model. Also fails when the server's log shows a panic or the server is not ready at the end.
# Builds the release binary it tests; makes a venv in target/ops-venv with onnx and numpy (pip, by name).
# Usage: scripts/soak-test.sh [DURATION] [CLIENTS]; SOAK_OUT sets the JSON's path (default /tmp/soak.json). The
# one-pass goal (issue 29) takes two runs: a baseline with only the one-pass methods, then the mixed run against it:
#   SOAK_METHODS=one-pass SOAK_OUT=/tmp/soak-one-pass.json scripts/soak-test.sh 600
#   SOAK_ONE_PASS_BASELINE=/tmp/soak-one-pass.json scripts/soak-test.sh 1800
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-1800}
clients=${2:-6}
port=18089
cargo build --release --bin camserve
venv=target/ops-venv
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import onnx, numpy' 2> /dev/null; then
  python3 -m venv "$venv" && "$venv/bin/pip" install --quiet onnx numpy ||
    { echo "soak-test: cannot make $venv; run: python3 -m venv $venv && $venv/bin/pip install onnx numpy" >&2; exit 1; }
fi
[ -f target/resnet50.onnx ] || "$venv/bin/python" scripts/make_resnet50.py target/resnet50.onnx
target/release/camserve serve --model resnet50=target/resnet50.onnx --model demo=models/demo.onnx \
  --bind "127.0.0.1:$port" > /tmp/camserve-soak.log 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do curl -sf "http://127.0.0.1:$port/readyz" > /dev/null && break; sleep 0.2; done
curl -sf "http://127.0.0.1:$port/readyz" > /dev/null || { echo "soak-test: the server did not become ready" >&2; exit 1; }
echo "soak: ${duration}s, $clients clients, models resnet50 + demo, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores," \
  "commit $(git rev-parse --short HEAD), methods: ${SOAK_METHODS:-all}"
fails=0
python3 scripts/soak_load.py "http://127.0.0.1:$port" "$pid" "$duration" "$clients" "${SOAK_OUT:-/tmp/soak.json}" || fails=1
if grep -qi 'panick' /tmp/camserve-soak.log; then
  echo "FAIL: the server log shows a panic:"; grep -i -m3 'panick' /tmp/camserve-soak.log; fails=1
fi
if curl -sf "http://127.0.0.1:$port/readyz" > /dev/null; then echo "still ready after the soak"; else
  echo "FAIL: not ready after the soak"; fails=1; fi
if [ "$fails" -gt 0 ]; then echo "soak-test: FAILED"; exit 1; fi
echo "soak-test: all goals met"
