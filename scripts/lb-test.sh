#!/usr/bin/env bash
# Three camserve replicas behind nginx on loopback, steady load from oha, and two faults mid-run: replica 1 is
# killed with SIGKILL, replica 2 is stopped with SIGTERM (drain); then both are restarted. Exits 1 when a goal
# is missed:
#   - zero failed client requests in every phase (non-200 answers and client errors alike);
#   - replica 2 exits 0 after SIGTERM;
#   - after the restart, replicas 1 and 2 are ready and each serves requests through nginx.
# Builds the release binary it tests. Installs nginx (Debian nginx-light, apt-get as root) and oha
# (cargo install oha --locked) when missing, or fails with the command to run.
# Usage: scripts/lb-test.sh [MODEL.onnx] [CLIENTS]
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-models/demo.onnx}
clients=${2:-8}
exe=target/release/camserve
cargo build --release --bin camserve
if ! command -v nginx > /dev/null; then
  if [ "$(id -u)" = 0 ]; then
    echo "nginx is missing; installing Debian's nginx-light (apt-get)" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light > /dev/null) \
      || { echo "lb-test: cannot install nginx; run: apt-get install nginx-light" >&2; exit 1; }
  else
    echo "lb-test: nginx is missing; run as root: apt-get install nginx-light" >&2; exit 1
  fi
fi
export PATH="$PATH:/usr/sbin"
if ! command -v oha > /dev/null; then
  echo "oha is missing; installing it from crates.io (cargo install oha --locked)" >&2
  cargo install oha --locked || { echo "lb-test: cannot install oha; run: cargo install oha --locked" >&2; exit 1; }
fi
work=$(mktemp -d)
pids=("" "" "")
cleanup() {
  for p in "${pids[@]}"; do [ -n "$p" ] && { kill -9 "$p"; wait "$p"; } 2> /dev/null || true; done
  [ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid")" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
start() { # replica number (1-3)
  NO_COLOR=1 CAMSERVE_SERVER__DRAIN_DELAY_MS=1500 CAMSERVE_SERVER__SHUTDOWN_GRACE_MS=10000 CAMSERVE_RUNTIME__THREADS=1 \
    "$exe" serve --model "m=$model" --bind "127.0.0.1:1809$1" >> "$work/camserve-$1.log" 2>&1 &
  pids[$(( $1 - 1 ))]=$!
}
ready() { # replica number; waits up to 60 s
  for _ in $(seq 1 300); do curl -sf "http://127.0.0.1:1809$1/readyz" > /dev/null && return 0; sleep 0.2; done
  return 1
}
served() { # replica number: explain requests it has answered 200
  curl -sf "http://127.0.0.1:1809$1/metrics" | awk '/^camserve_http_requests_total/ && /explain/ && /status="200"/ {s += $NF} END {print s + 0}'
}
for i in 1 2 3; do start $i; done
for i in 1 2 3; do ready $i || { echo "lb-test: replica $i did not become ready" >&2; exit 1; }; done
sed -e "s|worker_processes auto;|worker_processes 2; pid $work/nginx.pid; error_log $work/nginx-error.log;|" \
    -e "s|server camserve-1:8080|server 127.0.0.1:18091|; s|server camserve-2:8080|server 127.0.0.1:18092|" \
    -e "s|    server 127.0.0.1:18092 max_fails=1 fail_timeout=5s;|    server 127.0.0.1:18092 max_fails=1 fail_timeout=5s;\n    server 127.0.0.1:18093 max_fails=1 fail_timeout=5s;|" \
    -e "s|listen 8080;|listen 127.0.0.1:18090; access_log off;|" \
    -e "s|http {|http {\n  client_body_temp_path $work/body; proxy_temp_path $work/proxy; fastcgi_temp_path $work/fcgi; uwsgi_temp_path $work/uwsgi; scgi_temp_path $work/scgi;|" \
    deploy/nginx.conf > "$work/nginx.conf"
nginx -c "$work/nginx.conf" -p "$work"
sleep 0.5
url="http://127.0.0.1:18090/v1/models/m/explain?methods=gradcam"
fails=0
fail() { echo "FAIL: $*"; fails=$(( fails + 1 )); }
phase() { # name seconds
  oha -z "$2s" -c "$clients" -m POST -H 'content-type: image/jpeg' -D tests/data/shapes/000.jpg --no-tui \
    --output-format json "$url" > "$work/phase.json" 2> /dev/null
  python3 - "$work/phase.json" "$1" <<'PY' || fails=$(( fails + 1 ))
import json, sys
d = json.load(open(sys.argv[1]))
s, p = d["summary"], d["latencyPercentiles"]
codes = {str(k): v for k, v in d.get("statusCodeDistribution", {}).items()}
ok = codes.get("200", 0)
# oha cuts the requests still in flight when -z ends; those are not failures of the service.
errors = {k: v for k, v in d.get("errorDistribution", {}).items() if "deadline" not in k}
failed = sum(v for k, v in codes.items() if k != "200") + sum(errors.values())
print(f"| {sys.argv[2]} | {ok} | {failed} | {s['requestsPerSec']:.0f} | {(p['p50'] or 0) * 1000:.1f} | {(p['p99'] or 0) * 1000:.1f} | {(s.get('slowest') or 0) * 1000:.1f} |")
if failed or ok == 0:
    print(f"FAIL: {sys.argv[2]}: {failed} failed requests ({codes}, {errors}), {ok} ok")
    sys.exit(1)
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
phase "1 replica" 10
set +e
wait "${pids[1]}" 2> /dev/null
status=$?
set -e
echo
echo "replica 2 exit status after SIGTERM: $status"
[ "$status" = 0 ] || fail "replica 2 exited $status after SIGTERM"
grep -h "draining\|closing the listener" "$work/camserve-2.log" | sed 's/^/  /' | cut -c1-160
wait "${pids[0]}" 2> /dev/null || true
start 1
start 2
ready 1 || fail "replica 1 did not become ready after the restart"
ready 2 || fail "replica 2 did not become ready after the restart"
before1=$(served 1); before2=$(served 2)
# nginx keeps a failed replica out for fail_timeout (5 s): wait it out so the restarted ones get traffic.
sleep 6
echo
echo "| phase | ok | failed | req/s | p50 ms | p99 ms | slowest ms |"
echo "|---|---|---|---|---|---|---|"
phase "replicas 1 and 2 restarted (3 replicas)" 10
got1=$(( $(served 1) - before1 )); got2=$(( $(served 2) - before2 ))
echo "after the restart, through nginx: replica 1 served $got1, replica 2 served $got2 explain requests"
[ "$got1" -gt 0 ] || fail "restarted replica 1 served nothing through nginx"
[ "$got2" -gt 0 ] || fail "restarted replica 2 served nothing through nginx"
if [ "$fails" -gt 0 ]; then echo "lb-test: FAILED ($fails)"; exit 1; fi
echo "lb-test: all goals met (0 failed requests, replica 2 exited 0, both restarted replicas serving)"
