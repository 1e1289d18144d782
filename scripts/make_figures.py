#!/usr/bin/env python3
"""Regenerates the README's pictures with camserve itself (`camserve explain`), composed with Pillow.

    cargo build --release && python3 scripts/make_figures.py

docs/images/demo-output.png: the demo model on a held-out shapes picture.
docs/images/methods-grid.png: six methods on three held-out pictures (the demo model).
"""

import base64
import io
import json
import pathlib
import subprocess
import sys
import tempfile

from PIL import Image, ImageDraw

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXE = ROOT / "target" / "release" / "camserve"


def explain(model, image, methods, extra=()):
    with tempfile.TemporaryDirectory() as d:
        cmd = [str(EXE), "explain", "--model", str(model), "--image", str(image), "--out", d,
               "--outputs", "heatmap,overlay", *extra]
        for m in methods:
            cmd += ["--method", m]
        subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL)
        return json.loads((pathlib.Path(d) / "explanation.json").read_text())


def png(b64):
    return Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")


def annotate(img, e, scale):
    d = ImageDraw.Draw(img)
    if e.get("bbox"):
        b = e["bbox"]
        d.rectangle([b["x"] * scale, b["y"] * scale, (b["x"] + b["width"]) * scale - 1, (b["y"] + b["height"]) * scale - 1], outline=(255, 255, 255), width=2)
    p = e["peak"]
    cx, cy = (p["x"] + 0.5) * scale, (p["y"] + 0.5) * scale
    d.ellipse([cx - 5, cy - 5, cx + 5, cy + 5], outline=(255, 255, 255), width=2)
    return img


def grid(tiles, labels, size, path):
    pad, text_h = 6, 18
    out = Image.new("RGB", (len(tiles) * (size + pad) + pad, size + 2 * pad + text_h), (255, 255, 255))
    d = ImageDraw.Draw(out)
    for i, (t, l) in enumerate(zip(tiles, labels)):
        x = pad + i * (size + pad)
        out.paste(t.resize((size, size), Image.NEAREST if t.width < size else Image.BILINEAR), (x, pad))
        d.text((x + 2, size + pad + 3), l, fill=(0, 0, 0))
    out.save(path, optimize=True)
    print(f"wrote {path.relative_to(ROOT)}")


def demo_figure():
    image = ROOT / "tests/data/shapes/000.jpg"
    r = explain(ROOT / "models/demo.onnx", image, ["gradcam", "guided_backprop", "guided_gradcam"],
                ["--labels", str(ROOT / "models/demo.labels.txt")])
    ex = {e["method"]: e for e in r["explanations"]}
    size, scale = 192, 3
    top = r["predictions"][0]
    tiles = [
        Image.open(image).convert("RGB"),
        annotate(png(ex["gradcam"]["overlay_png"]).resize((size, size), Image.NEAREST), ex["gradcam"], scale),
        png(ex["guided_backprop"]["heatmap_png"]),
        png(ex["guided_gradcam"]["heatmap_png"]),
    ]
    labels = [f"input: {top['label']} {top['score']:.2f}", "Grad-CAM overlay, peak, box", "guided backprop", "guided Grad-CAM"]
    grid(tiles, labels, size, ROOT / "docs/images/demo-output.png")


def methods_grid():
    methods = ["gradcam", "gradcam++", "layercam", "guided_backprop", "guided_gradcam", "deconvnet"]
    size, pad, text_h = 160, 6, 18
    pictures = ["001.jpg", "005.jpg", "009.jpg"]
    out = Image.new("RGB", ((len(methods) + 1) * (size + pad) + pad, len(pictures) * (size + pad) + pad + text_h), (255, 255, 255))
    d = ImageDraw.Draw(out)
    for col, label in enumerate(["input"] + methods):
        d.text((pad + col * (size + pad) + 2, 3), label, fill=(0, 0, 0))
    for row, name in enumerate(pictures):
        image = ROOT / "tests/data/shapes" / name
        r = explain(ROOT / "models/demo.onnx", image, methods, ["--labels", str(ROOT / "models/demo.labels.txt")])
        ex = {e["method"]: e for e in r["explanations"]}
        y = text_h + pad + row * (size + pad)
        out.paste(Image.open(image).convert("RGB").resize((size, size), Image.NEAREST), (pad, y))
        for col, m in enumerate(methods, start=1):
            key = "heatmap_png" if m in ("guided_backprop", "guided_gradcam", "deconvnet") else "overlay_png"
            out.paste(png(ex[m][key]).resize((size, size), Image.NEAREST), (pad + col * (size + pad), y))
    path = ROOT / "docs/images/methods-grid.png"
    out.save(path, optimize=True)
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    if not EXE.exists():
        sys.exit("build first: cargo build --release")
    demo_figure()
    methods_grid()
