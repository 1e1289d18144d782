#!/usr/bin/env bash
# The demo page in headless Chromium (Debian: apt-get install chromium). Skips, saying so, when Chromium is not
# installed. Installs playwright-core from npm into tests/browser/node_modules (no browser download) and needs a
# release build. Screenshots go to target/browser-shots/ (BROWSER_SHOTS=docs/images refreshes the documentation's).
set -euo pipefail
cd "$(dirname "$0")/.."
chromium=${CHROMIUM:-/usr/bin/chromium}
if [ ! -x "$chromium" ]; then
  echo "browser test SKIPPED: Chromium is not installed at $chromium (Debian: apt-get install chromium)"
  exit 0
fi
command -v node > /dev/null || { echo "browser test needs Node.js"; exit 1; }
(cd tests/browser && npm install --no-audit --no-fund --silent)
[ -x target/release/camserve ] || cargo build --release --locked
port=18086
target/release/camserve serve --bind "127.0.0.1:$port" > /tmp/camserve-browser.log 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null' EXIT
for _ in $(seq 1 300); do curl -sf "http://127.0.0.1:$port/readyz" > /dev/null && break; sleep 0.2; done
out=${BROWSER_SHOTS:-target/browser-shots}
mkdir -p "$out"
CHROMIUM=$chromium node tests/browser/page.mjs "http://127.0.0.1:$port/" "$PWD/tests/data/shapes/000.jpg" "$out" \
  "$PWD/assets/photos/chelsea.jpg"
