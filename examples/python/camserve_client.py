#!/usr/bin/env python3
"""A small camserve client (needs `requests`; `tqdm` for the progress bar).

Explain one image:
    python3 camserve_client.py --url http://localhost:8080 --model imagenet cat.jpg --out out/
Explain a folder, 8 requests at a time:
    python3 camserve_client.py --url http://localhost:8080 --model imagenet photos/ --out out/ --concurrency 8

Writes <name>_<method>_overlay.png (and _heatmap.png) per image and prints the top prediction.
"""

import argparse
import base64
import concurrent.futures
import pathlib
import sys

import requests

try:
    from tqdm import tqdm
except ImportError:  # the progress bar is optional
    def tqdm(it, **_):
        return it

IMAGE_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp",
               ".bmp": "image/bmp", ".gif": "image/gif", ".tif": "image/tiff", ".tiff": "image/tiff"}


class CamserveError(RuntimeError):
    """A problem+json answer from camserve."""


def explain(session, url, model, path, methods=("gradcam", "guided_gradcam"), api_key=None, **options):
    """POSTs one image as multipart and returns the decoded JSON response."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    data = {"methods": ",".join(methods), **{k: str(v) for k, v in options.items() if v is not None}}
    with open(path, "rb") as f:
        files = {"image": (path.name, f, IMAGE_TYPES.get(path.suffix.lower(), "application/octet-stream"))}
        r = session.post(f"{url}/v1/models/{model}/explain", files=files, data=data, headers=headers, timeout=120)
    if r.status_code != 200:
        try:
            p = r.json()
            raise CamserveError(f"{r.status_code} {p.get('title')}: {p.get('detail')}")
        except ValueError:
            raise CamserveError(f"{r.status_code}: {r.text[:200]}")
    return r.json()


def save(result, path, out):
    out.mkdir(parents=True, exist_ok=True)
    for e in result["explanations"]:
        for kind in ("overlay", "heatmap", "mask"):
            b64 = e.get(f"{kind}_png")
            if b64:
                (out / f"{path.stem}_{e['method']}_{e['target']['index']}_{kind}.png").write_bytes(base64.b64decode(b64))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", type=pathlib.Path, help="an image or a folder of images")
    ap.add_argument("--url", default="http://localhost:8080")
    ap.add_argument("--model", default="imagenet")
    ap.add_argument("--methods", default="gradcam,guided_gradcam")
    ap.add_argument("--top-k", type=int)
    ap.add_argument("--api-key")
    ap.add_argument("--out", type=pathlib.Path, default=pathlib.Path("camserve-out"))
    ap.add_argument("--concurrency", type=int, default=4)
    a = ap.parse_args()
    paths = sorted(p for p in a.input.iterdir() if p.suffix.lower() in IMAGE_TYPES) if a.input.is_dir() else [a.input]
    session = requests.Session()

    def one(p):
        r = explain(session, a.url.rstrip("/"), a.model, p, methods=a.methods.split(","), api_key=a.api_key, top_k=a.top_k)
        save(r, p, a.out)
        top = r["predictions"][0]
        return p, top, r["timings_ms"]["total"]

    failures = 0
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, a.concurrency)) as pool:
        futures = [pool.submit(one, p) for p in paths]
        for f in tqdm(concurrent.futures.as_completed(futures), total=len(futures), unit="img", disable=len(paths) < 2):
            try:
                p, top, ms = f.result()
                print(f"{p.name}: {top['label'] or top['index']} ({top['score']:.3f}) in {ms} ms", file=sys.stderr if len(paths) > 1 else sys.stdout)
            except (CamserveError, requests.RequestException) as e:
                failures += 1
                print(f"error: {e}", file=sys.stderr)
    print(f"{len(paths) - failures}/{len(paths)} explained; overlays in {a.out}/")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
