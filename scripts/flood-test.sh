#!/usr/bin/env bash
# Overload: floods camserve with twice as many concurrent clients as its queue holds, for DURATION seconds
# (default 60), samples the server's RSS every 5 s, and reports statuses (200 / 429) and the RSS range.
# Needs a release build and oha. Usage: scripts/flood-test.sh [DURATION] [MODEL.onnx]
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-60}
model=${2:-models/demo.onnx}
capacity=32
port=18087
CAMSERVE_BATCHING__QUEUE_CAPACITY=$capacity CAMSERVE_BATCHING__MAX_BATCH=8 \
  target/release/camserve serve --model "m=$model" --bind "127.0.0.1:$port" > /tmp/camserve-flood.log 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do curl -sf "http://127.0.0.1:$port/readyz" > /dev/null && break; sleep 0.2; done
rss() { awk '/VmRSS/ {print $2}' "/proc/$pid/status"; }
echo "queue capacity $capacity rows, $(( 2 * capacity )) clients, ${duration}s, model $model, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores"
echo "RSS before: $(( $(rss) / 1024 )) MiB"
samples=()
( while kill -0 $pid 2>/dev/null; do rss >> /tmp/flood-rss.txt; sleep 5; done ) &
sampler=$!
: > /tmp/flood-rss.txt
oha -z "${duration}s" -c $(( 2 * capacity )) -m POST -H 'content-type: image/jpeg' -D assets/photos/chelsea.jpg \
  --no-tui --output-format json "http://127.0.0.1:$port/v1/models/m/explain?methods=gradcam,guided_gradcam" > /tmp/flood.json 2>/dev/null
kill $sampler 2>/dev/null || true
python3 - <<'PY'
import json
d = json.load(open("/tmp/flood.json"))
codes = d.get("statusCodeDistribution", {})
errs = {k: v for k, v in d.get("errorDistribution", {}).items() if "deadline" not in k}
rss = [int(x) // 1024 for x in open("/tmp/flood-rss.txt").read().split()]
print(f"statuses: {codes}; client errors: {errs or 'none'}")
print(f"requests/s {d['summary']['requestsPerSec']:.0f}; p50 {d['latencyPercentiles']['p50'] * 1000:.1f} ms; p99 {d['latencyPercentiles']['p99'] * 1000:.1f} ms")
print(f"RSS during the flood (every 5 s, MiB): min {min(rss)}, max {max(rss)}, last {rss[-1]}; samples {rss}")
PY
curl -sf "http://127.0.0.1:$port/readyz" > /dev/null && echo "still ready after the flood"
echo "RSS after: $(( $(rss) / 1024 )) MiB"
