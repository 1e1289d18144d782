#!/usr/bin/env python3
"""Reduces the wheels of deploy/cuda/requirements.txt to the shared libraries camserve's CUDA path loads.

    python3 deploy/cuda/libs.py WHEEL_DIR OUT_DIR
    python3 deploy/cuda/libs.py --installed ORT_DIR OUT_DIR

writes OUT_DIR/lib/ (the libraries, flat: camserve's image points LD_LIBRARY_PATH there), OUT_DIR/licenses/<wheel>/
(every licence file the wheels carry) and OUT_DIR/MANIFEST.txt (each library with its size and wheel, and each
library left out with the reason). Dockerfile.cuda and bench/gpu.sh both use it, so the measured stack is the
shipped one. It fails when a wheel holds a shared library this file does not classify, so a version bump cannot
change the set unnoticed. Standard library only (it runs in the image's build stage).

`--installed` is for a machine that cannot download (the GPU machine of bench/gpu.sh): it links the same set into
OUT_DIR/lib from ORT_DIR (the onnxruntime-gpu wheel's libraries) and from the NVIDIA wheels installed in this
Python's site-packages, and writes OUT_DIR/VERSIONS.txt: each pinned NVIDIA wheel with the version installed,
so a measurement says when its libraries are not the image's exact versions. It fails if a library is missing.
"""

import importlib.metadata
import pathlib
import re
import site
import sys
import zipfile

# Kept: file name pattern (a prefix, matched against the file name inside the wheel) -> why it is needed.
KEEP = {
    "libonnxruntime.so.": "ONNX Runtime (camserve loads it with ORT_DYLIB_PATH)",
    "libonnxruntime_providers_shared.so": "ONNX Runtime's provider bridge, loaded before any execution provider",
    "libonnxruntime_providers_cuda.so": "the CUDA execution provider",
    "libcudart.so.13": "CUDA runtime (linked by the provider)",
    "libcublas.so.13": "cuBLAS (linked by the provider: MatMul, Gemm)",
    "libcublasLt.so.13": "cuBLASLt (linked by the provider and by cuBLAS; cuDNN's legacy convolutions load it)",
    "libcurand.so.10": "cuRAND (linked by the provider)",
    "libcudnn.so.9": "cuDNN's dispatcher, loaded by the provider at start (Conv, pooling, BatchNormalization)",
    "libcudnn_graph.so.9": "cuDNN graph API; every other cuDNN library links it",
    "libcudnn_ops.so.9": "cuDNN legacy ops (pooling, batch norm, activations, tensor transforms)",
    "libcudnn_cnn.so.9": "cuDNN legacy convolutions: Conv and ConvTranspose, the backbone of every explain graph",
    "libcudnn_engines_precompiled.so.9": "cuDNN's precompiled kernels, which the graph library loads",
    "libcudnn_engines_runtime_compiled.so.9": "cuDNN's runtime-compiled engines (with NVRTC)",
    "libcudnn_engines_tensor_ir.so.9": "cuDNN's tensor-IR engines (cuDNN 9.24+): without it convolutions fail "
    "with CUDNN_STATUS_SUBLIBRARY_LOADING_FAILED in cuDNN's default (FULL) configuration",
    "libcudnn_heuristic.so.9": "cuDNN's engine heuristics, loaded by the graph library",
    "libcudnn_ext.so.9": "cuDNN's extension library (cuDNN 9.24+), loaded by the dispatcher",
    "libnvrtc.so.13": "NVRTC: cuDNN's runtime-compiled engines and ONNX Runtime's cuDNN attention load it",
    "libnvrtc-builtins.so.13": "NVRTC's builtins, loaded by NVRTC",
    "libnvJitLink.so.13": "nvJitLink: cuDNN's tensor-IR engines load it to link their kernels",
}

# Left out: pattern -> why camserve never loads it.
LEAVE_OUT = {
    "libonnxruntime_providers_tensorrt.so": "the TensorRT execution provider: needs TensorRT (not on PyPI's CUDA "
    "13 wheels used here) and camserve does not register it",
    "onnxruntime_pybind11_state": "Python bindings",
    "libcudnn_adv.so.9": "cuDNN's RNN, CTC-loss and legacy multi-head-attention API: ONNX Runtime calls it only for "
    "the LSTM, GRU and RNN ops, which camserve's rewrite has no backward rules for, so no explain graph holds one "
    "(92 MB)",
    "libnvblas.so.13": "NVBLAS, a BLAS library for CPU programs that offloads to cuBLAS; nothing in the stack loads it",
    "libcudadevrt.a": "static library (device-side runtime for building CUDA code)",
    "libcudart_static.a": "static library",
}


def classify(name):
    for table, verdict in ((KEEP, "keep"), (LEAVE_OUT, "leave out")):
        for pattern, why in table.items():
            if name.startswith(pattern):
                return verdict, pattern, why
    return None, None, None


def installed(ort_dir, out):
    """Links the kept set from ORT_DIR and this Python's NVIDIA wheels; compares versions with the pins."""
    (out / "lib").mkdir(parents=True, exist_ok=True)
    roots = [pathlib.Path(ort_dir)] + [pathlib.Path(p) / "nvidia" for p in site.getsitepackages()]
    seen, lines = {}, []
    for r in roots:
        for f in sorted(r.rglob("*.so*")) if r.is_dir() else []:
            verdict, pattern, _ = classify(f.name)
            if verdict == "keep" and pattern not in seen:
                seen[pattern] = f
                link = out / "lib" / f.name
                link.unlink(missing_ok=True)
                link.symlink_to(f.resolve())
                lines.append(f"linked {f.name:45} {f.resolve()}")
    missing = sorted(set(KEEP) - set(seen))
    pins = pathlib.Path(__file__).with_name("requirements.txt").read_text()
    for name, pinned in re.findall(r"^(nvidia-[a-z0-9-]+)==([^ ]+)", pins, re.M):
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            have = "not installed"
        lines.append(f"{'same' if have == pinned else 'DIFFERS'}  {name}: pinned {pinned}, here {have}")
    (out / "VERSIONS.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if missing:
        sys.exit(f"deploy/cuda/libs.py: not found here: {', '.join(m + '*' for m in missing)}")


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--installed":
        return installed(sys.argv[2], pathlib.Path(sys.argv[3]))
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    wheels = sorted(pathlib.Path(sys.argv[1]).glob("*.whl"))
    out = pathlib.Path(sys.argv[2])
    (out / "lib").mkdir(parents=True, exist_ok=True)
    kept, left, seen, unknown = [], [], set(), []
    for wheel in wheels:
        dist = wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1]
        with zipfile.ZipFile(wheel) as z:
            for info in z.infolist():
                path = info.filename
                name = path.rsplit("/", 1)[-1]
                lowered = name.lower()
                if (".dist-info/" in path or path.count("/") == 1) and ("licen" in lowered or "notice" in lowered):
                    target = out / "licenses" / dist / name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(z.read(info))
                    continue
                if ".so" not in name and not name.endswith(".a"):
                    continue
                verdict, pattern, why = classify(name)
                if verdict is None:
                    unknown.append(f"{wheel.name}: {path}")
                elif verdict == "keep":
                    (out / "lib" / name).write_bytes(z.read(info))
                    kept.append((name, info.file_size, dist, why))
                    seen.add(pattern)
                else:
                    left.append((name, info.file_size, dist, why))
    missing = sorted(set(KEEP) - seen)
    if unknown or missing:
        for u in unknown:
            print(f"deploy/cuda/libs.py: unclassified shared library {u}: add it to KEEP or LEAVE_OUT", file=sys.stderr)
        for m in missing:
            print(f"deploy/cuda/libs.py: no wheel in {sys.argv[1]} holds {m}*", file=sys.stderr)
        sys.exit(1)
    for name, *_ in kept:
        (out / "lib" / name).chmod(0o755)
    lines = ["# the libraries of camserve's CUDA stack (deploy/cuda/libs.py), from deploy/cuda/requirements.txt", ""]
    lines += [f"kept  {n:45} {s / 1e6:8.1f} MB  {d}  {w}" for n, s, d, w in sorted(kept)]
    lines += [""] + [f"left  {n:45} {s / 1e6:8.1f} MB  {d}  {w}" for n, s, d, w in sorted(left)]
    total = sum(s for _, s, _, _ in kept)
    lines += ["", f"kept {len(kept)} libraries, {total / 1e6:.0f} MB; left out {len(left)} files, "
              f"{sum(s for _, s, _, _ in left) / 1e6:.0f} MB"]
    (out / "MANIFEST.txt").write_text("\n".join(lines) + "\n")
    print(lines[-1])


if __name__ == "__main__":
    main()
