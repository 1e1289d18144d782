#!/usr/bin/env python3
"""camserve's multi-pass methods and faithfulness metrics against pytorch-grad-cam, Captum and RISE's code: the
same ResNet-50 weights and input, one session, CPU.

    /work/venv/bin/python bench/multipass.py [--n 3] [--threads 2]     (needs a release build)

Builds torchvision's ResNet-50 with seeded random weights, exports it to ONNX, serves it with
target/release/camserve (runtime.threads = --threads, batching.max_batch = --max-batch (8, camserve's default), a
10-minute request timeout and no forward-pass limit), and times batch-1 requests of a 224x224 PNG
(assets/photos/chelsea.jpg resized), one at a time, `--n` times each after one warm-up: the client's wall time, decode and render included. Then it stops the
server and times the references on the same preprocessed tensor with the same thread count, as their users call
them (library defaults): pytorch-grad-cam 1.5.7's ScoreCAM (batches of 16), AblationCAM (batches of 32, the
whole model per batch), FinerCAM; Captum's IntegratedGradients (50 steps, one batch) and
NoiseTunnel(Saliency) (25 samples, one batch); RISE's CausalMetric.single_run (transcribed: one forward per step)
and pytorch-grad-cam's CamMultImageConfidenceChange. Prints a Markdown table with medians and ratios.
"""

import argparse
import io
import json
import os
import pathlib
import statistics
import subprocess
import tempfile
import time
import urllib.request

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


ROOT = pathlib.Path(__file__).resolve().parent.parent
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def median_s(fn, n):
    fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def post(url, body):
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "image/png"}, method="POST")
    with urllib.request.urlopen(req, timeout=900) as r:
        out = json.loads(r.read())
    return out


def camserve_times(onnx_path, png, requests, threads, n, max_batch):
    port = 18711
    env = dict(os.environ, CAMSERVE_SERVER__REQUEST_TIMEOUT_MS="600000", CAMSERVE_SERVER__MAX_FORWARD_PASSES="100000000",
               CAMSERVE_BATCHING__MAX_BATCH=str(max_batch), CAMSERVE_RUNTIME__THREADS=str(threads), CAMSERVE_SERVER__BODY_TIMEOUT_MS="600000")
    proc = subprocess.Popen([str(ROOT / "target/release/camserve"), "serve", "--model", f"r50={onnx_path}", "--bind", f"127.0.0.1:{port}"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2)
                break
            except Exception:
                time.sleep(0.5)
        else:
            raise SystemExit("camserve did not become ready")
        out = {}
        for name, query, reps in requests:
            url = f"http://127.0.0.1:{port}/v1/models/r50/explain?{query}&outputs=heatmap"
            j = post(url, png)
            assert j["explanations"], j
            out[name] = median_s(lambda: post(url, png), reps(n))
            print(f"  camserve {name}: {out[name]:.2f} s", flush=True)
        return out
    finally:
        proc.terminate()
        proc.wait()


def rise_single_run(model, img, explanation, c, mode, step, substrate_fn):
    """RISE's CausalMetric.single_run (evaluation.py), softmax of class c, one forward per step."""
    HW = img.shape[-2] * img.shape[-1]
    n_steps = (HW + step - 1) // step
    if mode == "del":
        start, finish = img.clone(), substrate_fn(img)
    else:
        start, finish = substrate_fn(img), img.clone()
    scores = np.empty(n_steps + 1)
    salient_order = np.flip(np.argsort(explanation.reshape(-1, HW), axis=1), axis=-1)
    for i in range(n_steps + 1):
        with torch.no_grad():
            pred = F.softmax(model(start), dim=1)
        scores[i] = pred[0, c]
        if i < n_steps:
            coords = salient_order[:, step * i: step * (i + 1)]
            start.cpu().numpy().reshape(1, 3, HW)[0, :, coords] = finish.cpu().numpy().reshape(1, 3, HW)[0, :, coords]
    return (scores.sum() - scores[0] / 2 - scores[-1] / 2) / (scores.shape[0] - 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-batch", type=int, default=8, help="camserve's batching.max_batch (its default: 8)")
    ap.add_argument("--only", choices=["camserve", "references"], help="time one side only")
    a = ap.parse_args()
    from pytorch_gradcam import seeded_resnet50  # here, so bench/drise.py can import the helpers without grad-cam

    model = seeded_resnet50(a.threads)
    layer = model.layer4[-1]
    pil = Image.open(ROOT / "assets/photos/chelsea.jpg").convert("RGB").resize((224, 224), Image.BILINEAR)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    png = buf.getvalue()
    x = torch.from_numpy(((np.asarray(pil, dtype=np.float32) / 255 - MEAN) / STD).transpose(2, 0, 1)[None].astype(np.float32))
    with torch.no_grad():
        t = int(model(x).argmax())

    heavy = lambda n: max(1, n)        # Score-CAM and Ablation-CAM (the references): minutes per run on 2 cores
    light = lambda n: max(3, 2 * n + 1)
    requests = [
        ("gradcam", "methods=gradcam", light),
        ("cam", "methods=cam", light),
        ("scorecam", "methods=scorecam", heavy),
        ("ablationcam", "methods=ablationcam", light),
        ("finercam", "methods=finercam", light),
        ("integrated_gradients", "methods=integrated_gradients", light),
        ("smoothgrad", "methods=smoothgrad&seed=1", light),
        ("gradcam + deletion", "methods=gradcam&metrics=deletion", light),
        ("gradcam + insertion", "methods=gradcam&metrics=insertion", light),
        ("gradcam + confidence_change", "methods=gradcam&metrics=confidence_change", light),
    ]
    with tempfile.TemporaryDirectory() as d:
        onnx_path = pathlib.Path(d) / "resnet50.onnx"
        torch.onnx.export(model, x, str(onnx_path), opset_version=17, dynamo=False, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
        ours = camserve_times(onnx_path, png, requests, a.threads, a.n, a.max_batch) if a.only != "references" else {}
    if a.only == "camserve":
        return

    from captum.attr import IntegratedGradients, NoiseTunnel, Saliency
    from pytorch_grad_cam import AblationCAM, FinerCAM, GradCAM, ScoreCAM
    from pytorch_grad_cam.metrics.cam_mult_image import CamMultImageConfidenceChange
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget, ClassifierOutputTarget

    target = [ClassifierOutputTarget(t)]
    theirs = {}

    def timed(name, fn, reps):
        theirs[name] = median_s(fn, reps(a.n))
        print(f"  reference {name}: {theirs[name]:.2f} s", flush=True)

    gradcam = GradCAM(model=model, target_layers=[layer])
    timed("gradcam", lambda: gradcam(input_tensor=x, targets=target), light)
    scorecam = ScoreCAM(model=model, target_layers=[layer])
    timed("scorecam", lambda: scorecam(input_tensor=x, targets=target), heavy)
    ablation = AblationCAM(model=model, target_layers=[layer])
    timed("ablationcam", lambda: ablation(input_tensor=x, targets=target), heavy)
    finer = FinerCAM(model=model, target_layers=[layer])
    timed("finercam", lambda: finer(x, target_idx=t), light)
    ig = IntegratedGradients(model)
    baseline = torch.from_numpy(((0 - MEAN) / STD).astype(np.float32))[None, :, None, None].expand_as(x).contiguous()
    timed("integrated_gradients", lambda: ig.attribute(x, baselines=baseline, target=t, n_steps=50, method="gausslegendre"), light)
    nt = NoiseTunnel(Saliency(model))
    sigma = float(0.15 * (x.max() - x.min()))
    timed("smoothgrad", lambda: nt.attribute(x, nt_type="smoothgrad", nt_samples=25, stdevs=sigma, target=t, abs=False), light)
    cam = gradcam(input_tensor=x, targets=target)
    klen, nsig = 11, 5
    from scipy.ndimage import gaussian_filter
    inp = np.zeros((klen, klen))
    inp[klen // 2, klen // 2] = 1
    k = gaussian_filter(inp, nsig)
    kern = np.zeros((3, 3, klen, klen), dtype=np.float32)
    for c in range(3):
        kern[c, c] = k
    kern = torch.from_numpy(kern)
    blur = lambda img: F.conv2d(img, kern, padding=klen // 2)
    timed("gradcam + deletion", lambda: (gradcam(input_tensor=x, targets=target), rise_single_run(model, x, cam, t, "del", 224, torch.zeros_like)), light)
    timed("gradcam + insertion", lambda: (gradcam(input_tensor=x, targets=target), rise_single_run(model, x, cam, t, "ins", 224, blur)), light)
    metric = CamMultImageConfidenceChange()
    timed("gradcam + confidence_change",
          lambda: metric(x, gradcam(input_tensor=x, targets=target), [ClassifierOutputSoftmaxTarget(t)], model), light)

    refs = {
        "gradcam": "pytorch-grad-cam GradCAM", "scorecam": "pytorch-grad-cam ScoreCAM", "ablationcam": "pytorch-grad-cam AblationCAM",
        "finercam": "pytorch-grad-cam FinerCAM", "integrated_gradients": "Captum IntegratedGradients",
        "smoothgrad": "Captum NoiseTunnel(Saliency)", "gradcam + deletion": "GradCAM + RISE single_run",
        "gradcam + insertion": "GradCAM + RISE single_run", "gradcam + confidence_change": "GradCAM + CamMultImageConfidenceChange",
    }
    print(f"\nResNet-50 (torchvision, seeded random weights), 224x224, batch 1, CPU, {a.threads} threads; medians (s)\n")
    print("| request | camserve over HTTP | reference (in process) | reference | ratio |")
    print("|---|---|---|---|---|")
    for name, _, _ in requests:
        if name not in ours:
            print(f"| `{name}` | | {refs.get(name, '')} | {theirs.get(name, 0):.2f} | |")
        elif name in theirs:
            print(f"| `{name}` | {ours[name]:.2f} | {refs[name]} | {theirs[name]:.2f} | {ours[name] / theirs[name]:.3f} |")
        else:
            print(f"| `{name}` | {ours[name]:.2f} | (none) | | |")


if __name__ == "__main__":
    main()
