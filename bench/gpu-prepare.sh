#!/usr/bin/env bash
# Prepares what bench/gpu.sh needs on a GPU machine that cannot download and that takes files in parts of at
# most 64 MiB: ONNX Runtime's libraries from the pinned onnxruntime-gpu wheel (deploy/cuda/requirements.txt, hash
# checked), xz-compressed and split into .gpu/p0 .. .gpu/pN (git-ignored), with .gpu/p0/unpack.sh. The NVIDIA
# libraries are not carried: bench/gpu.sh links the image's set from the machine's installed NVIDIA wheels
# (deploy/cuda/libs.py --installed) and reports any version that differs from the pins.
#   bench/gpu-prepare.sh [files to put in the first part...]   (from the repository root)
# Then, on the GPU machine: copy every part to /tmp/gpu, and run `bench/gpu.sh` (it sources /tmp/gpu/unpack.sh).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
grep '^onnxruntime-gpu==' deploy/cuda/requirements.txt > "$work/ort.txt"
python3 -m pip download -q --no-deps --require-hashes -r "$work/ort.txt" -d "$work"
(cd "$work" && python3 -m zipfile -e onnxruntime_gpu-*.whl x)
lib="$work/x/onnxruntime/capi"
rm -rf .gpu && mkdir -p .gpu/p0
for f in "$lib"/libonnxruntime.so.* "$lib"/libonnxruntime_providers_{shared,cuda}.so; do xz -6 -T2 -c "$f" > "$work/$(basename "$f").xz"; done
for f in "$@"; do cp -r "$f" .gpu/p0/; done
# Split every compressed library into 60 MiB pieces, filling parts in order.
python3 - "$work" <<'PY'
import glob, os, sys
limit, part, used = 60 << 20, 0, sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(".gpu/p0") for f in fs)
for src in sorted(glob.glob(os.path.join(sys.argv[1], "*.xz"))):
    data, k = open(src, "rb").read(), 0
    while data:
        room = limit - used
        if room < 1 << 20:
            part, used, room = part + 1, 0, limit
        chunk, data = data[:room], data[room:]
        os.makedirs(f".gpu/p{part}", exist_ok=True)
        open(f".gpu/p{part}/{os.path.basename(src)}.{k:03d}", "wb").write(chunk)
        used, k = used + len(chunk), k + 1
print(f"{part + 1} parts")
PY
cat > .gpu/p0/unpack.sh <<'SH'
# Sourced by bench/gpu.sh on the GPU machine, after every part was copied to /tmp/gpu: ONNX Runtime's libraries
# into /tmp/ort, and ORT_DYLIB_PATH.
set -e
mkdir -p /tmp/ort
for lib in $(ls /tmp/gpu/*.xz.* | sed 's/\.xz\.[0-9]*$//' | sort -u); do
  cat "$lib".xz.* | python3 -c "import lzma, sys; sys.stdout.buffer.write(lzma.decompress(sys.stdin.buffer.read()))" \
    > "/tmp/ort/$(basename "$lib")"
done
export ORT_DYLIB_PATH=$(ls /tmp/ort/libonnxruntime.so.*)
SH
du -sh .gpu/p*
echo "On the device: one call per part (carry [.gpu/pK], command: mkdir -p /tmp/gpu && cp .gpu/pK/* /tmp/gpu/),"
echo "then: bench/gpu.sh (with the release binaries in .gpubin/; results under \$OUT)."
