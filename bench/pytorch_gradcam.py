#!/usr/bin/env python3
"""camserve against pytorch-grad-cam on the same ResNet-50 weights and input, in one session.

    python3 bench/pytorch_gradcam.py [--iters 10] [--threads 2]

Builds torchvision's ResNet-50 with seeded random weights, exports it to ONNX, then times (median of --iters,
after warm-up, batch 1, 224x224, CPU):
  - pytorch-grad-cam GradCAM (target layer layer4[-1]) and GuidedBackpropReLUModel, as their users run them;
  - PyTorch eager forward;
  - camserve in-engine (target/release/camserve-bench): forward, Grad-CAM graph, Grad-CAM + guided graph.
Prints a Markdown table and the ratios. Needs torch, torchvision, grad-cam and a release build.
"""

import argparse
import pathlib
import re
import statistics
import subprocess
import tempfile
import time

import numpy as np
import torch
import torchvision
from pytorch_grad_cam import GradCAM, GuidedBackpropReLUModel
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

ROOT = pathlib.Path(__file__).resolve().parent.parent


def median_ms(fn, iters):
    fn()
    fn()
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1000)
    return statistics.median(ts)


def seeded_resnet50(threads):
    """torchvision's ResNet-50 with the seeded random weights every comparison here uses, on `threads` threads."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    return torchvision.models.resnet50(weights=None).eval()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    model = seeded_resnet50(a.threads)
    x = torch.randn(1, 3, 224, 224)
    target = [ClassifierOutputTarget(281)]

    with tempfile.TemporaryDirectory() as d:
        onnx_path = pathlib.Path(d) / "resnet50.onnx"
        torch.onnx.export(model, x, str(onnx_path), opset_version=17, dynamo=False, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})

        with torch.no_grad():
            eager = median_ms(lambda: model(x), a.iters)
        cam = GradCAM(model=model, target_layers=[model.layer4[-1]])
        gradcam = median_ms(lambda: cam(input_tensor=x, targets=target), a.iters)
        gb_model = GuidedBackpropReLUModel(model=model, device="cpu")
        guided = median_ms(lambda: gb_model(x, target_category=281), a.iters)

        out = subprocess.run(
            [str(ROOT / "target/release/camserve-bench"), "--model", str(onnx_path), "--batch", "1",
             "--iters", str(a.iters), "--threads", str(a.threads), "--device", "cpu"],
            check=True, capture_output=True, text=True).stdout
    ours = {m.group(1): float(m.group(2)) for m in re.finditer(r"\| 1 \| (\w+) \| ([\d.]+) \|", out)}

    print(f"ResNet-50, 224x224, batch 1, CPU, {a.threads} threads, median of {a.iters} (ms)\n")
    print("| what | pytorch-grad-cam / PyTorch | camserve (ONNX Runtime) | ratio |")
    print("|---|---|---|---|")
    print(f"| forward | {eager:.1f} | {ours['forward']:.1f} | {ours['forward'] / eager:.3f} |")
    print(f"| Grad-CAM | {gradcam:.1f} | {ours['gradcam']:.1f} | {ours['gradcam'] / gradcam:.3f} |")
    print(f"| guided backprop | {guided:.1f} | | |")
    both = gradcam + guided
    print(f"| Grad-CAM + guided backprop (guided Grad-CAM) | {both:.1f} | {ours['guided']:.1f} | {ours['guided'] / both:.3f} |")
    print(f"\ncamserve's guided graph is {ours['guided'] / ours['forward']:.2f}x its forward pass.")


if __name__ == "__main__":
    main()
