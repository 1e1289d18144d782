#!/usr/bin/env python3
"""Per-box explanations of a torchvision Faster R-CNN: camserve against pytorch-grad-cam, one session, CPU.

    /work/venv-det/bin/python bench/torchvision_detectors.py [--n 7] [--threads 2]     (needs a release build and the fixture)

camserve serves the Faster R-CNN fixture (tests/fixtures/torchvision/fasterrcnn_320.onnx: MobileNetV3-Large FPN,
a 128-wide box head, exported with its post-processing; 320x320) and answers HTTP requests for a PNG photo
(tests/fixtures/detection/photos/chelsea.png): Grad-CAM of the best detection at the stride-32 FPN output, then of
the 4 best in one request (the cost of each extra detection), raw maps only, one request at a time, the client's
wall time (decode, the forward pass with NMS inside the graph, and the explain pass). pytorch-grad-cam 1.5.7's
GradCAM runs on the same PyTorch model, rebuilt by the fixture script (`build`, `calibrate`, `condition_heads`: the
same weights), at the same 320x320 input, as its Faster R-CNN tutorial runs it: target layer
model.backbone.fpn.layer_blocks[0], `FasterRCNNBoxScoreTarget` with the detection's label and box, one call per
request (4 targets: the image repeated 4 times, its batched form). Prints a Markdown table of medians and ratios.
"""

import argparse
import importlib.util
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

import numpy as np
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget

from multipass import median_s, post

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIX = ROOT / "tests/fixtures/torchvision"
PHOTO = ROOT / "tests/fixtures/detection/photos/chelsea.png"


def fixture_module():
    spec = importlib.util.spec_from_file_location("make_torchvision_fixtures", FIX / "make_torchvision_fixtures.py")
    mod = importlib.util.module_from_spec(spec)
    argv, sys.argv = sys.argv, [sys.argv[0]]
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.argv = argv
    return mod


def layer_tensor():
    import json
    spec = json.loads((FIX / "gradcam_fasterrcnn.json").read_text())
    return spec["layers"]["backbone.fpn.layer_blocks.0"]["onnx_tensor"]


def camserve_times(png, threads, n):
    port = 18742
    env = dict(os.environ, CAMSERVE_RUNTIME__THREADS=str(threads), CAMSERVE_RUNTIME__DEVICE="cpu")
    cfg = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
    cfg.write(f'[[models]]\nname = "frcnn"\npath = "{FIX / "fasterrcnn_320.onnx"}"\nlabels = "{FIX / "labels.txt"}"\n')
    cfg.close()
    proc = subprocess.Popen([str(ROOT / "target/release/camserve"), "serve", "--config", cfg.name, "--bind", f"127.0.0.1:{port}"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1)
                break
            except Exception:
                time.sleep(0.2)
        base = f"http://127.0.0.1:{port}/v1/models/frcnn"
        out = {"predict (detections only)": median_s(lambda: post(f"{base}/predict", png), n)}
        for k in (1, 4):
            q = f"{base}/explain?methods=gradcam&outputs=raw&layer={urllib.parse.quote(layer_tensor())}&top_k={k}"
            answer = post(q, png)
            assert len(answer["explanations"]) == k, answer
            out[f"Grad-CAM, {k} detection{'s' if k > 1 else ''}"] = median_s(lambda q=q: post(q, png), n)
        return out
    finally:
        proc.terminate()
        proc.wait()
        os.unlink(cfg.name)


def pytorch_times(threads, n):
    torch.set_num_threads(threads)
    fx = fixture_module()
    model = fx.build("fasterrcnn")
    loaded = [fx.load_input(p) for p in fx.PHOTOS]
    batch = [x for x, _, _ in loaded]
    fx.calibrate(model, batch)
    fx.condition_heads("fasterrcnn", model, batch)
    model.eval()
    x = dict((p.name, xx) for p, (xx, _, _) in zip(fx.PHOTOS, loaded))[PHOTO.name][None]
    with torch.no_grad():
        out = model(x)[0]
    assert len(out["scores"]) >= 4, out
    cam = GradCAM(model=model, target_layers=[model.backbone.fpn.layer_blocks[0]])
    res = {"PyTorch forward": median_s(lambda: model(x), n)}
    for k in (1, 4):
        xs = x.repeat(k, 1, 1, 1)
        targets = [FasterRCNNBoxScoreTarget(labels=[int(out["labels"][i])], bounding_boxes=[out["boxes"][i].numpy()]) for i in range(k)]
        res[f"Grad-CAM, {k} detection{'s' if k > 1 else ''}"] = median_s(lambda xs=xs, targets=targets: cam(input_tensor=xs, targets=targets), n)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    cs = camserve_times(PHOTO.read_bytes(), args.threads, args.n)
    pt = pytorch_times(args.threads, args.n)
    print(f"median of {args.n}, {args.threads} threads, Faster R-CNN (MobileNetV3-Large FPN) 320x320, CPU")
    print()
    print("| request | camserve (HTTP, ms) | pytorch-grad-cam (in process, ms) | ratio camserve / pytorch-grad-cam |")
    print("|---|---|---|---|")
    print(f"| forward only | {cs['predict (detections only)'] * 1e3:.1f} (predict: decode, forward with NMS) | {pt['PyTorch forward'] * 1e3:.1f} (forward) | {cs['predict (detections only)'] / pt['PyTorch forward']:.2f} |")
    for k in ("Grad-CAM, 1 detection", "Grad-CAM, 4 detections"):
        print(f"| {k} | {cs[k] * 1e3:.1f} | {pt[k] * 1e3:.1f} | {cs[k] / pt[k]:.2f} |")
    extra_c = (cs["Grad-CAM, 4 detections"] - cs["Grad-CAM, 1 detection"]) / 3
    extra_p = (pt["Grad-CAM, 4 detections"] - pt["Grad-CAM, 1 detection"]) / 3
    print(f"| each extra detection | {extra_c * 1e3:.1f} | {extra_p * 1e3:.1f} | {extra_c / extra_p:.2f} |")


if __name__ == "__main__":
    main()
