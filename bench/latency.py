#!/usr/bin/env python3
"""Median request latency per method against a running camserve (standard library only).

    python3 bench/latency.py --url http://127.0.0.1:8080 --model demo --image tests/data/shapes/000.jpg [--n 30]

Sends the image as a raw body, one request at a time, `--n` times per method (after 3 warm-up requests), and
prints a Markdown table of the median and p90 total latency as seen by the client, and camserve's own median
inference / explain / render times from `timings_ms`.
"""

import argparse
import json
import statistics
import time
import urllib.parse
import urllib.request

METHODS = ["gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "eigencam", "guided_backprop", "deconvnet",
           "saliency", "guided_gradcam", "gradcam,guided_gradcam"]


def post(url, body, ctype):
    req = urllib.request.Request(url, data=body, headers={"Content-Type": ctype}, method="POST")
    t0 = time.perf_counter()
    with urllib.request.urlopen(req) as r:
        data = r.read()
    return time.perf_counter() - t0, json.loads(data)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--model", default="demo")
    ap.add_argument("--image", required=True)
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--outputs", default="heatmap,overlay")
    ap.add_argument("--methods", default=";".join(METHODS), help="semicolon-separated; each item is one request's methods")
    a = ap.parse_args()
    body = open(a.image, "rb").read()
    ctype = "image/png" if a.image.endswith(".png") else "image/jpeg"
    print(f"| method | median ms | p90 ms | inference ms | explain ms | render ms |")
    print(f"|---|---|---|---|---|---|")
    for m in a.methods.split(";"):
        url = f"{a.url}/v1/models/{a.model}/explain?methods={urllib.parse.quote(m)}&outputs={a.outputs}"
        for _ in range(3):
            post(url, body, ctype)
        lat, tim = [], []
        for _ in range(a.n):
            t, j = post(url, body, ctype)
            lat.append(t * 1000)
            tim.append(j["timings_ms"])
        med = lambda k: statistics.median(x[k] for x in tim)
        lat.sort()
        print(f"| `{m}` | {statistics.median(lat):.1f} | {lat[int(0.9 * (len(lat) - 1))]:.1f} | {med('inference'):.1f} | {med('explain'):.1f} | {med('render'):.1f} |")
    # predictions only
    url = f"{a.url}/v1/models/{a.model}/predict"
    lat = sorted(post(url, body, ctype)[0] * 1000 for _ in range(a.n))
    print(f"| predict | {statistics.median(lat):.1f} | {lat[int(0.9 * (len(lat) - 1))]:.1f} | | | |")


if __name__ == "__main__":
    main()
