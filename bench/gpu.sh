#!/usr/bin/env bash
# The GPU check: run on the device machine after bench/gpu-prepare.sh's parts have been
# copied to /tmp/gpu (docs/BENCHMARKS.md, "(d)"), from the repository root, with release binaries of camserve,
# camserve-bench and oha in BIN (default .gpubin/). Writes results under $OUT (default /tmp/out).
#   1. exports torchvision ResNet-50 (random weights) with the machine's PyTorch;
#   2. camserve-bench with the CUDA execution provider at batch 1, 32, 128 (forward, Grad-CAM, Grad-CAM +
#      guided), with ONNX Runtime's node placement logged (which nodes, if any, fall back to the CPU);
#   3. camserve serve --device cuda under oha load: gradcam and gradcam,guided_gradcam at 32 and 128 clients.
# The libraries are the CUDA image's set (deploy/cuda/libs.py): ONNX Runtime's from the pinned onnxruntime-gpu
# wheel, the NVIDIA ones linked from the machine's installed wheels (it cannot download), with only the image's
# files on LD_LIBRARY_PATH; $OUT/stack.txt lists them and says where a version differs from the image's pins.
set -uo pipefail
BIN=${BIN:-.gpubin}
OUT=${OUT:-/tmp/out}
DEVICE=${DEVICE:-cuda}        # DEVICE=cpu, PY=..., SECONDS_PER_CELL=2 for a dry run without a GPU
PY=${PY:-python3}
SECS=${SECONDS_PER_CELL:-12}
UNPACK=${UNPACK:-/tmp/gpu/unpack.sh}
mkdir -p "$OUT"
export NO_COLOR=1
source "$UNPACK"
set +e  # unpack.sh turns errexit on; a failed step here must not end the run
if [ "$DEVICE" = cuda ]; then
  "$PY" deploy/cuda/libs.py --installed "$(dirname "$ORT_DYLIB_PATH")" /tmp/stack > "$OUT/stack.txt" 2>&1 \
    || { cat "$OUT/stack.txt"; echo "the CUDA image's library set is not complete here"; exit 1; }
  grep -E "^(same|DIFFERS)" "$OUT/stack.txt"
  export LD_LIBRARY_PATH=/tmp/stack/lib ORT_DYLIB_PATH=/tmp/stack/lib/$(basename "$ORT_DYLIB_PATH")
fi
nvidia-smi -L 2>&1 | tee "$OUT/gpu.txt"
"$PY" - <<'PY' 2>&1 | tail -2
import torch, torchvision
torch.manual_seed(0)
m = torchvision.models.resnet50(weights=None).eval()
torch.onnx.export(m, torch.randn(1, 3, 224, 224), "/tmp/r50.onnx", opset_version=17, dynamo=False,
                  input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
print("exported")
PY
RUST_LOG=ort=trace "$BIN/camserve-bench" --model /tmp/r50.onnx --device "$DEVICE" --batch 1,32,128 --iters 20 \
  --plans forward,gradcam,guided > "$OUT/engine.md" 2> "$OUT/engine.log"
echo "exit $?" >> "$OUT/engine.md"
grep -E "placed on|Number of nodes|^ +[A-Za-z]+ \(" "$OUT/engine.log" | sed 's/.*ort::logging[^:]*: //' | sort | uniq -c | sort -rn | head -60 > "$OUT/placement.txt"
grep -iE "error|fail" "$OUT/engine.log" | head -20 >> "$OUT/placement.txt"
cat "$OUT/engine.md"
export CAMSERVE_BATCHING__MAX_BATCH=128 CAMSERVE_BATCHING__QUEUE_CAPACITY=4096 CAMSERVE_BATCHING__MAX_WAIT_MS=4
"$BIN/camserve" serve --model r50=/tmp/r50.onnx --bind 127.0.0.1:18080 --device "$DEVICE" > "$OUT/serve.log" 2>&1 &
pid=$!
for _ in $(seq 1 300); do curl -sf http://127.0.0.1:18080/readyz > /dev/null && break; sleep 0.2; done
curl -s http://127.0.0.1:18080/v1/models/r50 | head -c 300 > "$OUT/model.json"
{
  echo "| methods | clients | requests/s | p50 ms | p99 ms | errors |"
  echo "|---|---|---|---|---|---|"
  for methods in gradcam gradcam,guided_gradcam; do
    for c in 32 128; do
      url="http://127.0.0.1:18080/v1/models/r50/explain?methods=$methods"
      "$BIN/oha" -z 3s -c "$c" -m POST -H 'content-type: image/jpeg' -D assets/photos/chelsea.jpg --no-tui "$url" > /dev/null 2>&1
      "$BIN/oha" -z "${SECS}s" -c "$c" -m POST -H 'content-type: image/jpeg' -D assets/photos/chelsea.jpg --no-tui --output-format json "$url" > /tmp/oha.json 2>/dev/null
      python3 bench/oha_row.py /tmp/oha.json "\`$methods\`" "$c"
    done
  done
} | tee "$OUT/http.md"
kill $pid; wait $pid 2>/dev/null
tail -5 "$OUT/serve.log" > "$OUT/serve-tail.log"
