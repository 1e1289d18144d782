#!/usr/bin/env bash
# Builds the CPU image (Dockerfile) with podman, runs it, waits for /readyz, POSTs a real photo and checks the
# explanation. Exits 1 when a check fails: the image under IMAGE_LIMIT_MB (default 400 MB), a non-root user, the
# image's HEALTHCHECK passing, the explanation, and exit code 0 after SIGTERM. For machines without a registry (see ../shared/docs/containers.md in this workplace), it first
# makes local stand-ins for the base images: debian:bookworm-slim with debootstrap, rust:1-bookworm from the
# local Rust toolchain. Needs root. Usage: scripts/container-test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
need() { command -v "$1" > /dev/null || { apt-get update -qq && apt-get install -y -qq podman runc debootstrap > /dev/null; }; }
need podman; need runc; need debootstrap
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
echo "== building camserve:test"
started=$(date +%s)
"${PODMAN[@]}" build --isolation chroot --network host \
  --volume "$ca:/host-ca.crt:ro" --volume /tmp/pip.conf:/etc/pip.conf:ro \
  --volume /tmp/cargo-home/config.toml:/usr/local/cargo/config.toml:ro \
  --format docker -t camserve:test . > /tmp/camserve-image.log 2>&1 || { tail -30 /tmp/camserve-image.log; exit 1; }
fails=0
fail() { echo "FAIL: $*"; fails=$(( fails + 1 )); }
size_mb=$(podman image inspect camserve:test --format '{{.Size}}' | awk '{printf "%.0f", $1/1e6}')
limit_mb=${IMAGE_LIMIT_MB:-400}
echo "   built in $(( $(date +%s) - started )) s; image size $size_mb MB (bound $limit_mb MB)"
[ "$size_mb" -le "$limit_mb" ] || fail "the image is $size_mb MB, over $limit_mb MB"
echo "== running it"
"${PODMAN[@]}" rm -f camserve-test > /dev/null 2>&1 || true
"${PODMAN[@]}" run -d --name camserve-test --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 --network host \
  camserve:test > /dev/null
trap '"${PODMAN[@]}" rm -f camserve-test > /dev/null 2>&1 || true' EXIT
# The image's own port (host network: the HEALTHCHECK probes 127.0.0.1:8080 inside the container).
for i in $(seq 1 150); do curl -sf http://127.0.0.1:8080/readyz > /dev/null && break; sleep 0.2; done
curl -sf http://127.0.0.1:8080/readyz && echo || fail "not ready within 30 s"
uid=$("${PODMAN[@]}" exec camserve-test id -u)
echo "== user: $("${PODMAN[@]}" exec camserve-test id -un) (uid $uid)"
[ "$uid" != 0 ] || fail "the server runs as root"
if "${PODMAN[@]}" healthcheck run camserve-test > /dev/null; then echo "== health check: passes"; else fail "the image's HEALTHCHECK fails"; fi
echo "== POST assets/photos/chelsea.jpg"
curl -s -H 'Content-Type: image/jpeg' --data-binary @assets/photos/chelsea.jpg \
  'http://127.0.0.1:8080/v1/models/imagenet/explain?methods=gradcam,guided_gradcam' > /tmp/container-explain.json
python3 - <<'PY' || fail "the explanation is wrong"
import json, base64
d = json.load(open("/tmp/container-explain.json"))
assert d["model"] == "imagenet" and len(d["explanations"]) == 2, d
# The bundled ImageNet model in the image: the cat is a cat.
assert d["predictions"][0]["label"] in ("Egyptian cat", "tabby", "tiger cat"), d["predictions"][:3]
for e in d["explanations"]:
    png = base64.b64decode(e["overlay_png"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"   {e['method']}: target {e['target']['label']} ({e['target']['score']:.3f}), peak {e['peak']}, bbox {e['bbox']}, overlay {len(png)} bytes")
print(f"   image {d['image']}, device {d['device']}, timings {d['timings_ms']}")
PY
echo "== SIGTERM"
"${PODMAN[@]}" stop -t 30 camserve-test > /dev/null
code=$("${PODMAN[@]}" inspect camserve-test --format '{{.State.ExitCode}}')
echo "   exit code $code"
[ "$code" = 0 ] || fail "exit code $code after SIGTERM"
"${PODMAN[@]}" logs camserve-test 2>&1 | tail -3 | cut -c1-200
if [ "$fails" -gt 0 ]; then echo "container test FAILED ($fails)"; exit 1; fi
echo "container test passed"
