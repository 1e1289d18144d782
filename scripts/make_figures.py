#!/usr/bin/env python3
"""Regenerates the README's pictures with camserve itself (`camserve explain`), composed with Pillow.

    cargo build --release && python3 scripts/make_figures.py

docs/images/demo-output.png: the demo model on a held-out shapes picture.
docs/images/methods-grid.png: six methods on three held-out pictures (the demo model).
docs/images/methods-photos.png: the same six methods on the bundled real photos, still with the demo model (it
knows only shapes, so the maps show what it takes for a shape in a photo).

With an ImageNet classifier of your own, the grid on the bundled real photos:
    python3 scripts/make_figures.py --model resnet50.onnx --labels imagenet.txt \
        --photos assets/photos/chelsea.jpg assets/photos/coffee.jpg --out docs/images/methods-photos.png
(The repository's pictures use the demo model: no pretrained ImageNet weights can be fetched from the package
registries these machines reach.)
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


def methods_grid(model=None, labels=None, pictures=None, path=None):
    methods = ["gradcam", "gradcam++", "layercam", "guided_backprop", "guided_gradcam", "deconvnet"]
    size, pad, text_h = 160, 6, 18
    if model is None:
        model, labels = ROOT / "models/demo.onnx", ROOT / "models/demo.labels.txt"
    pictures = pictures or [ROOT / "tests/data/shapes" / n for n in ["001.jpg", "005.jpg", "009.jpg"]]
    path = path or ROOT / "docs/images/methods-grid.png"
    out = Image.new("RGB", ((len(methods) + 1) * (size + pad) + pad, len(pictures) * (size + pad) + pad + text_h), (255, 255, 255))
    d = ImageDraw.Draw(out)
    for col, label in enumerate(["input"] + methods):
        d.text((pad + col * (size + pad) + 2, 3), label, fill=(0, 0, 0))
    for row, image in enumerate(pictures):
        r = explain(model, image, methods, ["--labels", str(labels)] if labels else [])
        ex = {e["method"]: e for e in r["explanations"]}
        y = text_h + pad + row * (size + pad)
        picture = Image.open(image).convert("RGB")
        # Small synthetic pictures stay crisp; camera photos are scaled smoothly.
        out.paste(picture.resize((size, size), Image.NEAREST if picture.width <= size else Image.BILINEAR), (pad, y))
        for col, m in enumerate(methods, start=1):
            key = "heatmap_png" if m in ("guided_backprop", "guided_gradcam", "deconvnet") else "overlay_png"
            out.paste(png(ex[m][key]).resize((size, size), Image.NEAREST), (pad + col * (size + pad), y))
    out.save(path, optimize=True)
    print(f"wrote {path}")


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=pathlib.Path)
    ap.add_argument("--labels", type=pathlib.Path)
    ap.add_argument("--photos", type=pathlib.Path, nargs="+")
    ap.add_argument("--out", type=pathlib.Path)
    a = ap.parse_args()
    if not EXE.exists():
        sys.exit("build first: cargo build --release")
    if a.model:
        methods_grid(a.model, a.labels, a.photos, a.out or ROOT / "docs/images/methods-photos.png")
    else:
        demo_figure()
        methods_grid()
        photos = [ROOT / "assets/photos" / n for n in ["chelsea.jpg", "coffee.jpg", "astronaut.jpg"]]
        methods_grid(pictures=photos, path=ROOT / "docs/images/methods-photos.png")
