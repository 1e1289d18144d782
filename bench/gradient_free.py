#!/usr/bin/env python3
"""ReciproCAM and RISE: camserve against OpenVINO XAI 1.1 on the same ONNX model and photo, one session, CPU; and the
time estimates camserve publishes against the times it then takes.

    /work/venv-ovxai/bin/python bench/gradient_free.py [--n 5] [--threads 2] [--masks 1000] [--model PATH] [--vit]
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
- The estimates: `GET /v1/models/imagenet`'s (`vit` with --vit) `estimates` (seconds, one target at the default options) read after the
  timed requests, against the median time of a request of each method at its default options (rise at its default 4,000
  masks is left out: minutes; its estimate is scaled to <masks> and compared with the rise row).

`--vit`: the ViT row instead (`--model` defaults then to tests/fixtures/reciprocam/vit_tiny.onnx: timm
vit_tiny_patch16_224, global_pool avg, random weights, 1000 classes), served as `vit`. Preprocessing: stretch to
224x224, /255, mean = std = 0.5 (camserve: `resize = "stretch"`, mean and std [0.5, 0.5, 0.5]); the tensor given to
OpenVINO XAI is built here as camserve builds it (PyTorch's uint8 antialiased bilinear resize, which puts ~0.1 % of the
values one 8-bit level away from PIL's bilinear, the fixture's). Before timing, the script checks that camserve's tensor
is that one: camserve's `/predict` top-10 logits against ONNX Runtime's and OpenVINO's (f32) logits on it (printed,
bound 1e-4, with PIL's tensor's distance beside). Rows: camserve `methods=gradcam` (the
baseline), `methods=vit_reciprocam` (OpenVINO XAI's `ViTReciproCAM` with its defaults: Gaussian mosaic, cls token
kept; camserve's default layer, the last block's `norm1` output, pairs with OpenVINO XAI's default target),
`methods=rise&rise_masks=<masks>&seed=0`; OpenVINO XAI `ViTReciproCAM(model, embed_scaling=False, use_gaussian=True,
cls_token=True, final_norm=True, k=1)` compiled with `INFERENCE_PRECISION_HINT=f32` and with the default precision,
and `RISE` as above. The estimates table covers those three methods.

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
VIT_MODEL = ROOT / "tests/fixtures/reciprocam/vit_tiny.onnx"
VIT = False  # --vit: the ViT row (stretch to 224, mean = std = 0.5; gradcam, vit_reciprocam, rise)
CNN_METHODS = ("gradcam", "guided_gradcam", "saliency", "reciprocam", "ablationcam", "finercam", "smoothgrad",
               "integrated_gradients", "rise")
VIT_METHODS = ("gradcam", "vit_reciprocam", "rise")


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


def torch_taps(src, dst):
    """One axis of PyTorch's antialiased bilinear resize of 8-bit images, as camserve's preprocess::resize ports it
    (ATen's int16 weights): the [dst, src] integer weight matrix and its number of fraction bits."""
    scale = src / dst
    support, invscale = (scale, 1.0 / scale) if scale >= 1.0 else (1.0, 1.0)
    rows = []
    for i in range(dst):
        center = scale * (i + 0.5)
        xmin = max(int(center - support + 0.5), 0)  # C's cast: toward zero
        xsize = min(int(center + support + 0.5), src) - xmin
        w = [max(0.0, 1.0 - abs((j + xmin - center + 0.5) * invscale)) for j in range(max(xsize, 0))]
        total = sum(w)
        rows.append((xmin, [v / total if total != 0.0 else v for v in w]))
    wmax = max(v for _, w in rows for v in w)
    precision = 0
    while precision < 22 and int(0.5 + wmax * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    one = float(1 << precision)
    m = np.zeros((dst, src), np.int64)
    for i, (xmin, w) in enumerate(rows):
        m[i, xmin:xmin + len(w)] = [int(-0.5 + v * one) if v < 0 else int(0.5 + v * one) for v in w]
    return m, precision


def camserve_stretch(a, width, height):
    """camserve's `resize = "stretch"` of an RGB uint8 array [h, w, 3]: PyTorch's uint8 antialiased bilinear
    (horizontal pass, rounded to 8 bits, then vertical), not PIL's (whose 22-bit weights round some pixels the
    other way)."""
    h0, w0, _ = a.shape
    out = a.astype(np.int64)
    if w0 != width:
        m, p = torch_taps(w0, width)
        out = np.clip((np.einsum("xj,yjc->yxc", m, out) + (1 << (p - 1) if p else 0)) >> p, 0, 255)
    if h0 != height:
        m, p = torch_taps(h0, height)
        out = np.clip((np.einsum("yj,jxc->yxc", m, out) + (1 << (p - 1) if p else 0)) >> p, 0, 255)
    return out.astype(np.uint8)


def tensor(pil=False):
    """camserve's preprocessing for this model: shorter side 256 (bilinear), centre crop 224, (x/255 - 127/255) / (128/255).
    --vit: stretch to 224x224 as camserve does it (camserve_stretch; pil=True: PIL's bilinear, the fixture's),
    (x/255 - 0.5) / 0.5."""
    im = Image.open(PHOTO).convert("RGB")
    if VIT:
        a = np.asarray(im.resize((224, 224), Image.BILINEAR)) if pil else camserve_stretch(np.asarray(im), 224, 224)
        x = a.astype(np.float32) / 255.0
        x = (x - np.float32(0.5)) / np.float32(0.5)
        return np.ascontiguousarray(x.transpose(2, 0, 1)[None].astype(np.float32))
    w, h = im.size
    s = 256 / min(w, h)
    im = im.resize((round(w * s), round(h * s)), Image.BILINEAR)
    w, h = im.size
    left, top = (w - 224) // 2, (h - 224) // 2
    im = im.crop((left, top, left + 224, top + 224))
    x = np.asarray(im, dtype=np.float32) / 255.0
    x = (x - 127 / 255) / (128 / 255)
    return x.transpose(2, 0, 1)[None].astype(np.float32)


def preprocessing_check(base, png):
    """camserve's tensor against the one built here: its /predict top-10 logits against ONNX Runtime's and OpenVINO's
    (f32) logits on tensor(). Returns a line to print."""
    import onnxruntime as ort
    import openvino as ov

    req = urllib.request.Request(f"{base}/predict?top_k=10", data=png, headers={"content-type": "image/png"})
    with urllib.request.urlopen(req, timeout=120) as r:
        preds = json.loads(r.read())["predictions"]
    idx = np.array([p["index"] for p in preds])
    cs = np.array([p["logit"] for p in preds], np.float64)
    x = tensor()
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(MODEL), so, providers=["CPUExecutionProvider"])
    lo_ort = sess.run(None, {sess.get_inputs()[0].name: x})[0][0].astype(np.float64)
    plain = ov.Core().compile_model(ov.convert_model(str(MODEL)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    lo_ov = np.asarray(plain(x)[0])[0].astype(np.float64)
    d_ort = float(np.abs(cs - lo_ort[idx]).max())
    d_ov = float(np.abs(cs - lo_ov[idx]).max())
    same_top = list(idx) == list(np.argsort(-lo_ort, kind="stable")[:10])
    verdict = "ok" if max(d_ort, d_ov) <= 1e-4 else "MISMATCH"
    xp = tensor(pil=True)
    lo_pil = sess.run(None, {sess.get_inputs()[0].name: xp})[0][0].astype(np.float64)
    moved = int(np.count_nonzero(np.abs(xp - x) > 1e-6))
    return (f"preprocessing check ({MODEL.name}, chelsea.png {Image.open(PHOTO).size[0]}x{Image.open(PHOTO).size[1]} "
            f"stretched to 224x224): camserve /predict top-10 logits vs ONNX Runtime on the tensor given to OpenVINO XAI: "
            f"max |diff| {d_ort:.2e}; vs OpenVINO f32: {d_ov:.2e} (bound 1e-4: {verdict}); same top-10 order: {same_top}; "
            f"top class {int(idx[0])} logit {cs[0]:.5f}. (PIL's bilinear stretch instead, the fixture's: {moved} of {xp.size} "
            f"values one 8-bit level off, max |tensor diff| {float(np.abs(xp - x).max()):.4f}, logits "
            f"{float(np.abs(cs - lo_pil[idx]).max()):.2e} off camserve's.)")


def camserve_rows(n, threads, masks):
    port = 18751
    cfg = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
    served = "vit" if VIT else "imagenet"
    labels = f'labels = "{ROOT / "models/imagenet.labels.txt"}"\n' if MODEL == ROOT / "models/imagenet.onnx" else ""
    if VIT:
        cfg.write(f'[server]\nrequest_timeout_ms = 600000\n[[models]]\nname = "{served}"\npath = "{MODEL}"\n'
                  f'resize = "stretch"\nmean = [0.5, 0.5, 0.5]\nstd = [0.5, 0.5, 0.5]\n')
    else:
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
        base = f"http://127.0.0.1:{port}/v1/models/{served}"
        png = PHOTO.read_bytes()
        with urllib.request.urlopen(base, timeout=60) as r:
            warm_estimates = json.loads(r.read())["estimates"]
        check = preprocessing_check(base, png) if VIT else None
        if check:
            print(check, flush=True)
        out = {}
        for name in VIT_METHODS if VIT else CNN_METHODS:
            q = f"methods=rise&rise_masks={masks}&seed=0" if name == "rise" else f"methods={name}"
            out[name] = median_s(lambda: post(f"{base}/explain?{q}&outputs=raw", png), n if name != "rise" else max(1, n // 2))
        with urllib.request.urlopen(base, timeout=60) as r:
            view = json.loads(r.read())
        answer = post(f"{base}/explain?methods={'vit_reciprocam' if VIT else 'reciprocam'}&outputs=raw", png)
        top = answer["predictions"][0]["index"] if "predictions" in answer else answer["explanations"][0]["target"]["index"]
        return out, view["estimates"], warm_estimates, view["costs"], top, check
    finally:
        proc.terminate()
        proc.wait()


def ovxai_rows(n, threads, masks, top):
    import openvino as ov
    from openvino_xai.methods import RISE, ReciproCAM, ViTReciproCAM

    x = tensor()
    out = {}
    for label, cfg in (("f32", {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads}), ("default", {"INFERENCE_NUM_THREADS": threads})):
        if VIT:
            m = ViTReciproCAM(ov.convert_model(str(MODEL)), embed_scaling=False, use_gaussian=True, cls_token=True,
                              final_norm=True, k=1, prepare_model=False)
        else:
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
    global MODEL, VIT
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--masks", type=int, default=1000)
    ap.add_argument("--model", default=None, help=f"default {MODEL.relative_to(ROOT)} ({VIT_MODEL.relative_to(ROOT)} with --vit)")
    ap.add_argument("--vit", action="store_true", help="the ViT row: stretch to 224, mean = std = 0.5; gradcam, vit_reciprocam, rise")
    a = ap.parse_args()
    VIT = a.vit
    MODEL = pathlib.Path(a.model or (VIT_MODEL if VIT else MODEL)).resolve()
    cs, est, warm_est, costs, top, check = camserve_rows(a.n, a.threads, a.masks)
    ov = ovxai_rows(a.n, a.threads, a.masks, top)
    rc = "vit_reciprocam" if VIT else "reciprocam"
    print(f"\n{MODEL.name} 224x224, chelsea.png, {a.threads} threads, median of {a.n} (rise: of {max(1, a.n // 2)})\n")
    if check:
        print(check + "\n")
    ov_rc = "ViTReciproCAM" if VIT else "ReciproCAM"
    print("| method | camserve (HTTP, whole request) | OpenVINO XAI 1.1 f32 (call alone) | ratio | OpenVINO XAI default precision |")
    print("|---|---|---|---|---|")
    print(f"| gradcam (camserve only) | {cs['gradcam'] * 1e3:.0f} ms | — | — | — |")
    print(f"| {rc}{f' (OV XAI {ov_rc})' if VIT else ''} | {cs[rc] * 1e3:.0f} ms | {ov['reciprocam', 'f32'] * 1e3:.0f} ms | {cs[rc] / ov['reciprocam', 'f32']:.2f}x | {ov['reciprocam', 'default'] * 1e3:.0f} ms |")
    print(f"| rise, {a.masks} masks | {cs['rise']:.1f} s | {ov['rise', 'f32']:.1f} s | {cs['rise'] / ov['rise', 'f32']:.2f}x | — |")
    print("\n| method | cost (forward-equivalents) | estimate at warm-up | estimate after the runs | measured | measured / estimate |")
    print("|---|---|---|---|---|---|")
    for name in VIT_METHODS if VIT else CNN_METHODS:
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
