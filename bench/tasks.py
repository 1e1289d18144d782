#!/usr/bin/env python3
"""Segmentation and multi-label explanations: camserve against pytorch-grad-cam with the same target, one session, CPU.

    /work/venv-det/bin/python bench/tasks.py [--n 7] [--threads 2]     (needs a release build and the fixtures)

camserve serves the segmentation fixtures (tests/fixtures/segmentation: LRASPP and DeepLabV3 with MobileNetV3-Large,
256x256, 6 classes) and the multi-label fixture (tests/fixtures/multilabel: MobileNetV3-small with its Sigmoid,
224x224, 6 classes) and answers HTTP requests for a PNG photo (tests/fixtures/detection/photos/chelsea.png): the
default explain request with `methods=gradcam&outputs=raw` (a segmenter: the largest class that is not the
background over its predicted pixels, at the default layer, the classifier's input; a multi-label classifier: every
class scoring at least 0.5, one explain pass for all of them), one request at a time, the client's wall time
(decode, the forward pass that finds the targets, the explain pass).

pytorch-grad-cam 1.5.7's GradCAM runs on the same PyTorch models, rebuilt by the fixture scripts (`build`,
`calibrate` and the head's conditioning: the same weights), on the fixture's input tensor of the same photo, as its
tutorials run it: a forward pass for the predicted mask (or the scores), then one call with
`SemanticSegmentationTarget(class, mask)` at the same layer (a multi-label classifier: one call for all default
targets with `ClassifierOutputTarget`, the image repeated once per target, the library's batched form). Prints a
Markdown table of medians and ratios.
"""

import argparse
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np
import torch
import torch.nn as nn
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget, SemanticSegmentationTarget

from multipass import median_s, post

ROOT = pathlib.Path(__file__).resolve().parent.parent
SEG = ROOT / "tests/fixtures/segmentation"
ML = ROOT / "tests/fixtures/multilabel"
PHOTO = ROOT / "tests/fixtures/detection/photos/chelsea.png"
PHOTO_INDEX = 3  # chelsea.png among the sorted photos (the fixtures' keys)


def module(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    argv, sys.argv = sys.argv, [sys.argv[0]]
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.argv = argv
    return mod


def camserve_times(png, threads, n):
    port = 18743
    env = dict(os.environ, CAMSERVE_RUNTIME__THREADS=str(threads), CAMSERVE_RUNTIME__DEVICE="cpu")
    cfg = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
    for name in ("lraspp", "deeplabv3"):
        cfg.write(f'[[models]]\nname = "{name}"\npath = "{SEG / f"{name}_256.onnx"}"\nlabels = "{SEG / "labels.txt"}"\n')
    cfg.write(f'[[models]]\nname = "multilabel"\npath = "{ML / "multilabel_224.onnx"}"\nlabels = "{ML / "labels.txt"}"\n')
    cfg.close()
    proc = subprocess.Popen([str(ROOT / "target/release/camserve"), "serve", "--config", cfg.name, "--bind", f"127.0.0.1:{port}"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(900):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1)
                break
            except Exception:
                time.sleep(0.2)
        out = {}
        for name in ("lraspp", "deeplabv3", "multilabel"):
            base = f"http://127.0.0.1:{port}/v1/models/{name}"
            out[name, "predict"] = median_s(lambda: post(f"{base}/predict", png), n)
            answer = post(f"{base}/explain?methods=gradcam&outputs=raw", png)
            out[name, "targets"] = [e["target"]["index"] for e in answer["explanations"]]
            out[name, "explain"] = median_s(lambda: post(f"{base}/explain?methods=gradcam&outputs=raw", png), n)
        return out
    finally:
        proc.terminate()
        proc.wait()
        os.unlink(cfg.name)


def pytorch_times(threads, n):
    torch.set_num_threads(threads)
    out = {}
    fx = module(SEG / "make_segmentation_fixtures.py", "make_segmentation_fixtures")
    # The photos as the fixture script reads them (its weights are conditioned on these; its per-model inputs add a
    # jitter of half a grey level to some, which does not change the timing).
    inputs = [fx.load_input(p)[0][None] for p in fx.PHOTOS]
    batch = torch.cat(inputs)
    for name in ("lraspp", "deeplabv3"):
        model = fx.build(name)
        fx.calibrate(model, batch)
        fx.condition_head(name, model, batch, fx.CONFIG[name])
        model.eval()
        x = inputs[PHOTO_INDEX]
        path, where = fx.CONFIG[name]["layers"]["decoder"]
        if where == "input":  # LRASPP: the tensor entering the classifier conv, tapped as pytorch-grad-cam needs it
            parent_path, attr = path.rsplit(".", 1)
            parent = fx.module_of(model, parent_path)
            setattr(parent, attr, nn.Sequential(nn.Identity(), getattr(parent, attr)))
            layer = getattr(parent, attr)[0]
        else:
            layer = fx.module_of(model, path)
        cam = GradCAM(model=model, target_layers=[layer])

        def explain(x=x, cam=cam, model=model):
            with torch.no_grad():
                label = model(x)[0].argmax(0).numpy()
            counts = np.bincount(label.ravel(), minlength=6)
            counts[0] = 0  # the background is never the default target
            c = int(counts.argmax())
            return cam(input_tensor=x, targets=[SemanticSegmentationTarget(c, (label == c).astype(np.float32))]), c

        out[name, "target"] = explain()[1]
        out[name, "forward"] = median_s(lambda: model(x), n)
        out[name, "explain"] = median_s(explain, n)
    mx = module(ML / "make_multilabel_fixtures.py", "make_multilabel_fixtures")
    z = np.load(ML / "inputs.npz")
    inputs = [torch.from_numpy(z[str(k)])[None] for k in range(len(z.files))]
    model = mx.build()
    mx.calibrate(model, torch.cat(inputs))
    mx.condition_fc(model, torch.cat(inputs))
    model.eval()
    x = inputs[PHOTO_INDEX]
    cam = GradCAM(model=model, target_layers=[model.features[12]])

    def explain_ml():
        with torch.no_grad():
            scores = model(x)[0]
        classes = [int(c) for c in torch.argsort(scores, descending=True) if scores[c] >= 0.5]
        return cam(input_tensor=x.repeat(len(classes), 1, 1, 1), targets=[ClassifierOutputTarget(c) for c in classes]), classes

    out["multilabel", "targets"] = explain_ml()[1]
    out["multilabel", "forward"] = median_s(lambda: model(x), n)
    out["multilabel", "explain"] = median_s(explain_ml, n)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    cs = camserve_times(PHOTO.read_bytes(), args.threads, args.n)
    pt = pytorch_times(args.threads, args.n)
    print(f"median of {args.n}, {args.threads} threads, CPU; photo chelsea.png")
    print()
    print("| model | target | camserve predict (HTTP, ms) | PyTorch forward (ms) | camserve Grad-CAM (HTTP, ms) | pytorch-grad-cam Grad-CAM (ms) | ratio |")
    print("|---|---|---|---|---|---|---|")
    for name in ("lraspp", "deeplabv3", "multilabel"):
        target = cs[name, "targets"]
        want = pt[name, "targets"] if name == "multilabel" else [pt[name, "target"]]
        assert target == want, (name, target, want)
        print(f"| {name} | {', '.join(map(str, target))} | {cs[name, 'predict'] * 1e3:.1f} | {pt[name, 'forward'] * 1e3:.1f} | "
              f"{cs[name, 'explain'] * 1e3:.1f} | {pt[name, 'explain'] * 1e3:.1f} | {cs[name, 'explain'] / pt[name, 'explain']:.2f} |")


if __name__ == "__main__":
    main()
