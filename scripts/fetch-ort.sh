#!/usr/bin/env bash
# Puts ONNX Runtime's shared library at .ort/libonnxruntime.so (from the PyPI wheel, via pip: no other download).
# Usage: scripts/fetch-ort.sh [cpu|gpu]   (gpu: onnxruntime-gpu with the CUDA provider, into .ort-gpu/)
set -euo pipefail
cd "$(dirname "$0")/.."
ORT_VERSION=1.31.1
flavour=${1:-cpu}
if [ "$flavour" = gpu ]; then pkg=onnxruntime-gpu; dest=.ort-gpu; else pkg=onnxruntime; dest=.ort; fi
if [ -f "$dest/libonnxruntime.so.$ORT_VERSION" ]; then exit 0; fi
PY=${PYTHON:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "fetching $pkg==$ORT_VERSION from PyPI (pip download) ..." >&2
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest "$tmp" "$pkg==$ORT_VERSION"
mkdir -p "$dest"
"$PY" - "$tmp" "$dest" <<'PYEOF'
import pathlib, sys, zipfile
src, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheel = next(src.glob("*.whl"))
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        base = name.rsplit("/", 1)[-1]
        if "/capi/" in name and base.startswith(("libonnxruntime", "libonnxruntime_providers")) and ".so" in base:
            (dest / base).write_bytes(z.read(name))
PYEOF
ln -sf "libonnxruntime.so.$ORT_VERSION" "$dest/libonnxruntime.so"
echo "ONNX Runtime $ORT_VERSION ($pkg) is in $dest/" >&2
