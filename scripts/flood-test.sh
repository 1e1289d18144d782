#!/usr/bin/env bash
# Overload: floods camserve with twice as many concurrent clients as its queue holds, for DURATION seconds
# (default 60), samples the server's RSS every 5 s, and checks its goals; exits 1 when one is missed:
#   - only 200 and 429 answers, and no client-side errors (connection resets, timeouts);
#   - some requests were refused (the flood really overloaded it) and a 429 carries Retry-After;
#   - RSS stays under RSS_LIMIT_MIB (default 512 MiB, the demo model's bound; ResNet-50 needs ~2500);
#   - the server is still ready afterwards.
# Builds the release binary it tests. Needs oha (installed with `cargo install oha --locked` when missing).
# Usage: [RSS_LIMIT_MIB=N] scripts/flood-test.sh [DURATION] [MODEL.onnx]
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-60}
model=${2:-models/demo.onnx}
rss_limit=${RSS_LIMIT_MIB:-512}
capacity=32
port=18087
cargo build --release --bin camserve
if ! command -v oha > /dev/null; then
  echo "oha is missing; installing it from crates.io (cargo install oha --locked)" >&2
  cargo install oha --locked || { echo "flood-test: cannot install oha; run: cargo install oha --locked" >&2; exit 1; }
fi
CAMSERVE_BATCHING__QUEUE_CAPACITY=$capacity CAMSERVE_BATCHING__MAX_BATCH=8 \
  target/release/camserve serve --model "m=$model" --bind "127.0.0.1:$port" > /tmp/camserve-flood.log 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do curl -sf "http://127.0.0.1:$port/readyz" > /dev/null && break; sleep 0.2; done
curl -sf "http://127.0.0.1:$port/readyz" > /dev/null || { echo "flood-test: the server did not become ready" >&2; exit 1; }
rss() { awk '/VmRSS/ {print $2}' "/proc/$pid/status"; }
url="http://127.0.0.1:$port/v1/models/m/explain?methods=gradcam,guided_gradcam"
echo "queue capacity $capacity rows, $(( 2 * capacity )) clients, ${duration}s, model $model, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores"
echo "RSS before: $(( $(rss) / 1024 )) MiB"
: > /tmp/flood-rss.txt
( while kill -0 $pid 2>/dev/null; do rss >> /tmp/flood-rss.txt; sleep 5; done ) &
sampler=$!
oha -z "${duration}s" -c $(( 2 * capacity )) -m POST -H 'content-type: image/jpeg' -D assets/photos/chelsea.jpg \
  --no-tui --output-format json "$url" > /tmp/flood.json 2>/dev/null &
flood=$!
# While the flood runs: one refused request's headers (oha does not report headers).
sleep $(( duration / 3 + 1 ))
: > /tmp/flood-429-headers.txt
for _ in $(seq 1 500); do
  code=$(curl -s -o /dev/null -D /tmp/flood-headers.txt -w '%{http_code}' -X POST -H 'content-type: image/jpeg' \
    --data-binary @assets/photos/chelsea.jpg "$url" || true)
  if [ "$code" = 429 ]; then cp /tmp/flood-headers.txt /tmp/flood-429-headers.txt; break; fi
done
wait $flood
kill $sampler 2>/dev/null || true
fails=0
fail() { echo "FAIL: $*"; fails=$(( fails + 1 )); }
python3 - "$rss_limit" <<'PY' || fails=$(( fails + 1 ))
import json, sys
limit = int(sys.argv[1])
d = json.load(open("/tmp/flood.json"))
codes = {str(k): v for k, v in d.get("statusCodeDistribution", {}).items()}
# oha cuts the requests still in flight at the end of -z; those are not the server's errors.
errs = {k: v for k, v in d.get("errorDistribution", {}).items() if "deadline" not in k and "aborted due to deadline" not in k}
rss = [int(x) // 1024 for x in open("/tmp/flood-rss.txt").read().split()]
print(f"statuses: {codes}; client errors: {errs or 'none'}")
print(f"requests/s {d['summary']['requestsPerSec']:.0f}; p50 {d['latencyPercentiles']['p50'] * 1000:.1f} ms; p99 {d['latencyPercentiles']['p99'] * 1000:.1f} ms")
print(f"RSS during the flood (every 5 s, MiB): min {min(rss)}, max {max(rss)}, last {rss[-1]}; samples {rss}")
bad = []
if set(codes) - {"200", "429"}:
    bad.append(f"statuses other than 200/429: {codes}")
if errs:
    bad.append(f"client errors: {errs}")
if codes.get("200", 0) == 0:
    bad.append("no request was answered 200")
if codes.get("429", 0) == 0:
    bad.append("no request was refused: the flood did not overload the queue")
if max(rss) > limit:
    bad.append(f"RSS peaked at {max(rss)} MiB, over the {limit} MiB bound")
for b in bad:
    print("FAIL:", b)
sys.exit(1 if bad else 0)
PY
if grep -qi '^retry-after:' /tmp/flood-429-headers.txt; then
  echo "a 429 during the flood carried $(grep -i '^retry-after:' /tmp/flood-429-headers.txt | tr -d '\r')"
else
  fail "no 429 with Retry-After seen during the flood (500 probes)"
fi
if curl -sf "http://127.0.0.1:$port/readyz" > /dev/null; then echo "still ready after the flood"; else fail "not ready after the flood"; fi
echo "RSS after: $(( $(rss) / 1024 )) MiB"
if [ "$fails" -gt 0 ]; then echo "flood-test: FAILED ($fails)"; exit 1; fi
echo "flood-test: all goals met"
