#!/usr/bin/env bash
# The demo page in headless Chromium. Installs what it needs on a fresh machine: Debian's chromium with apt-get
# when run as root (CI), playwright-core from npm into tests/browser/node_modules (no browser download); without
# root and without Chromium it fails with the command to run. CAMSERVE_SKIP_BROWSER=1 skips it, saying so.
# Node.js and npm come from Debian the same way. Builds the release binary it serves (a no-op when it is up to
# date). Screenshots go to target/browser-shots/ (BROWSER_SHOTS=docs/images refreshes the documentation's).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${CAMSERVE_SKIP_BROWSER:-0}" = 1 ]; then
  echo "browser test SKIPPED (1 skipped): CAMSERVE_SKIP_BROWSER=1"
  exit 0
fi
chromium=${CHROMIUM:-/usr/bin/chromium}
if [ ! -x "$chromium" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
    echo "installing Debian's chromium (apt-get) for the browser test"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium > /dev/null
  fi
  if [ ! -x "$chromium" ]; then
    echo "browser test FAILED: Chromium is not installed at $chromium; run: sudo apt-get install chromium" >&2
    echo "(or set CAMSERVE_SKIP_BROWSER=1 to skip it on purpose)" >&2
    exit 1
  fi
fi
if ! command -v node > /dev/null || ! command -v npm > /dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
    echo "installing Debian's nodejs and npm (apt-get) for the browser test"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm > /dev/null
  fi
  if ! command -v node > /dev/null || ! command -v npm > /dev/null; then
    echo "browser test FAILED: Node.js and npm are not installed; run: sudo apt-get install nodejs npm" >&2
    exit 1
  fi
fi
(cd tests/browser && npm install --no-audit --no-fund --silent)
cargo build --release --locked
port=18086
target/release/camserve serve --bind "127.0.0.1:$port" > /tmp/camserve-browser.log 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null' EXIT
for _ in $(seq 1 300); do curl -sf "http://127.0.0.1:$port/readyz" > /dev/null && break; sleep 0.2; done
out=${BROWSER_SHOTS:-target/browser-shots}
mkdir -p "$out"
CHROMIUM=$chromium node tests/browser/page.mjs "http://127.0.0.1:$port/" "$PWD/tests/data/shapes/000.jpg" "$out" \
  "$PWD/assets/photos/chelsea.jpg" "$PWD/tests/data/scenes/009.jpg" "$PWD/tests/data/seg_scenes/000.png" \
  "$PWD/tests/data/shapes/006.jpg" "$PWD/tests/data/scenes/003.jpg"
