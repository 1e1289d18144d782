"""Capacity of one camserve replica: closed-loop clients POST a photo for a while; prints one Markdown row per
(model, methods) with images explained per second, per core, latency percentiles and the server's peak RSS. Standard library
only. For docs/DEPLOYMENT.md ("Capacity"):

    target/release/camserve serve --bind 127.0.0.1:18700 &      # the bundled models, runtime.threads = cores
    python3 bench/capacity.py http://127.0.0.1:18700 --cores 2 --pid $!
"""

import argparse
import concurrent.futures
import pathlib
import statistics
import sys
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent


def post(url, body):
    req = urllib.request.Request(url, data=body, headers={"content-type": "image/jpeg"})
    t = time.perf_counter()
    with urllib.request.urlopen(req) as r:
        r.read()
        ok = r.status == 200
    return ok, time.perf_counter() - t


def run(base, model, methods, clients, seconds, body):
    url = f"{base}/v1/models/{model}/explain?methods={methods}"
    for _ in range(3):
        post(url, body)  # warm the plan's session
    deadline = time.perf_counter() + seconds
    lat, errors = [], 0

    def client():
        nonlocal errors
        while time.perf_counter() < deadline:
            try:
                ok, dt = post(url, body)
                lat.append(dt)
                errors += not ok
            except Exception:
                errors += 1

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(client) for _ in range(clients)]:
            f.result()
    took = time.perf_counter() - start
    lat.sort()
    return len(lat) / took, statistics.median(lat) * 1e3, lat[int(0.99 * (len(lat) - 1))] * 1e3, errors, len(lat)


def peak_rss_mib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("--cores", type=int, required=True, help="CPU cores the replica has (runtime.threads)")
    ap.add_argument("--pid", type=int, help="the server's pid, for its peak RSS")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--photo", default=str(ROOT / "assets/photos/chelsea.jpg"))
    ap.add_argument("--cases", default="imagenet:gradcam,imagenet:gradcam+guided_gradcam,demo:gradcam,demo:gradcam+guided_gradcam",
                    help="model:methods pairs (methods joined with +)")
    a = ap.parse_args()
    body = pathlib.Path(a.photo).read_bytes()
    print(f"| model | methods | clients | images/s | per core | p50 ms | p99 ms | errors | requests |")
    print("|---|---|---|---|---|---|---|---|---|")
    failed = 0
    for case in a.cases.split(","):
        model, methods = case.split(":")
        methods = methods.replace("+", ",")
        rate, p50, p99, errors, n = run(a.base, model, methods, a.clients, a.seconds, body)
        failed += errors
        print(f"| {model} | `{methods}` | {a.clients} | {rate:.1f} | {rate / a.cores:.1f} | {p50:.0f} | {p99:.0f} | {errors} | {n} |")
        sys.stdout.flush()
    if a.pid:
        print(f"\npeak RSS of the server: {peak_rss_mib(a.pid):.0f} MiB")
    if failed:
        sys.exit(f"capacity: {failed} requests failed; the figures above do not measure a healthy replica")


if __name__ == "__main__":
    main()
