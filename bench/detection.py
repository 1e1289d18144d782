#!/usr/bin/env python3
"""Per-box explanations of a detector: camserve against pytorch-grad-cam, one session, CPU, batch 1.

    /work/venv-det/bin/python bench/detection.py [--n 7] [--threads 2]     (needs a release build)

camserve serves the YOLOv8n fixture (tests/fixtures/detection/yolov8n_320_dynbatch.onnx, 320x320) with
target/release/camserve (runtime.threads = --threads) and answers HTTP requests for a letterboxed PNG photo
(tests/fixtures/detection/photos/rocket.png): Grad-CAM of the best detection at the P3 head input, then of the 4 best
in one request (the cost of each extra detection), raw maps only, one request at a time, the client's wall time
(decode, forward pass, NMS and explain pass included). pytorch-grad-cam 1.5.7's GradCAM runs on an Ultralytics
YOLOv8n built from yolov8n.yaml (seeded random weights: the same architecture and size; timing does not depend on the
values) at the same input, as its users run it: target layer model.model[15], a callable box-score target
`out[4 + c, a]`, one call per request (4 targets: the image repeated 4 times, its batched form). The PyTorch forward
alone is timed too. Prints a Markdown table of medians and ratios.
"""

import argparse
import urllib.parse
import os
import pathlib
import subprocess
import tempfile
import time
import urllib.request

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="ultralytics-cfg-"))

import torch  # noqa: E402
from pytorch_grad_cam import GradCAM  # noqa: E402

from multipass import median_s, post  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIX = ROOT / "tests/fixtures/detection"
LAYER = "/model.15/cv2/act/Mul_output_0"


def camserve_times(png, threads, n):
    port = 18741
    env = dict(os.environ, CAMSERVE_RUNTIME__THREADS=str(threads), CAMSERVE_RUNTIME__DEVICE="cpu")
    proc = subprocess.Popen([str(ROOT / "target/release/camserve"), "serve", "--bind", f"127.0.0.1:{port}", "--model",
                             f"yolo={FIX / 'yolov8n_320_dynbatch.onnx'}"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1)
                break
            except Exception:
                time.sleep(0.2)
        base = f"http://127.0.0.1:{port}/v1/models/yolo"
        out = {}
        out["predict (detections only)"] = median_s(lambda: post(f"{base}/predict", png), n)
        for k in (1, 4):
            q = f"{base}/explain?methods=gradcam&outputs=raw&layer={urllib.parse.quote(LAYER)}&top_k={k}"
            answer = post(q, png)
            assert len(answer["explanations"]) == k, answer
            out[f"Grad-CAM, {k} detection{'s' if k > 1 else ''}"] = median_s(lambda q=q: post(q, png), n)
        return out
    finally:
        proc.terminate()
        proc.wait()


def pytorch_times(threads, n):
    from ultralytics import YOLO

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = YOLO("yolov8n.yaml").model.eval()

    class Scores(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(x)[0]

    wrapped = Scores(model).eval()
    x = torch.rand(1, 3, 320, 320)
    with torch.no_grad():
        out = wrapped(x)[0]
    a = int(out[4:].amax(0).argmax())
    c = int(out[4:, a].argmax())
    cam = GradCAM(model=wrapped, target_layers=[model.model[15]])
    res = {"PyTorch forward": median_s(lambda: wrapped(x), n)}
    for k in (1, 4):
        xs = x.repeat(k, 1, 1, 1)
        targets = [lambda o, c=c, a=a: o[4 + c, a]] * k
        res[f"Grad-CAM, {k} detection{'s' if k > 1 else ''}"] = median_s(lambda xs=xs, targets=targets: cam(input_tensor=xs, targets=targets), n)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    png = (FIX / "photos/rocket.png").read_bytes()
    cs = camserve_times(png, args.threads, args.n)
    pt = pytorch_times(args.threads, args.n)
    print(f"median of {args.n}, {args.threads} threads, YOLOv8n 320x320, CPU")
    print()
    print("| request | camserve (HTTP, ms) | pytorch-grad-cam (in process, ms) | ratio camserve / pytorch-grad-cam |")
    print("|---|---|---|---|")
    print(f"| forward only | {cs['predict (detections only)'] * 1e3:.1f} (predict: decode, forward, NMS) | {pt['PyTorch forward'] * 1e3:.1f} (forward) | {cs['predict (detections only)'] / pt['PyTorch forward']:.2f} |")
    for k in ("Grad-CAM, 1 detection", "Grad-CAM, 4 detections"):
        print(f"| {k} | {cs[k] * 1e3:.1f} | {pt[k] * 1e3:.1f} | {cs[k] / pt[k]:.2f} |")
    extra_c = (cs["Grad-CAM, 4 detections"] - cs["Grad-CAM, 1 detection"]) / 3
    extra_p = (pt["Grad-CAM, 4 detections"] - pt["Grad-CAM, 1 detection"]) / 3
    print(f"| each extra detection | {extra_c * 1e3:.1f} | {extra_p * 1e3:.1f} | {extra_c / extra_p:.2f} |")


if __name__ == "__main__":
    main()
