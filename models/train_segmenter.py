#!/usr/bin/env python3
"""Trains camserve's bundled semantic segmenter: a small encoder-decoder CNN that labels every pixel of a cluttered
scene as background or one of the six shapes.

The task is synthetic and generated here (seeded), from the detector's scenes (train_detector.py): a 256x256 RGB
scene on a cluttered background (colour gradient, noise, lines, dots) with 1 to 4 objects (circle, square,
triangle, star, cross, hexagon; boxes about 24..110 px, random colours and rotations, limited overlap). make_scene()
does not return the polygons, so `make_seg_scene()` below is a copy of it that makes the same random draws in the
same order (the picture is pixel-identical to train_detector.make_scene's for the same generator state; checked at
start-up) and ALSO rasterises each object, with the same ImageDraw call (same polygon or ellipse, same outline
flag, same order: later objects overwrite earlier ones) into an 8-bit 'L' label map (pixel = class index, 0 =
background, 1 + train_demo.LABELS index for the shapes) and an instance map (for the objects' visible pixel counts).
The optional blur of the picture is not applied to the label map.

Classes (7): background, circle, square, triangle, star, cross, hexagon.

The network (`ShapesSegmenter`, 323k parameters) is laid out so that camserve finds its default layer by walking
back from the output through the final Resize to the last Conv (the classifier), whose input is the layer:
  - encoder: conv-BN-ReLU stages to strides 2, 4, 8 and 16 (`stem`, `enc4`, `enc8`, `enc16`; 16, 32, 64, 96
    channels; the stride-16 stage ends with a dilated 3x3 for context);
  - `lateral`: a 1x1 conv-BN-ReLU (96 -> 32) on the stride-16 map, upsampled bilinearly to stride 4 (64x64);
  - `decoder`: concatenation with the stride-4 map (32 + 32), then one 3x3 conv-BN-ReLU with 48 channels; its
    ReLU output ([N, 48, 64, 64], ONNX tensor `/decoder/conv/conv.2/Relu_output_0`) is the feature map
    explanations read;
  - `classifier`: one 1x1 Conv (48 -> 7), then F.interpolate to 256x256 (bilinear, align_corners=False): the ONNX
    graph ends Conv -> Resize -> `out`.
  - input `input` float32 [N, 3, 256, 256], RGB, ImageNet mean/std normalisation of pixel / 255 (camserve's default
    preprocessing: stretch resize, then mean/std); output `out` float32 [N, 7, 256, 256], logits (no softmax).
Training: 6000 scenes (1-5 objects, 60 % JPEG-compressed at quality 60-95), pixel-wise cross-entropy, AdamW +
OneCycle (max LR 4e-3), batch 16, flips and transposes (the dihedral group: the classes do not change). Training
runs on the clock for TRAIN_BUDGET_S (12 minutes; at most MAX_EPOCHS epochs): the LR follows OneCycle's shape in
elapsed / budget, the first 40 % of the time trains on random 160x160 windows of the scenes (the network is fully
convolutional; a window costs about 40 % of a scene) and the rest on whole scenes. So the data, the
batches and the augmentations are seeded and deterministic, but the number of steps (and so the weights) depends
on the machine's speed; the metrics file records it. One intra-op thread (THREADS): on the two
shared cores two threads were 2-5x slower (a first run with 2 threads got only 312 steps into the budget and
reached mIoU 0.16).
Evaluation: 300 held-out scenes (their own seed, 1-4 objects, all JPEG-compressed at quality 60-95): pixel
accuracy, per-class IoU (TP / (TP + FP + FN) over all pixels of the set) and mIoU (mean over the 7 classes).
Measured on the run that wrote the bundled files (2026-12-06, 2077 steps = 5.5 epochs in 721 s, 1297 of them on
windows): on the 300 held-out scenes mIoU 0.757 (shapes only 0.718), pixel accuracy 0.985, IoU background 0.992,
circle 0.773, square 0.798, triangle 0.707, star 0.564, cross 0.755, hexagon 0.711 (below the 0.8 aimed at: the
budget allows too few steps); on the 40 saved scenes mIoU 0.805, pixel accuracy 0.984. ONNX vs PyTorch: max abs
difference of the logits 1.0e-05, same labels for all pixels of 8 pictures.

Writes, next to this script:
  shapes_segmenter.onnx          the model (opset 17, dynamic batch)
  shapes_segmenter.labels.txt    one label per line, 7 lines, `background` first
  shapes_segmenter.metrics.json  mIoU, per-class IoU and pixel accuracy on the 300 held-out scenes (and on the 40
                                 saved ones), ONNX vs PyTorch difference, training settings, seeds, seconds
  ../tests/data/seg_scenes/NNN.png, NNN_labels.png, objects.json   40 held-out scenes (lossless PNG) with their
                                 ground-truth label maps (8-bit, pixel = class index) and objects.
The 40 saved scenes: candidates come from make_seg_scene(np.random.default_rng(SEED_SAVED)) one after the other
(1-4 objects, no JPEG); a candidate is kept when it has at least 2 objects AND (it has two or more objects of the
same class OR fewer than 20 scenes without a repeated class have been kept so far); generation stops at 40 kept
scenes. So at least 20 of the 40 contain a repeated class. objects.json lists per scene, in drawing order (later
objects are drawn over earlier ones), each object's `class` (its pixel value in the label map, 1-6), `label`, `box`
[x, y, width, height] (the polygon's / circle's bounding box, rounded to integers and clipped to the image) and
`pixels` (its visible pixel count in the ground truth, i.e. not covered by later objects).

Needs torch, numpy, pillow, onnx and onnxruntime. Takes about 15 minutes on two shared CPU cores (about 1 minute
to generate the scenes, at most 12 minutes of training, 1-2 minutes of evaluation and export):
    /work/venv-det/bin/python models/train_segmenter.py [--weights /tmp/shapes_segmenter.pt]
"""

import json
import math
import pathlib
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import train_demo  # noqa: E402  (LABELS, MEAN, STD, jpeg_roundtrip())
import train_detector  # noqa: E402  (background(), shape_points(), box_of(), box_iou_np(), make_scene())

SEG_SCENES = HERE.parent / "tests" / "data" / "seg_scenes"
SIZE = train_detector.SIZE  # 256
SHAPES = train_demo.LABELS  # circle, square, triangle, star, cross, hexagon
CLASSES = ["background"] + SHAPES
NCLS = len(CLASSES)
MEAN, STD = train_demo.MEAN, train_demo.STD
# Seeds: training scenes, the 300 evaluation scenes, the saved-scene candidates, torch.
SEED_TRAIN, SEED_EVAL, SEED_SAVED, SEED_TORCH = 0, 1777, 4242, 0
N_TRAIN, N_EVAL, N_SAVED, MIN_REPEATED = 6000, 300, 40, 20
BATCH, LR, WEIGHT_DECAY = 16, 4e-3, 1e-4
MAX_OBJECTS_TRAIN = 5
MAX_EPOCHS = 8
CROP, CROP_TIME = 160, 0.4  # the first 40 % of the training time on random 160x160 windows
TRAIN_BUDGET_S = 12 * 60
OUT = HERE
# One intra-op thread: on the two cores shared with other work (load average 4-5 while this was written), two
# OpenMP threads made a training step 2-5x SLOWER than one (measured: 256x256 batch 1.1-2.2 s vs 0.4-0.9 s).
THREADS = 1

# ---------------------------------------------------------------------------------------------------------------
# Scenes


def make_seg_scene(rng, max_objects=4):
    """train_detector.make_scene with the same random draws, plus the ground truth. Returns (PIL RGB image,
    label map uint8 [SIZE, SIZE] (class index 0-6), instance map uint8 (0 = background, k = k-th drawn object),
    objects [(class index 1-6, box (x0, y0, x1, y1) rounded), ...] in drawing order)."""
    nc = len(SHAPES)
    img, base = train_detector.background(rng)
    objects = []  # (r, cls, cx, cy, angle, pts, box)
    for _ in range(int(rng.integers(1, max_objects + 1))):
        cls = int(rng.integers(nc))
        for _try in range(30):
            r = float(np.exp(rng.uniform(math.log(13), math.log(55))))
            cx, cy = rng.uniform(r + 1, SIZE - r - 1, 2)
            angle = rng.uniform(0, 2 * math.pi)
            pts = train_detector.shape_points(SHAPES[cls], cx, cy, r, angle)
            box = train_detector.box_of(SHAPES[cls], cx, cy, r, pts)
            ious = [train_detector.box_iou_np(box, o[6]) for o in objects]
            if all(max(a / 0.3, b / 0.5) < 1 for a, b in ious):
                objects.append((r, cls, cx, cy, angle, pts, box))
                break
    label = Image.new("L", (SIZE, SIZE), 0)
    inst = Image.new("L", (SIZE, SIZE), 0)
    d, dl, di = ImageDraw.Draw(img), ImageDraw.Draw(label), ImageDraw.Draw(inst)
    found = []
    for k, (r, cls, cx, cy, angle, pts, box) in enumerate(sorted(objects, key=lambda o: -o[0])):
        local = base[int(cy), int(cx)]
        for _try in range(20):
            colour = rng.uniform(0, 255, 3)
            if np.linalg.norm(colour - local) >= 60:
                break
        colour = tuple(int(v) for v in colour)
        has_outline = rng.random() < 0.5
        outline = (0, 0, 0) if has_outline else None
        for draw, fill in ((d, colour), (dl, cls + 1), (di, k + 1)):
            o = (outline if draw is d else fill) if has_outline else None
            if pts is None:
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=o)
            else:
                draw.polygon(pts, fill=fill, outline=o)
        found.append((cls + 1, tuple(int(round(v)) for v in box)))
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 1.0))))
    return img, np.asarray(label).copy(), np.asarray(inst).copy(), found


def make_seg_set(seed, n, jpeg_p, max_objects=4):
    rng = np.random.default_rng(seed)
    images = np.empty((n, SIZE, SIZE, 3), np.uint8)
    labels = np.empty((n, SIZE, SIZE), np.uint8)
    for i in range(n):
        img, lab, _, _ = make_seg_scene(rng, max_objects)
        if rng.random() < jpeg_p:
            img = train_demo.jpeg_roundtrip(img, rng)
        images[i], labels[i] = np.asarray(img), lab
    return images, labels


def check_same_as_detector(seed=123, n=5):
    """The pictures must be pixel-identical to train_detector.make_scene's (same draws, same order)."""
    r1, r2 = np.random.default_rng(seed), np.random.default_rng(seed)
    for _ in range(n):
        a, objs_a = train_detector.make_scene(r1)
        b, _, _, objs_b = make_seg_scene(r2)
        assert np.array_equal(np.asarray(a), np.asarray(b)), "make_seg_scene drifted from train_detector.make_scene"
        assert [c for c, _ in objs_a] == [c - 1 for c, _ in objs_b] and [bx for _, bx in objs_a] == [bx for _, bx in objs_b]


_MEAN = torch.tensor(MEAN).view(1, 3, 1, 1)
_STD = torch.tensor(STD).view(1, 3, 1, 1)


def to_input(images_u8):
    """uint8 [N, H, W, 3] -> float32 [N, 3, H, W], (pixel / 255 - mean) / std (camserve's default preprocessing)."""
    x = torch.from_numpy(images_u8).permute(0, 3, 1, 2).float().div_(255.0)
    return (x - _MEAN) / _STD


# ---------------------------------------------------------------------------------------------------------------
# Model


def cbr(cin, cout, k=3, s=1, dilation=1):
    """Conv2d + BatchNorm2d + ReLU (the BN folds into the Conv in the ONNX export)."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, s, padding=dilation * (k // 2), dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class Decoder(nn.Module):
    """Concatenates the upsampled stride-16 map with the stride-4 map; one 3x3 conv-BN-ReLU (two cost too much CPU
    time at 64x64 for the 12-minute training budget)."""

    def __init__(self, cin, cout=48):
        super().__init__()
        self.conv = cbr(cin, cout)

    def forward(self, up, skip):
        return self.conv(torch.cat([up, skip], 1))


class ShapesSegmenter(nn.Module):
    def __init__(self, w=(16, 32, 64, 96), lat=32, dec=48):
        super().__init__()
        self.stem = cbr(3, w[0], 3, 2)  # /2
        self.enc4 = nn.Sequential(cbr(w[0], w[1], 3, 2), cbr(w[1], w[1]))  # /4
        self.enc8 = nn.Sequential(cbr(w[1], w[2], 3, 2), cbr(w[2], w[2]))  # /8
        self.enc16 = nn.Sequential(cbr(w[2], w[3], 3, 2), cbr(w[3], w[3]), cbr(w[3], w[3], dilation=2))  # /16
        self.lateral = cbr(w[3], lat, 1)
        self.decoder = Decoder(lat + w[1], dec)
        self.classifier = nn.Conv2d(dec, NCLS, 1)

    def forward(self, x):
        c4 = self.enc4(self.stem(x))
        c16 = self.enc16(self.enc8(c4))
        up = F.interpolate(self.lateral(c16), size=c4.shape[-2:], mode="bilinear", align_corners=False)
        y = self.classifier(self.decoder(up, c4))
        # To the input size: a constant (SIZE, SIZE) in the export; the training's crops use their own size.
        size = (SIZE, SIZE) if tuple(x.shape[-2:]) == (SIZE, SIZE) else tuple(x.shape[-2:])
        return F.interpolate(y, size=size, mode="bilinear", align_corners=False)


# ---------------------------------------------------------------------------------------------------------------
# Training and evaluation


def augment(xb, yb, gen):
    """Random transpose, horizontal and vertical flips, per picture (the same on the picture and its label map)."""
    xs, ys = [], []
    for x, y in zip(xb, yb):
        if torch.rand(1, generator=gen).item() < 0.5:
            x, y = x.transpose(1, 2), y.transpose(0, 1)
        if torch.rand(1, generator=gen).item() < 0.5:
            x, y = x.flip(2), y.flip(1)
        if torch.rand(1, generator=gen).item() < 0.5:
            x, y = x.flip(1), y.flip(0)
        xs.append(x)
        ys.append(y)
    return torch.stack(xs).contiguous(), torch.stack(ys).contiguous()


def predict(model, images, batch=50):
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            out.append(model(to_input(images[i:i + batch])).argmax(1).to(torch.uint8).numpy())
    return np.concatenate(out)


def seg_metrics(pred, gt):
    conf = np.bincount(gt.astype(np.int64).ravel() * NCLS + pred.astype(np.int64).ravel(), minlength=NCLS * NCLS).reshape(NCLS, NCLS)
    tp = np.diag(conf).astype(np.float64)
    iou = tp / np.maximum(1, conf.sum(0) + conf.sum(1) - tp)
    return {
        "mIoU": round(float(iou.mean()), 4),
        "mIoU_shapes": round(float(iou[1:].mean()), 4),
        "pixel_accuracy": round(float(tp.sum() / conf.sum()), 4),
        "IoU_per_class": {c: round(float(v), 4) for c, v in zip(CLASSES, iou)},
        "pixels_per_class": {c: int(v) for c, v in zip(CLASSES, conf.sum(1))},
    }


def train(model, train_x, train_y, eval_x, eval_y):
    gen = torch.Generator().manual_seed(SEED_TORCH)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}], lr=LR)
    steps_per_epoch = len(train_x) // BATCH

    def step(idx, crop):
        """One step on the scenes `idx`, on random crop x crop windows of them (crop == SIZE: whole scenes)."""
        xs, ys = train_x[idx], train_y[idx]
        if crop < SIZE:
            off = torch.randint(0, SIZE - crop + 1, (len(idx), 2), generator=gen).numpy()
            xs = np.stack([a[y:y + crop, x:x + crop] for a, (y, x) in zip(xs, off)])
            ys = np.stack([a[y:y + crop, x:x + crop] for a, (y, x) in zip(ys, off)])
        xb, yb = augment(to_input(xs), torch.from_numpy(ys).long(), gen)
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    # The schedule runs on the clock, not on a step count (the shared cores' speed changes by 2-3x within minutes,
    # so a step count estimated up front either overruns or wastes the budget): at each step the progress is
    # p = elapsed / TRAIN_BUDGET_S; the LR follows OneCycle's shape in p (cosine up from max_lr / 25 to max_lr over
    # the first 15 %, cosine down to max_lr / 25e4); the steps with p < CROP_TIME train on random CROP x CROP
    # windows, the later ones on whole scenes; training stops when p reaches 1 (or after MAX_EPOCHS epochs).
    def lr_at(p):
        lo, hi, end = LR / 25, LR, LR / 25e4
        if p < 0.15:
            return lo + (hi - lo) * (1 - math.cos(math.pi * p / 0.15)) / 2
        return end + (hi - end) * (1 + math.cos(math.pi * min(1.0, (p - 0.15) / 0.85))) / 2

    t0 = time.time()
    history = []
    done = crop_steps = epoch = 0
    p = 0.0
    while p < 1 and epoch < MAX_EPOCHS:
        model.train()
        perm = torch.randperm(len(train_x), generator=gen).numpy()
        total, n = 0.0, 0
        for i in range(steps_per_epoch):
            p = (time.time() - t0) / TRAIN_BUDGET_S
            if p >= 1:
                break
            for g in opt.param_groups:
                g["lr"] = lr_at(p)
            crop = CROP if p < CROP_TIME else SIZE
            crop_steps += crop < SIZE
            total += step(perm[i * BATCH:(i + 1) * BATCH], crop)
            done += 1
            n += 1
            if done % 200 == 0:
                print(f"  step {done} ({'crops' if crop < SIZE else 'scenes'}, lr {lr_at(p):.2e}): loss {total / n:.4f} ({time.time() - t0:.0f} s)", flush=True)
        epoch += 1
        if n == 0:
            break
        ev = seg_metrics(predict(model, eval_x[:60]), eval_y[:60])
        history.append({"epoch": epoch, "steps": n, "loss": round(total / n, 4), "mIoU_60": ev["mIoU"], "seconds": round(time.time() - t0, 1)})
        print(f"epoch {epoch}: {n} steps, loss {total / n:.4f} | 60 eval scenes: mIoU {ev['mIoU']:.4f} acc {ev['pixel_accuracy']:.4f} ({time.time() - t0:.0f} s)", flush=True)
    epochs = round(done / steps_per_epoch, 2)
    return {"epochs": epochs, "steps": done, "steps_per_epoch": steps_per_epoch, "crop": CROP, "crop_time_fraction": CROP_TIME, "crop_steps": crop_steps, "scene_steps": done - crop_steps, "history": history, "seconds": round(time.time() - t0, 1)}


# ---------------------------------------------------------------------------------------------------------------


def save_scenes(model):
    """The 40 saved held-out scenes (see the module docstring for the rule)."""
    SEG_SCENES.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED_SAVED)
    records, images, labels = [], [], []
    candidates = no_repeat = 0
    while len(records) < N_SAVED:
        img, lab, inst, objs = make_seg_scene(rng)
        candidates += 1
        classes = [c for c, _ in objs]
        repeated = len(set(classes)) < len(classes)
        if len(objs) < 2 or not (repeated or no_repeat < N_SAVED - MIN_REPEATED):
            continue
        no_repeat += not repeated
        i = len(records)
        img.save(SEG_SCENES / f"{i:03d}.png")
        Image.fromarray(lab, mode="L").save(SEG_SCENES / f"{i:03d}_labels.png")
        objects = []
        for k, (c, (x0, y0, x1, y1)) in enumerate(objs):
            x0, y0, x1, y1 = (min(SIZE, max(0, v)) for v in (x0, y0, x1, y1))
            objects.append({"class": c, "label": CLASSES[c], "box": [x0, y0, x1 - x0, y1 - y0], "pixels": int((inst == k + 1).sum())})
        records.append({"file": f"{i:03d}.png", "labels": f"{i:03d}_labels.png", "repeated_class": repeated, "objects": objects})
        images.append(np.asarray(Image.open(SEG_SCENES / f"{i:03d}.png").convert("RGB")))
        labels.append(np.asarray(Image.open(SEG_SCENES / f"{i:03d}_labels.png")))
    doc = {
        "classes": CLASSES,
        "rule": (f"candidates from make_seg_scene(np.random.default_rng({SEED_SAVED})) (1-4 objects, no JPEG), in order; a candidate "
                 f"is kept when it has >= 2 objects and (it has two or more objects of the same class, or fewer than "
                 f"{N_SAVED - MIN_REPEATED} scenes without a repeated class have been kept so far); stop at {N_SAVED}"),
        "candidates_generated": candidates,
        "scenes_with_repeated_class": sum(r["repeated_class"] for r in records),
        "object_fields": "class: pixel value in NNN_labels.png (1-6); box: [x, y, width, height] in pixels, the shape's bounding box rounded and clipped to the image; pixels: visible pixel count in the ground truth; objects in drawing order (later ones drawn over earlier ones)",
        "scenes": records,
    }
    (SEG_SCENES / "objects.json").write_text(json.dumps(doc, indent=1) + "\n")
    images, labels = np.stack(images), np.stack(labels)
    ev = seg_metrics(predict(model, images), labels)
    return ev, doc, images


def export(model, path):
    model.eval()
    torch.onnx.export(
        model, torch.zeros(1, 3, SIZE, SIZE), str(path), dynamo=False, opset_version=17,
        input_names=["input"], output_names=["out"],
        dynamic_axes={"input": {0: "batch"}, "out": {0: "batch"}},
    )
    m = onnx.load(str(path))
    meta = {
        "description": "camserve shapes segmenter: background + 6 synthetic shapes (circle, square, triangle, star, cross, hexagon) on cluttered 256x256 scenes; logits [N, 7, 256, 256]",
        "author": "camserve (generated by models/train_segmenter.py)",
        "license": "Apache-2.0",
        "task": "segment",
        "names": repr({i: n for i, n in enumerate(CLASSES)}),
    }
    del m.metadata_props[:]
    for k, v in meta.items():
        p = m.metadata_props.add()
        p.key, p.value = k, v
    # The exporter leaves the Resize output's dims symbolic: declare [batch, 7, 256, 256].
    dims = m.graph.output[0].type.tensor_type.shape.dim
    for d, v in zip(dims[1:], (NCLS, SIZE, SIZE)):
        d.Clear()
        d.dim_value = v
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    # The node chain at the output: out <- Resize <- Conv (the classifier) <- the decoder's ReLU.
    producer = {o: n for n in m.graph.node for o in n.output}
    resize = producer["out"]
    conv = producer[resize.input[0]]
    relu = producer[conv.input[0]]
    graph = {
        "output_chain": [conv.op_type, resize.op_type, "out"],
        "classifier_conv": conv.name, "resize": resize.name,
        "layer_tensor": conv.input[0], "layer_producer": f"{relu.op_type} {relu.name}",
    }
    assert graph["output_chain"][:2] == ["Conv", "Resize"] and relu.op_type == "Relu", graph
    return meta, graph


def main(weights=None):
    torch.manual_seed(SEED_TORCH)
    np.random.seed(SEED_TORCH)
    torch.set_num_threads(THREADS)
    t0 = time.time()
    check_same_as_detector()
    train_x, train_y = make_seg_set(SEED_TRAIN, N_TRAIN, jpeg_p=0.6, max_objects=MAX_OBJECTS_TRAIN)
    eval_x, eval_y = make_seg_set(SEED_EVAL, N_EVAL, jpeg_p=1.0)
    print(f"{N_TRAIN} training and {N_EVAL} evaluation scenes ({time.time() - t0:.0f} s)", flush=True)

    model = ShapesSegmenter()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params} parameters", flush=True)
    tr = train(model, train_x, train_y, eval_x, eval_y)
    del train_x, train_y

    model.eval()
    ev = seg_metrics(predict(model, eval_x), eval_y)
    print("eval 300:", json.dumps(ev), flush=True)
    ev_saved, doc, saved = save_scenes(model)
    print("saved 40:", json.dumps(ev_saved), flush=True)

    onnx_path = OUT / "shapes_segmenter.onnx"
    meta, graph = export(model, onnx_path)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    probe = to_input(np.concatenate([saved[:4], eval_x[:4]]))
    with torch.no_grad():
        ref = model(probe).numpy()
    got = sess.run(["out"], {"input": probe.numpy()})[0]
    onnx_check = {
        "pictures": len(probe),
        "max_abs_diff_logits": float(np.abs(ref - got).max()),
        "label_agreement": float((ref.argmax(1) == got.argmax(1)).mean()),
        "output_shape": list(got.shape),
    }
    print("ONNX vs PyTorch:", json.dumps(onnx_check), "graph:", json.dumps(graph), flush=True)
    (OUT / "shapes_segmenter.labels.txt").write_text("\n".join(CLASSES) + "\n")
    metrics = {
        "task": "semantic segmentation of synthetic scenes, 256x256, 1-4 of 6 shapes on a cluttered background (train_detector's scenes); 7 classes, background first; evaluation scenes JPEG-compressed (quality 60-95)",
        "classes": CLASSES,
        "metric_method": "confusion matrix over all pixels of the set; IoU = TP / (TP + FP + FN) per class; mIoU = mean over the 7 classes (mIoU_shapes: over the 6 shapes)",
        "eval_300": ev,
        "saved_40": {**ev_saved, "scenes_with_repeated_class": doc["scenes_with_repeated_class"], "candidates_generated": doc["candidates_generated"]},
        "onnx_vs_pytorch": onnx_check,
        "model": {
            "parameters": n_params, "onnx_bytes": onnx_path.stat().st_size,
            "input": {"name": "input", "shape": ["N", 3, SIZE, SIZE], "preprocessing": "RGB, (pixel / 255 - mean) / std", "mean": MEAN, "std": STD},
            "output": {"name": "out", "shape": ["N", NCLS, SIZE, SIZE], "values": "logits (no softmax)"},
            "layer": {"module": "decoder", "tensor": graph["layer_tensor"], "shape": ["N", 48, SIZE // 4, SIZE // 4], "stride": 4},
            "graph": graph,
        },
        "training": {
            "scenes": N_TRAIN, "objects_per_scene": f"1-{MAX_OBJECTS_TRAIN}", "jpeg_fraction": 0.6, "batch": BATCH,
            "optimizer": "AdamW; LR on the clock: OneCycle shape (15 % cosine warm-up from max_lr/25, cosine down to max_lr/25e4) in elapsed / budget", "max_lr": LR, "weight_decay": WEIGHT_DECAY,
            "loss": "pixel-wise cross-entropy at the input resolution (the crop or the whole 256x256 scene)", "augment": "flips and transposes", "threads": THREADS, "threads_note": "1 intra-op thread: 2-5x faster than 2 on the shared, oversubscribed 2 cores",
            "budget_seconds": TRAIN_BUDGET_S, **tr,
        },
        "seeds": {"train": SEED_TRAIN, "eval_300": SEED_EVAL, "saved_40_candidates": SEED_SAVED, "torch": SEED_TORCH, "numpy_global": SEED_TORCH},
        "metadata": meta,
        "date": time.strftime("%Y-%m-%d"),
        "seconds": round(time.time() - t0, 1),
    }
    if weights:
        torch.save(model.state_dict(), weights)
    (OUT / "shapes_segmenter.metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps({k: metrics[k] for k in ("eval_300", "onnx_vs_pytorch", "seconds")}))


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", help="also save the trained PyTorch state dict here (for checks with other tools)")
    main(ap.parse_args().weights)
