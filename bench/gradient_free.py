#!/usr/bin/env python3
"""ReciproCAM and RISE: camserve against OpenVINO XAI 1.1 on the same ONNX model and photo, one session, CPU; and the
time estimates camserve publishes against the times it then takes.

    /work/venv-ovxai/bin/python bench/gradient_free.py [--n 5] [--threads 2] [--masks 1000] [--model PATH]
    (needs a release build; the venv of tests/fixtures/reciprocam/README.md: openvino-xai 1.1.0, onnxruntime, pillow)

`--model` serves another classifier file with the same preprocessing (target/resnet50.onnx: the soak's random-weight
ResNet-50, written by scripts/make_resnet50.py; no labels). The default model is the bundled ImageNet EfficientNet-Lite0 (models/imagenet.onnx, 224x224, its layer `/_swish_1/Clip_output_0`
7x7x1280, camserve's default layer and OpenVINO XAI's own choice). The photo is tests/fixtures/detection/photos/
chelsea.png.

- camserve serves it alone (`request_timeout_ms` raised to 600 s so that every row runs) and answers HTTP requests for
  the PNG, one at a time, the client's wall time (decode, the explain pass, the method's passes), median of n:
  `methods=gradcam`, `methods=reciprocam`, `methods=rise&rise_masks=<masks>&seed=0`, each with `outputs=raw`.
- OpenVINO XAI 1.1.0 runs on the same ONNX file (`ov.convert_model`), on camserve's preprocessing of the same photo
  (the tensor is built here as camserve builds it: shorter side 256, centre crop 224, (x - 127) / 128), timed around
  its call alone (no decoding), median of n: `ReciproCAM(model, embed_scaling=False)` compiled with
  `INFERENCE_PRECISION_HINT=f32` (the reference of tests/reciprocam_rise.rs; the CPU's default here is bfloat16, timed
  too), `generate_saliency_map(x)`; `RISE(model, postprocess_fn=softmax)`,
  `generate_saliency_map(x, target_indices=[top class], num_masks=<masks>, num_cells=8)` (p = 0.5; one mask per
  forward, as it runs them).
- The estimates: `GET /v1/models/imagenet`'s `estimates` (seconds, one target at the default options) read after the
  timed requests, against the median time of a request of each method at its default options (rise at its default 4,000
  masks is left out: minutes; its estimate is scaled to <masks> and compared with the rise row).

Prints Markdown tables.
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import tempfile
import time
import urllib.request

import numpy as np
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODEL = ROOT / "models/imagenet.onnx"
PHOTO = ROOT / "tests/fixtures/detection/photos/chelsea.png"


def median_s(f, n):
    f()  # warm
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def post(url, body):
    req = urllib.request.Request(url, data=body, headers={"content-type": "image/png"})
    with urllib.request.urlopen(req, timeout=900) as r:
        return json.loads(r.read())


def tensor():
    """camserve's preprocessing for this model: shorter side 256 (bilinear), centre crop 224, (x/255 - 127/255) / (128/255)."""
    im = Image.open(PHOTO).convert("RGB")
    w, h = im.size
    s = 256 / min(w, h)
    im = im.resize((round(w * s), round(h * s)), Image.BILINEAR)
    w, h = im.size
    left, top = (w - 224) // 2, (h - 224) // 2
    im = im.crop((left, top, left + 224, top + 224))
    x = np.asarray(im, dtype=np.float32) / 255.0
    x = (x - 127 / 255) / (128 / 255)
    return x.transpose(2, 0, 1)[None].astype(np.float32)


def camserve_rows(n, threads, masks):
    port = 18751
    cfg = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
    labels = f'labels = "{ROOT / "models/imagenet.labels.txt"}"\n' if MODEL == ROOT / "models/imagenet.onnx" else ""
    cfg.write(f'[server]\nrequest_timeout_ms = 600000\n[[models]]\nname = "imagenet"\npath = "{MODEL}"\n'
              f'{labels}resize = "shorter_side_then_center_crop"\n'
              f'mean = [0.4980392156862745, 0.4980392156862745, 0.4980392156862745]\n'
              f'std = [0.5019607843137255, 0.5019607843137255, 0.5019607843137255]\n')
    cfg.close()
    env = dict(os.environ, CAMSERVE_RUNTIME__THREADS=str(threads), CAMSERVE_RUNTIME__DEVICE="cpu")
    proc = subprocess.Popen([str(ROOT / "target/release/camserve"), "serve", "--config", cfg.name, "--bind", f"127.0.0.1:{port}"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1)
                break
            except Exception:
                time.sleep(0.2)
        base = f"http://127.0.0.1:{port}/v1/models/imagenet"
        png = PHOTO.read_bytes()
        with urllib.request.urlopen(base, timeout=60) as r:
            warm_estimates = json.loads(r.read())["estimates"]
        out = {}
        for name, q in [("gradcam", "methods=gradcam"), ("guided_gradcam", "methods=guided_gradcam"), ("saliency", "methods=saliency"),
                        ("reciprocam", "methods=reciprocam"), ("ablationcam", "methods=ablationcam"),
                        ("finercam", "methods=finercam"), ("smoothgrad", "methods=smoothgrad"),
                        ("integrated_gradients", "methods=integrated_gradients"),
                        ("rise", f"methods=rise&rise_masks={masks}&seed=0")]:
            out[name] = median_s(lambda: post(f"{base}/explain?{q}&outputs=raw", png), n if name != "rise" else max(1, n // 2))
        with urllib.request.urlopen(base, timeout=60) as r:
            view = json.loads(r.read())
        answer = post(f"{base}/explain?methods=reciprocam&outputs=raw", png)
        top = answer["predictions"][0]["index"] if "predictions" in answer else answer["explanations"][0]["target"]["index"]
        return out, view["estimates"], warm_estimates, view["costs"], top
    finally:
        proc.terminate()
        proc.wait()


def ovxai_rows(n, threads, masks, top):
    import openvino as ov
    from openvino_xai.methods import RISE, ReciproCAM

    x = tensor()
    out = {}
    for label, cfg in (("f32", {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads}), ("default", {"INFERENCE_NUM_THREADS": threads})):
        m = ReciproCAM(ov.convert_model(str(MODEL)), embed_scaling=False, prepare_model=False)
        m._model_compiled = ov.Core().compile_model(m.prepare_model(load_model=False), "CPU", cfg)
        out["reciprocam", label] = median_s(lambda: m.generate_saliency_map(x), n)

    def softmax(o):
        logits = np.asarray(list(o.values())[0])
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    r = RISE(ov.convert_model(str(MODEL)), postprocess_fn=softmax, prepare_model=False)
    r._model_compiled = ov.Core().compile_model(r.prepare_model(load_model=False), "CPU", {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads})
    out["rise", "f32"] = median_s(lambda: r.generate_saliency_map(x, target_indices=[top], num_masks=masks, num_cells=8), max(1, n // 2))
    return out


def main():
    global MODEL
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--masks", type=int, default=1000)
    ap.add_argument("--model", default=str(MODEL))
    a = ap.parse_args()
    MODEL = pathlib.Path(a.model).resolve()
    cs, est, warm_est, costs, top = camserve_rows(a.n, a.threads, a.masks)
    ov = ovxai_rows(a.n, a.threads, a.masks, top)
    print(f"\n{MODEL.name} 224x224, chelsea.png, {a.threads} threads, median of {a.n} (rise: of {max(1, a.n // 2)})\n")
    print("| method | camserve (HTTP, whole request) | OpenVINO XAI 1.1 f32 (call alone) | ratio | OpenVINO XAI default precision |")
    print("|---|---|---|---|---|")
    print(f"| gradcam (camserve only) | {cs['gradcam'] * 1e3:.0f} ms | — | — | — |")
    print(f"| reciprocam | {cs['reciprocam'] * 1e3:.0f} ms | {ov['reciprocam', 'f32'] * 1e3:.0f} ms | {cs['reciprocam'] / ov['reciprocam', 'f32']:.2f}x | {ov['reciprocam', 'default'] * 1e3:.0f} ms |")
    print(f"| rise, {a.masks} masks | {cs['rise']:.1f} s | {ov['rise', 'f32']:.1f} s | {cs['rise'] / ov['rise', 'f32']:.2f}x | — |")
    print("\n| method | cost (forward-equivalents) | estimate at warm-up | estimate after the runs | measured | measured / estimate |")
    print("|---|---|---|---|---|---|")
    for name in ("gradcam", "guided_gradcam", "saliency", "reciprocam", "ablationcam", "finercam", "smoothgrad", "integrated_gradients", "rise"):
        scale = a.masks / 4000 if name == "rise" else 1.0
        e, w = est.get(name), warm_est.get(name)
        if e is None:
            print(f"| {name} | {costs.get(name)} | — | — | {cs[name]:.3f} s | — |")
            continue
        cost = 3 + a.masks if name == "rise" else costs.get(name)
        warm = f"{w * scale:.3f} s" if w is not None else "— (not measured yet)"
        print(f"| {name}{f' ({a.masks} masks)' if name == 'rise' else ''} | {cost} | {warm} | {e * scale:.3f} s | {cs[name]:.3f} s | {cs[name] / (e * scale):.2f} |")


if __name__ == "__main__":
    main()
