#!/usr/bin/env bash
# Builds both images with podman, the CPU one (Dockerfile) and the CUDA one (Dockerfile.cuda), and checks each:
# size under its bound (IMAGE_LIMIT_MB, default 400 MB; CUDA_IMAGE_LIMIT_MB, default 2600 MB: the CPU image's
# contents less its ONNX Runtime, plus the 2,141 MB of CUDA libraries), a non-root user,
# the image's HEALTHCHECK passing, a real photo explained correctly, exit code 0 after SIGTERM. The CUDA image is
# checked without a GPU for all that can be proved without one (docs/OPERATIONS.md, "CUDA image"):
#   - every library of its CUDA stack resolves: `ldd` finds everything but libcuda.so.1, the driver's library that
#     the NVIDIA container runtime mounts from the host; with a stand-in for it (scripts/cuda/make-libcuda-stub.sh)
#     `ldd -r` finds every library and symbol, and dlopen(RTLD_NOW) loads cuDNN and every CUDA library;
#   - ONNX Runtime itself loads the CUDA provider (with the stand-in, the failure comes from inside the provider);
#   - with device=auto it logs why CUDA is unavailable, serves on the CPU, says "device": "cpu" in /v1/models and
#     explains the photo; with device=cuda it refuses to start: a clear message, exit code 1, no crash.
# Exits 1 when any check fails. For machines without a registry, it first makes local stand-ins for the base
# images: debian:bookworm-slim with debootstrap, rust:1-bookworm from the local Rust toolchain. Needs root.
# Usage: scripts/container-test.sh [cpu|cuda|both] (default both)
set -euo pipefail
cd "$(dirname "$0")/.."
need() { command -v "$1" > /dev/null || { apt-get update -qq && apt-get install -y -qq "${2:-$1}" > /dev/null; }; }
need podman; need runc; need debootstrap; need gcc; need nm binutils
which=${1:-both}
case $which in cpu|cuda|both) ;; *) echo "usage: $0 [cpu|cuda|both]"; exit 2;; esac
PODMAN=(podman --runtime runc --cgroup-manager cgroupfs)
if ! podman image exists docker.io/library/debian:bookworm-slim; then
  echo "== making debian:bookworm-slim with debootstrap"
  rm -rf /tmp/rootfs && debootstrap --variant=minbase bookworm /tmp/rootfs > /tmp/debootstrap.log 2>&1
  tar -C /tmp/rootfs -c . | podman import - docker.io/library/debian:bookworm-slim > /dev/null
fi
if ! podman image exists docker.io/library/rust:1-bookworm; then
  echo "== making rust:1-bookworm from the local toolchain"
  ctx=$(mktemp -d)
  toolchain=$(rustc --print sysroot)
  cp -a "$toolchain" "$ctx/toolchain"
  cat > "$ctx/Containerfile" <<'CF'
FROM docker.io/library/debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev pkg-config ca-certificates && rm -rf /var/lib/apt/lists/*
COPY toolchain /usr/local
ENV CARGO_HOME=/usr/local/cargo PATH=/usr/local/cargo/bin:/usr/local/bin:/usr/bin:/bin
RUN mkdir -p /usr/local/cargo/bin && ln -sf /usr/local/bin/cargo /usr/local/cargo/bin/cargo
CF
  "${PODMAN[@]}" build --isolation chroot --network host -t docker.io/library/rust:1-bookworm "$ctx" > /tmp/rust-image.log 2>&1
  rm -rf "$ctx"
fi
# Package downloads inside the build go through this machine's TLS setup: mount its CA bundle.
ca=/etc/ssl/certs/ca-certificates.crt
printf '[global]\ncert = /host-ca.crt\n' > /tmp/pip.conf
mkdir -p /tmp/cargo-home && printf '[http]\ncainfo = "/host-ca.crt"\n' > /tmp/cargo-home/config.toml
fails=0
fail() { echo "FAIL: $*"; fails=$(( fails + 1 )); }
cleanup() { "${PODMAN[@]}" rm -f camserve-test > /dev/null 2>&1 || true; }
trap cleanup EXIT

build() { # IMAGE DOCKERFILE LIMIT_MB
  echo "== building $1 ($2)"
  local started; started=$(date +%s)
  "${PODMAN[@]}" build --isolation chroot --network host \
    --volume "$ca:/host-ca.crt:ro" --volume /tmp/pip.conf:/etc/pip.conf:ro \
    --volume /tmp/cargo-home/config.toml:/usr/local/cargo/config.toml:ro \
    --format docker -f "$2" -t "$1" . > "/tmp/$1.log" 2>&1 || { tail -30 "/tmp/$1.log"; exit 1; }
  local size_mb; size_mb=$(podman image inspect "$1" --format '{{.Size}}' | awk '{printf "%.0f", $1/1e6}')
  echo "   built in $(( $(date +%s) - started )) s; image size $size_mb MB (bound $3 MB)"
  [ "$size_mb" -le "$3" ] || fail "$1 is $size_mb MB, over $3 MB"
}

start() { # IMAGE [podman run options]: runs it on the host network (its own port 8080) and waits for /readyz
  local image=$1; shift
  cleanup
  "${PODMAN[@]}" run -d --name camserve-test --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 --network host \
    "$@" "$image" > /dev/null
  for _ in $(seq 1 150); do curl -sf http://127.0.0.1:8080/readyz > /dev/null && break; sleep 0.2; done
  curl -sf http://127.0.0.1:8080/readyz > /dev/null && echo "   ready" || fail "$image: not ready within 30 s"
}

explain_check() { # DEVICE: the photo explained by the bundled ImageNet model, on DEVICE
  curl -s -H 'Content-Type: image/jpeg' --data-binary @assets/photos/chelsea.jpg \
    'http://127.0.0.1:8080/v1/models/imagenet/explain?methods=gradcam,guided_gradcam' > /tmp/container-explain.json
  curl -s http://127.0.0.1:8080/v1/models > /tmp/container-models.json
  DEVICE=$1 python3 - <<'PY' || fail "the explanation or the device is wrong"
import base64, json, os
d = json.load(open("/tmp/container-explain.json"))
assert d["model"] == "imagenet" and len(d["explanations"]) == 2, d
# The bundled ImageNet model in the image: the cat is a cat.
assert d["predictions"][0]["label"] in ("Egyptian cat", "tabby", "tiger cat"), d["predictions"][:3]
for e in d["explanations"]:
    png = base64.b64decode(e["overlay_png"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"   {e['method']}: target {e['target']['label']} ({e['target']['score']:.3f}), peak {e['peak']}, bbox {e['bbox']}, overlay {len(png)} bytes")
print(f"   image {d['image']}, device {d['device']}, timings {d['timings_ms']}")
models = json.load(open("/tmp/container-models.json"))["models"]
devices = {m["name"]: m["device"] for m in models}
print(f"   GET /v1/models: devices {devices}")
assert d["device"] == os.environ["DEVICE"] and set(devices.values()) == {os.environ["DEVICE"]}, devices
PY
}

stop_check() { # exit code 0 after SIGTERM
  "${PODMAN[@]}" stop -t 30 camserve-test > /dev/null
  local code; code=$("${PODMAN[@]}" inspect camserve-test --format '{{.State.ExitCode}}')
  echo "   SIGTERM: exit code $code"
  [ "$code" = 0 ] || fail "exit code $code after SIGTERM"
}

common_checks() { # IMAGE DEVICE [podman run options]: user, health check, explanation, SIGTERM
  local image=$1 device=$2; shift 2
  start "$image" "$@"
  local uid; uid=$("${PODMAN[@]}" exec camserve-test id -u)
  echo "   user: $("${PODMAN[@]}" exec camserve-test id -un) (uid $uid)"
  [ "$uid" != 0 ] || fail "$image runs as root"
  if "${PODMAN[@]}" healthcheck run camserve-test > /dev/null; then echo "   health check: passes"; else fail "$image: HEALTHCHECK fails"; fi
  explain_check "$device"
}

if [ "$which" != cuda ]; then
  build camserve:test Dockerfile "${IMAGE_LIMIT_MB:-400}"
  echo "== CPU image: running it"
  common_checks camserve:test cpu
  stop_check
  "${PODMAN[@]}" logs camserve-test 2>&1 | tail -2 | cut -c1-200
fi

if [ "$which" != cpu ]; then
  img=camserve-cuda:test
  build "$img" Dockerfile.cuda "${CUDA_IMAGE_LIMIT_MB:-2600}"
  in_image() { "${PODMAN[@]}" run --rm --network none --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 --entrypoint /bin/sh "$@"; }
  echo "== CUDA image: the CUDA stack resolves"
  in_image "$img" -c 'cat /opt/camserve/lib/MANIFEST.txt' | tail -1 | sed 's/^/   /'
  # 1. Without a driver: only libcuda.so.1 may be missing.
  in_image "$img" -c 'for f in /opt/camserve/lib/*.so*; do ldd "$f" | grep "not found" | sed "s|^[[:space:]]*|${f##*/}: |"; done' \
    > /tmp/cuda-ldd.txt
  sed 's/^/   ldd: /' /tmp/cuda-ldd.txt
  grep -v '^[^:]*: libcuda\.so\.1 => not found' /tmp/cuda-ldd.txt && fail "a library other than the driver's libcuda.so.1 is missing"
  grep -q '^libonnxruntime_providers_cuda.so: libcuda.so.1' /tmp/cuda-ldd.txt \
    || fail "ldd did not list the CUDA provider's libcuda.so.1 (is the provider in the image?)"
  # 2. With a stand-in for the driver's library: every library and every symbol resolves.
  stub=/tmp/cuda-stub
  rm -rf "$stub" && mkdir -p "$stub"
  mnt=$(podman image mount "$img")
  scripts/cuda/make-libcuda-stub.sh "$mnt/opt/camserve/lib" "$stub" 2>&1 | sed 's/^/   /'
  podman image unmount "$img" > /dev/null
  gcc -O2 -Wall -o "$stub/dlopen-check" scripts/cuda/dlopen-check.c -ldl
  with_stub=(-v "$stub:/opt/stub:ro" -e LD_LIBRARY_PATH=/opt/stub:/opt/camserve/lib)
  in_image "${with_stub[@]}" "$img" -c 'for f in /opt/camserve/lib/*.so*; do ldd -r "$f" 2>&1 | grep -E "not found|undefined symbol" | sed "s|^[[:space:]]*|${f##*/}: |"; done' \
    > /tmp/cuda-ldd-stub.txt
  sed 's/^/   ldd -r with the stand-in: /' /tmp/cuda-ldd-stub.txt
  # The provider takes Provider_GetHost from libonnxruntime_providers_shared.so, which ONNX Runtime loads globally first.
  grep -v '^libonnxruntime_providers_cuda.so: undefined symbol: Provider_GetHost' /tmp/cuda-ldd-stub.txt \
    && fail "with libcuda.so.1 present, a library or symbol is still missing"
  # dlopen(RTLD_NOW) of cuDNN's dispatcher, each of its sub-libraries (cuDNN loads them by name at run time, so
  # ldd of the provider never sees them) and every CUDA library. The provider itself is loaded by ONNX Runtime
  # below: its constructors need ONNX Runtime's provider host, so no plain dlopen can load it.
  in_image "${with_stub[@]}" "$img" -c 'cd /opt/camserve/lib && /opt/stub/dlopen-check $(ls *.so* | grep -v providers | sed "s|^|$PWD/|")' \
    > /tmp/cuda-dlopen.txt && rc=0 || rc=$?
  sed 's/^/   dlopen: /' /tmp/cuda-dlopen.txt
  [ "$rc" = 0 ] && [ "$(grep -c '^ok .*libcudnn' /tmp/cuda-dlopen.txt)" -ge 9 ] || fail "dlopen failed (exit $rc)"

  # 3. camserve without a GPU, device=auto: falls back to the CPU, says why, serves correctly.
  echo "== CUDA image without a GPU, device=auto"
  common_checks "$img" cpu -e CAMSERVE_RUNTIME__DEVICE=auto
  reason=$("${PODMAN[@]}" logs camserve-test 2>&1 | grep 'CUDA unavailable, running on cpu' | head -1 || true)
  echo "   log: ${reason:0:400}"
  grep -q 'libcuda.so.1' <<< "$reason" || fail "the fallback is not logged with its reason (libcuda.so.1 missing)"
  stop_check
  # With the driver's library present but no GPU: ONNX Runtime loads the provider, and CUDA itself says no.
  start "$img" -e CAMSERVE_RUNTIME__DEVICE=auto "${with_stub[@]}"
  reason=$("${PODMAN[@]}" logs camserve-test 2>&1 | grep 'CUDA unavailable, running on cpu' | head -1 || true)
  echo "   with the stand-in driver library: ${reason:0:400}"
  grep -q 'CUDA failure' <<< "$reason" && ! grep -q 'Failed to load library' <<< "$reason" \
    || fail "with libcuda.so.1 present, ONNX Runtime did not load the CUDA provider"
  curl -s http://127.0.0.1:8080/v1/models | grep -q '"device":"cpu"' || fail "not serving on the CPU"
  stop_check

  # 4. device=cuda without a GPU: refuses to start, clearly, exit code 1, no crash.
  echo "== CUDA image without a GPU, device=cuda (the image's default)"
  for variant in plain stub; do
    opts=(); [ "$variant" = stub ] && opts=("${with_stub[@]}")
    cleanup
    set +e
    out=$(timeout 60 "${PODMAN[@]}" run --name camserve-test --network none --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 \
      "${opts[@]}" "$img" 2>&1); code=$?
    set -e
    msg=$(grep '^error:' <<< "$out" | head -1 || true)
    echo "   $variant: exit code $code: ${msg:0:600}"
    [ "$code" = 1 ] || fail "device=cuda without a GPU ($variant): exit code $code, expected 1"
    grep -q 'CUDA is unavailable' <<< "$msg" || fail "device=cuda without a GPU ($variant): no clear message"
    grep -qi 'panic' <<< "$out" && fail "device=cuda without a GPU ($variant): a panic"
  done
fi
if [ "$fails" -gt 0 ]; then echo "container test FAILED ($fails)"; exit 1; fi
echo "container test passed"
