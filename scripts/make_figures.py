#!/usr/bin/env python3
"""Regenerates the README's pictures with camserve itself (`camserve explain`), composed with Pillow.

    cargo build --release && python3 scripts/make_figures.py

docs/images/demo-output.png: the demo model on a held-out shapes picture (the pointing-game task).
docs/images/methods-grid.png: six methods on three held-out pictures (the demo model).
docs/images/methods-photos.png: the same six methods on bundled real photos with the bundled ImageNet model
(EfficientNet-Lite0, `--model imagenet`).
docs/images/side-by-side.png: a cat and a coffee side by side, Grad-CAM and guided backprop for each class.
docs/images/detector.png: the bundled detector (`shapes`) on a held-out scene: its boxes, then each box's HiResCAM
(the detector default) and Grad-CAM at the default layer.

With a classifier of your own, the grid on any photos:
    python3 scripts/make_figures.py --model resnet50.onnx --labels imagenet.txt \
        --photos assets/photos/chelsea.jpg assets/photos/coffee.jpg --out my-grid.png
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
        subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL, cwd=ROOT)
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


def methods_grid(model=None, labels=None, pictures=None, path=None, extra=()):
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
        r = explain(model, image, methods, (["--labels", str(labels)] if labels else []) + list(extra))
        top = r["predictions"][0]
        ex = {e["method"]: e for e in r["explanations"]}
        y = text_h + pad + row * (size + pad)
        picture = Image.open(image).convert("RGB")
        # Small synthetic pictures stay crisp; camera photos are scaled smoothly.
        out.paste(picture.resize((size, size), Image.NEAREST if picture.width <= size else Image.BILINEAR), (pad, y))
        d.rectangle([pad, y + size - 16, pad + size - 1, y + size - 1], fill=(0, 0, 0))
        d.text((pad + 3, y + size - 14), f"{top['label']} {top['score']:.2f}", fill=(255, 255, 255))
        for col, m in enumerate(methods, start=1):
            key = "heatmap_png" if m in ("guided_backprop", "guided_gradcam", "deconvnet") else "overlay_png"
            out.paste(png(ex[m][key]).resize((size, size), Image.NEAREST), (pad + col * (size + pad), y))
    out.save(path, optimize=True)
    print(f"wrote {path}")


def side_by_side(path=ROOT / "docs/images/side-by-side.png"):
    """A cat and a coffee side by side (each stretched to 224x224 on a grey 448x448 square, as in
    tests/imagenet.rs); Grad-CAM and guided backprop for each of the two classes."""
    canvas = Image.new("RGB", (448, 448), (128, 128, 128))
    for name, x in [("chelsea.jpg", 0), ("coffee.jpg", 224)]:
        canvas.paste(Image.open(ROOT / "assets/photos" / name).convert("RGB").resize((224, 224), Image.BILINEAR), (x, 112))
    with tempfile.TemporaryDirectory() as d:
        image = pathlib.Path(d) / "pair.png"
        canvas.save(image)
        r = explain("imagenet", image, ["gradcam", "guided_backprop"], ["--target", "Egyptian cat", "--target", "espresso", "--size", "original"])
    ex = {(e["method"], e["target"]["label"]): e for e in r["explanations"]}
    size = 224
    tiles, labels = [canvas], ["input"]
    for cls in ["Egyptian cat", "espresso"]:
        e = ex[("gradcam", cls)]
        tiles.append(annotate(png(e["overlay_png"]), e, 1))
        labels.append(f"Grad-CAM: {cls}")
    for cls in ["Egyptian cat", "espresso"]:
        tiles.append(png(ex[("guided_backprop", cls)]["heatmap_png"]))
        labels.append(f"guided backprop: {cls}")
    grid([t.resize((size, size), Image.BILINEAR) for t in tiles], labels, size, path)


def detector_figure(scene="009.jpg", path=ROOT / "docs/images/detector.png"):
    """Per-box explanations: the three best detections of a held-out scene, each with its box drawn, HiResCAM
    (which keeps the gradient's position) and Grad-CAM (which averages it over the map) at the default layer."""
    image = ROOT / "tests/data/scenes" / scene
    r = explain("shapes", image, ["hirescam", "gradcam"], ["--top-k", "3", "--size", "original"])
    dets = r["detections"]
    size = 256
    boxed = Image.open(image).convert("RGB")
    d = ImageDraw.Draw(boxed)
    for det in dets:
        b = det["box"]
        d.rectangle([b["x"], b["y"], b["x"] + b["width"], b["y"] + b["height"]], outline=(255, 212, 0), width=2)
        d.text((b["x"] + 3, b["y"] + 2), f"#{det['index']} {det['label']}", fill=(255, 212, 0))
    tiles, labels = [boxed], [f"input: {len(dets)} detections"]
    for method, name in [("hirescam", "HiResCAM"), ("gradcam", "Grad-CAM")]:
        for e in [e for e in r["explanations"] if e["method"] == method]:
            det = dets[e["target"]["detection"]]
            t = png(e["overlay_png"])
            b = det["box"]
            dd = ImageDraw.Draw(t)
            dd.rectangle([b["x"], b["y"], b["x"] + b["width"], b["y"] + b["height"]], outline=(255, 212, 0), width=2)
            p = e["peak"]
            dd.ellipse([p["x"] - 5, p["y"] - 5, p["x"] + 5, p["y"] + 5], outline=(255, 255, 255), width=2)
            tiles.append(t)
            labels.append(f"{name}: #{det['index']} {det['label']} {det['score']:.2f}")
    grid(tiles, labels, size, path)


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
        photos = [ROOT / "assets/photos" / n for n in ["chelsea.jpg", "coffee.jpg", "rocket.jpg"]]
        # At the upload's size: the maps cover the centre crop the model saw; the margins it did not see stay cold.
        methods_grid("imagenet", None, photos, ROOT / "docs/images/methods-photos.png", ["--size", "original"])
        side_by_side()
        detector_figure()
