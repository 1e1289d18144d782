#!/usr/bin/env python3
"""D-RISE on a detector: camserve against Microsoft's vision-explanation-methods (the reference tests/drise.rs checks
it against), one session, CPU.

    /work/venv-drise/bin/python bench/drise.py [--masks 200] [--n 3] [--threads 2]     (needs a release build)

Both explain the best detection of tests/fixtures/detection/photos/rocket.png with the YOLOv8n fixture
(tests/fixtures/detection/yolov8n_320_dynbatch.onnx, ONNX Runtime on both sides with `--threads` intra-op threads),
`--masks` masks of 16 x 16 cells, the masked images' detections at conf 0.25 with class-wise NMS at 0.7:

- camserve: `methods=drise&masks=M&seed=0`, one HTTP request at a time, the client's wall time (decode, letterbox,
  the forward pass, NMS, the masked batches of 8, the fusion and a heatmap PNG included), then the same with 1,000
  masks (the paper's count);
- the reference: `DRISE_saliency` as it is (its own mask generator, one masked image per `predict`), with the ONNX
  Runtime wrapper of tests/fixtures/drise/make_drise_fixture.py, on the letterboxed input, one target.

Prints a Markdown table of medians (first call of each excluded) and the ratio.
"""

import argparse
import importlib.util
import pathlib
import sys
import time

import numpy as np
import onnxruntime as ort
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from multipass import camserve_times, median_s  # noqa: E402

FIX = ROOT / "tests/fixtures"


def reference_time(masks, threads, n):
    spec = importlib.util.spec_from_file_location("make_drise_fixture", FIX / "drise/make_drise_fixture.py")
    fixture = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fixture)
    from vision_explanation_methods.explanations import drise

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(FIX / "detection/yolov8n_320_dynbatch.onnx"), opts, providers=["CPUExecutionProvider"])
    model = fixture.YoloOnnxDRiseWrapper(session, conf=0.25)
    image = torch.from_numpy(np.load(FIX / "detection/letterbox.npz")["3"])
    targets = model.predict(image)[0]
    best = fixture.DetectionRecord(
        bounding_boxes=targets.bounding_boxes[:1], objectness_scores=targets.objectness_scores[:1], class_scores=targets.class_scores[:1]
    )

    def once():
        torch.manual_seed(0)
        out = drise.DRISE_saliency(model=model, image_tensor=image, target_detections=[best], number_of_masks=masks,
                                   mask_res=(16, 16), mask_padding=20, device="cpu", verbose=False)
        assert out and out[0], "no saliency"

    t = median_s(once, n)
    print(f"  reference {masks} masks: {t:.2f} s", flush=True)
    return t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--masks", type=int, default=200)
    ap.add_argument("--n", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    png = (FIX / "detection/photos/rocket.png").read_bytes()
    requests = [
        (f"{a.masks}", f"methods=drise&masks={a.masks}&seed=0", lambda n: n),
        ("1000", "methods=drise&masks=1000&seed=0", lambda n: max(2, n - 1)),
    ]
    ours = camserve_times(FIX / "detection/yolov8n_320_dynbatch.onnx", png, requests, a.threads, a.n, 8)
    ref = reference_time(a.masks, a.threads, max(2, a.n - 1))
    print()
    print(f"| D-RISE, YOLOv8n 320, best detection, {a.threads} threads | camserve | vision-explanation-methods 0.1.1 | camserve / reference |")
    print("|---|---|---|---|")
    print(f"| {a.masks} masks | {ours[str(a.masks)]:.2f} s | {ref:.2f} s | {ours[str(a.masks)] / ref:.2f}x |")
    print(f"| 1,000 masks | {ours['1000']:.2f} s | (not run: {1000 / a.masks:.0f}x the masks) | |")
    print(f"({time.strftime('%Y-%m-%d %H:%M')})")


if __name__ == "__main__":
    main()
