#!/usr/bin/env bash
# Runs every client example (examples/curl.sh, examples/js/explain.mjs, examples/python/camserve_client.py on one
# image and on a folder) against a real camserve and checks what they wrote.
# Needs a release build, Node.js 18+ and Python 3 with pip (requests and tqdm go into a temporary venv).
set -euo pipefail
cd "$(dirname "$0")/.."
port=18085
target/release/camserve serve --bind "127.0.0.1:$port" > /tmp/camserve-examples.log 2>&1 &
pid=$!
work=$(mktemp -d)
trap 'kill $pid 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 1 300); do curl -sf "http://127.0.0.1:$port/readyz" > /dev/null && break; sleep 0.2; done
url="http://127.0.0.1:$port"
echo "== examples/curl.sh"
(cd "$work" && URL=$url MODEL=demo IMAGE="$OLDPWD/tests/data/shapes/001.jpg" bash "$OLDPWD/examples/curl.sh") > "$work/curl.out"
grep -q '"explanations"' "$work/curl.out" && grep -q 'urn:camserve:problem:invalid-option' "$work/curl.out" && test -s "$work/overlay.png"
echo "   ok ($(wc -l < "$work/curl.out") lines, overlay.png $(stat -c %s "$work/overlay.png") bytes)"
echo "== examples/js/explain.mjs"
(cd "$work" && node "$OLDPWD/examples/js/explain.mjs" "$url" demo "$OLDPWD/tests/data/shapes/002.jpg")
ls "$work"/*_overlay.png > /dev/null
echo "== examples/python/camserve_client.py"
python3 -m venv "$work/venv" && "$work/venv/bin/pip" install -q requests tqdm
"$work/venv/bin/python" examples/python/camserve_client.py --url "$url" --model demo tests/data/shapes/003.jpg --out "$work/py1"
mkdir -p "$work/folder" && cp tests/data/shapes/01*.jpg "$work/folder/"
"$work/venv/bin/python" examples/python/camserve_client.py --url "$url" --model demo "$work/folder" --out "$work/py2" --concurrency 4 --top-k 2 2> "$work/py2.err"
n=$(ls "$work/py2" | grep -c overlay)
echo "   folder: $n overlays for $(ls "$work/folder" | wc -l) images x 2 methods x 2 targets"
test "$n" -eq $(( $(ls "$work/folder" | wc -l) * 4 ))
echo "all examples ran"
