#!/usr/bin/env python3
"""Trains camserve's bundled demo model: a small CNN that names the shape in a cluttered picture.

The task is synthetic and generated here (seeded): a 64x64 RGB picture with one object (circle, square,
triangle, star, cross or hexagon) at a random position, scale, rotation and colour on a cluttered background
(colour gradient, noise, lines, dots). The class is the object's shape. Because each object's box is known,
explanation quality is measurable: `tests/pointing_game.rs` checks that Grad-CAM's peak falls inside the box.

Writes, next to this script:
  demo.onnx            the model (opset 17, dynamic batch), about 0.3 MB
  demo.labels.txt      one label per line
  demo.metrics.json    test accuracy and training settings
  ../tests/data/shapes/NNN.jpg + boxes.json   200 held-out pictures for the pointing game

Needs torch and pillow. Takes a few minutes on two CPU cores:
    python3 models/train_demo.py
"""

import io
import json
import math
import pathlib
import time

import numpy as np
import torch
import torch.nn as nn
from PIL import Image, ImageDraw, ImageFilter

HERE = pathlib.Path(__file__).resolve().parent
HELDOUT = HERE.parent / "tests" / "data" / "shapes"
SIZE = 64
LABELS = ["circle", "square", "triangle", "star", "cross", "hexagon"]
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]


def polygon(kind, cx, cy, r, angle):
    if kind == "square":
        pts = [(math.cos(angle + k * math.pi / 2 + math.pi / 4), math.sin(angle + k * math.pi / 2 + math.pi / 4)) for k in range(4)]
    elif kind == "triangle":
        pts = [(math.cos(angle + k * 2 * math.pi / 3), math.sin(angle + k * 2 * math.pi / 3)) for k in range(3)]
    elif kind == "hexagon":
        pts = [(math.cos(angle + k * math.pi / 3), math.sin(angle + k * math.pi / 3)) for k in range(6)]
    elif kind == "star":
        pts = []
        for k in range(10):
            rr = 1.0 if k % 2 == 0 else 0.42
            pts.append((rr * math.cos(angle + k * math.pi / 5), rr * math.sin(angle + k * math.pi / 5)))
    elif kind == "cross":
        w = 0.33
        base = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)]
        ca, sa = math.cos(angle), math.sin(angle)
        pts = [(x * ca - y * sa, x * sa + y * ca) for x, y in base]
    else:
        raise ValueError(kind)
    return [(cx + r * x, cy + r * y) for x, y in pts]


def make_image(rng):
    """Returns (PIL image, class index, box (x0, y0, x1, y1) in pixels)."""
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    t = np.linspace(0, 1, SIZE)[None, :, None] if rng.random() < 0.5 else np.linspace(0, 1, SIZE)[:, None, None]
    bg = c0 * (1 - t) + c1 * t
    bg = np.broadcast_to(bg, (SIZE, SIZE, 3)) + rng.normal(0, 18, (SIZE, SIZE, 3))
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    for _ in range(rng.integers(3, 9)):  # clutter: lines
        pts = [tuple(rng.uniform(0, SIZE, 2)) for _ in range(2)]
        d.line(pts, fill=tuple(int(v) for v in rng.uniform(0, 255, 3)), width=int(rng.integers(1, 3)))
    for _ in range(rng.integers(2, 8)):  # clutter: dots
        x, y = rng.uniform(0, SIZE, 2)
        r = rng.uniform(1, 3)
        d.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in rng.uniform(0, 255, 3)))
    cls = int(rng.integers(len(LABELS)))
    r = rng.uniform(8, 20)
    cx, cy = rng.uniform(r + 1, SIZE - r - 1, 2)
    colour = tuple(int(v) for v in rng.uniform(0, 255, 3))
    if LABELS[cls] == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour, outline=(0, 0, 0) if rng.random() < 0.5 else None)
        box = (cx - r, cy - r, cx + r, cy + r)
    else:
        pts = polygon(LABELS[cls], cx, cy, r, rng.uniform(0, 2 * math.pi))
        d.polygon(pts, fill=colour, outline=(0, 0, 0) if rng.random() < 0.5 else None)
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        box = (min(xs), min(ys), max(xs), max(ys))
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(0.6))
    box = tuple(int(round(v)) for v in box)
    return img, cls, box


def jpeg_roundtrip(img, rng):
    """Uploads are mostly JPEGs: train on their artefacts too."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(rng.integers(60, 96)))
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def to_tensor(imgs):
    a = np.stack([np.asarray(i, dtype=np.float32) / 255.0 for i in imgs])
    a = (a - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
    return torch.from_numpy(a.transpose(0, 3, 1, 2).copy())


def block(cin, cout):
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class ShapeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            *block(3, 16), nn.MaxPool2d(2),
            *block(16, 32), nn.MaxPool2d(2),
            *block(32, 64), *block(64, 64),
        )
        self.fc = nn.Linear(64, len(LABELS))

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


def main():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    n_train, n_test = 12000, 1000
    t0 = time.time()
    train = [make_image(rng) for _ in range(n_train)]
    train = [(jpeg_roundtrip(im, rng) if rng.random() < 0.6 else im, c, b) for im, c, b in train]
    test = [make_image(rng) for _ in range(n_test)]
    test = [(jpeg_roundtrip(im, rng), c, b) for im, c, b in test]
    xtr, ytr = to_tensor([t[0] for t in train]), torch.tensor([t[1] for t in train])
    xte, yte = to_tensor([t[0] for t in test]), torch.tensor([t[1] for t in test])
    model = ShapeNet()
    epochs, batch = 16, 64
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * (n_train // batch))
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(n_train)
        for i in range(n_train // batch):
            idx = perm[i * batch:(i + 1) * batch]
            xb = xtr[idx]
            if epoch > 0:
                flip = torch.rand(len(idx)) < 0.5
                xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
            loss = nn.functional.cross_entropy(model(xb), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            acc = (model(xte).argmax(1) == yte).float().mean().item()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f} test accuracy {acc:.4f} ({time.time() - t0:.0f} s)", flush=True)

    model.eval()
    torch.onnx.export(
        model, xte[:1], str(HERE / "demo.onnx"), opset_version=17, dynamo=False,
        input_names=["image"], output_names=["logits"], dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}},
    )
    (HERE / "demo.labels.txt").write_text("\n".join(LABELS) + "\n")
    metrics = {
        "task": "synthetic shapes, 64x64, 6 classes, cluttered background; test pictures JPEG-compressed (quality 60-95)",
        "train_images": n_train, "test_images": n_test, "epochs": epochs,
        "test_accuracy": round(acc, 4), "seconds": round(time.time() - t0, 1),
        "mean": MEAN, "std": STD,
    }
    (HERE / "demo.metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

    # Held-out pictures for the pointing game (a different seed from training and test).
    HELDOUT.mkdir(parents=True, exist_ok=True)
    hrng = np.random.default_rng(12345)
    boxes = []
    for i in range(200):
        img, cls, box = make_image(hrng)
        name = f"{i:03d}.jpg"
        img.save(HELDOUT / name, quality=92)
        boxes.append({"file": name, "label": LABELS[cls], "box": box})
    (HELDOUT / "boxes.json").write_text(json.dumps(boxes, indent=1) + "\n")
    print(json.dumps(metrics))


if __name__ == "__main__":
    main()
