#!/usr/bin/env bash
# HTTP end to end under load: throughput, p50 and p99 per (methods, concurrency), with oha (crates.io).
#
#   cargo install oha            # once
#   cargo build --release
#   bench/http.sh MODEL.onnx [IMAGE.jpg] [DURATION_S]
#
# Starts camserve on 127.0.0.1:18080 with the model, drives it with oha at 1, 8 and 32 concurrent clients for
# `methods=gradcam` and `methods=gradcam,guided_gradcam` (outputs heatmap,overlay), and prints a Markdown table.
# Extra camserve flags can be given in CAMSERVE_FLAGS (e.g. "--device cuda").
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:?model path}
image=${2:-assets/photos/chelsea.jpg}
duration=${3:-20}
port=18080
exe=${CAMSERVE_EXE:-target/release/camserve}
OHA=${OHA:-oha}
"$exe" serve --model "bench=$model" --bind "127.0.0.1:$port" ${CAMSERVE_FLAGS:-} > /tmp/camserve-bench-http.log 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do
  curl -sf "http://127.0.0.1:$port/readyz" > /dev/null && break
  sleep 0.2
done
curl -sf "http://127.0.0.1:$port/readyz" > /dev/null || { cat /tmp/camserve-bench-http.log; exit 1; }
device=$(curl -s "http://127.0.0.1:$port/v1/models/bench" | python3 -c 'import json,sys; print(json.load(sys.stdin)["device"])')
echo "model $model on $device, image $image, ${duration}s per cell, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores"
echo
echo "| methods | clients | requests/s | p50 ms | p99 ms | errors |"
echo "|---|---|---|---|---|---|"
for methods in gradcam gradcam,guided_gradcam; do
  url="http://127.0.0.1:$port/v1/models/bench/explain?methods=$methods"
  for c in 1 8 32; do
    "$OHA" -z 3s -c "$c" -m POST -H 'content-type: image/jpeg' -D "$image" --no-tui "$url" > /dev/null 2>&1 || true
    "$OHA" -z "${duration}s" -c "$c" -m POST -H 'content-type: image/jpeg' -D "$image" --no-tui --output-format json "$url" > /tmp/oha.json 2>/dev/null
    python3 bench/oha_row.py /tmp/oha.json "\`$methods\`" "$c"
  done
done
