#!/usr/bin/env bash
# The deployment manifests (scripts/validate_manifests.py: Kubernetes schemas with kubernetes-validate, strict;
# the InferenceService against the kserve package's models), then the Open Inference Protocol ("v2") and KServe
# v1 endpoints with the real clients: installs Triton's tritonclient[http], the kserve SDK and kubernetes-validate
# (scripts/test-requirements.txt) into target/oip-venv, serves the demo model and the bundled embedder
# with the release binary, and runs scripts/oip_clients.py against it: live/ready/metadata, infer with binary and
# JSON tensors, BYTES images and FP32 tensors, one and several images, error cases, and the KServe v1 shim, each
# answer compared with the /v1 API's (raw maps within 1e-6). Exits 1 on the first failed check. Part of `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/oip-venv
if ! "$venv/bin/python" -c "import tritonclient.http, kserve, kubernetes_validate, yaml, PIL, numpy" 2> /dev/null; then
  echo "installing the OIP clients and kubernetes-validate into $venv (scripts/test-requirements.txt)"
  python3 -m venv "$venv" || { echo "oip test FAILED: python3 -m venv failed; run: sudo apt-get install python3-venv" >&2; exit 1; }
  "$venv/bin/pip" install -q --disable-pip-version-check -r scripts/test-requirements.txt
fi
"$venv/bin/python" scripts/validate_manifests.py || { echo "manifest validation FAILED" >&2; exit 1; }
cargo build --release --locked --bin camserve 2>&1 | tail -1
dir=$(mktemp -d)
cat > "$dir/camserve.toml" <<TOML
[server]
bind = "127.0.0.1:0"
[runtime]
device = "cpu"
threads = 2
[[models]]
name = "demo"
path = "$PWD/models/demo.onnx"
labels = "$PWD/models/demo.labels.txt"
[[models]]
name = "embedder"
path = "$PWD/models/shapes_embedder.onnx"
TOML
NO_COLOR=1 target/release/camserve serve --config "$dir/camserve.toml" > "$dir/log" 2>&1 &
pid=$!
trap 'kill $pid 2> /dev/null || true; rm -rf "$dir"' EXIT
port=
for _ in $(seq 1 150); do
  port=$(grep -o 'listening.*127\.0\.0\.1:[0-9]*' "$dir/log" | grep -o '[0-9]*$' || true)
  [ -n "$port" ] && curl -sf "http://127.0.0.1:$port/readyz" > /dev/null && break
  sleep 0.2
done
[ -n "$port" ] || { cat "$dir/log"; echo "oip test FAILED: camserve did not start" >&2; exit 1; }
if "$venv/bin/python" scripts/oip_clients.py "http://127.0.0.1:$port"; then
  echo "oip test passed"
else
  tail -5 "$dir/log"
  echo "oip test FAILED" >&2
  exit 1
fi
