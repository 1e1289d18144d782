#!/usr/bin/env bash
# Three camserve replicas behind nginx on loopback, steady load from oha, and two faults mid-run:
# replica 1 is killed with SIGKILL, replica 2 is stopped with SIGTERM (drain). Reports failed client requests
# (goal: 0) and the latency per phase. Needs: a release build, nginx (Debian: apt-get install nginx-light),
# oha (cargo install oha). Usage: scripts/lb-test.sh [MODEL.onnx] [CLIENTS]
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-models/demo.onnx}
clients=${2:-8}
exe=target/release/camserve
command -v nginx > /dev/null || { echo "nginx is not installed (apt-get install nginx-light)"; exit 1; }
command -v oha > /dev/null || { echo "oha is not installed (cargo install oha)"; exit 1; }
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  [ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid")" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
for i in 1 2 3; do
  NO_COLOR=1 CAMSERVE_SERVER__DRAIN_DELAY_MS=1500 CAMSERVE_SERVER__SHUTDOWN_GRACE_MS=10000 CAMSERVE_RUNTIME__THREADS=1 \
    "$exe" serve --model "m=$model" --bind "127.0.0.1:1809$i" > "$work/camserve-$i.log" 2>&1 &
  pids+=($!)
done
for i in 1 2 3; do
  for _ in $(seq 1 300); do curl -sf "http://127.0.0.1:1809$i/readyz" > /dev/null && break; sleep 0.2; done
done
sed -e "s|worker_processes auto;|worker_processes 2; pid $work/nginx.pid; error_log $work/nginx-error.log;|" \
    -e "s|server camserve-1:8080|server 127.0.0.1:18091|; s|server camserve-2:8080|server 127.0.0.1:18092|" \
    -e "s|    server 127.0.0.1:18092 max_fails=1 fail_timeout=5s;|    server 127.0.0.1:18092 max_fails=1 fail_timeout=5s;\n    server 127.0.0.1:18093 max_fails=1 fail_timeout=5s;|" \
    -e "s|listen 8080;|listen 127.0.0.1:18090; access_log off;|" \
    -e "s|http {|http {\n  client_body_temp_path $work/body; proxy_temp_path $work/proxy; fastcgi_temp_path $work/fcgi; uwsgi_temp_path $work/uwsgi; scgi_temp_path $work/scgi;|" \
    deploy/nginx.conf > "$work/nginx.conf"
nginx -c "$work/nginx.conf" -p "$work"
sleep 0.5
url="http://127.0.0.1:18090/v1/models/m/explain?methods=gradcam"
phase() { # name seconds
  oha -z "$2s" -c "$clients" -m POST -H 'content-type: image/jpeg' -D tests/data/shapes/000.jpg --no-tui \
    --output-format json "$url" > "$work/$1.json" 2> /dev/null
  python3 - "$work/$1.json" "$1" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
s, p = d["summary"], d["latencyPercentiles"]
codes = d.get("statusCodeDistribution", {})
ok = codes.get("200", 0)
failed = sum(v for k, v in codes.items() if k != "200") + sum(v for k, v in d.get("errorDistribution", {}).items() if "deadline" not in k)
print(f"| {sys.argv[2]} | {ok} | {failed} | {s['requestsPerSec']:.0f} | {(p['p50'] or 0) * 1000:.1f} | {(p['p99'] or 0) * 1000:.1f} | {(s.get('slowest') or 0) * 1000:.1f} |")
PY
}
echo "camserve x3 behind nginx, $clients clients, model $model, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores"
echo
echo "| phase | ok | failed | req/s | p50 ms | p99 ms | slowest ms |"
echo "|---|---|---|---|---|---|---|"
phase "steady (3 replicas)" 10
( sleep 3; kill -9 "${pids[0]}" ) &
phase "SIGKILL replica 1 at +3 s" 10
( sleep 3; kill -TERM "${pids[1]}" ) &
phase "SIGTERM replica 2 at +3 s" 10
phase "after (1 replica)" 10
wait "${pids[1]}" 2>/dev/null; echo; echo "replica 2 exit status after SIGTERM: $?"
grep -h "draining\|closing the listener" "$work/camserve-2.log" | sed 's/^/  /' | cut -c1-160
