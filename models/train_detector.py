#!/usr/bin/env python3
"""Trains camserve's bundled object detector: a small anchor-free CNN that finds and names shapes in cluttered scenes.

The task is synthetic and generated here (seeded), from the demo classifier's drawing code (train_demo.py): a
256x256 RGB scene on a cluttered background (colour gradient, noise, lines, dots) with 1 to 4 objects (circle,
square, triangle, star, cross, hexagon; boxes about 24..110 px, random colours and rotations, pairwise box IoU
below 0.3). Because every object's box is known, detection quality and explanation quality are measurable: the
pointing game checks that a detection's HiResCAM peak falls inside its (enlarged) box.

The network is laid out like an Ultralytics YOLOv8 model and exported in exactly the layout of its ONNX export, so
camserve recognises it with no configuration:
  - `self.model` is an nn.ModuleList; each module reads the outputs of earlier ones (`f`), the detection head is the
    last one (`model.20`) and reads the stride-8, 16 and 32 maps of a small FPN/PAN neck (`model.13`, `16`, `19`).
    camserve's default layer for a detector is therefore `model.13`'s output, ONNX tensor `/model.13/Add_output_0`
    ([N, 48, 32, 32], the last 1/8 grid made by a module below the head);
  - input `images` float32 [N, 3, 256, 256], RGB, pixel / 255;
  - output `output0` float32 [N, 4 + 6, 1344]: per anchor (32x32 stride-8 cells, then 16x16 stride-16, then 8x8
    stride-32, each row-major) the box centre x, centre y, width, height in input pixels, then the six class scores
    after their sigmoid. Boxes are decoded in the graph, anchor-free: softplus distances to the four sides from the
    cell's centre, times the stride;
  - metadata `task` = detect, `names`, `stride`, `imgsz`, `batch`, `description`, `author`, `license`.
Training: FCOS-like assignment (an object goes to one stride by its size; the cells of that stride within 1.5
strides of its centre and inside its box are positives), quality focal loss for the classes with task-aligned score
targets (s^0.5 * IoU^6, scaled so each object's best cell gets its IoU, as Ultralytics' assigner normalises them),
GIoU loss for the boxes; 8000 scenes (1-5 objects), 8 epochs, batch 16, AdamW + OneCycle, flips and transposes.
Evaluation is done the way Ultralytics' `predict` post-processes (confidence 0.25 on the best class score,
class-wise NMS at IoU 0.7, at most 300 detections). Measured on the run that wrote the bundled files (2026-12-06): mAP@0.5 0.992,
precision 0.909, recall 0.994 on 500 held-out scenes; HiResCAM's peak inside the detection's box (enlarged 25 %)
for 173/173 detections on the 60 saved scenes, Grad-CAM's for 101/173.

Writes, next to this script:
  shapes_detector.onnx          the model (opset 17, dynamic batch), 448k parameters, about 1.8 MB
  shapes_detector.labels.txt    one label per line
  shapes_detector.metrics.json  mAP@0.5, precision and recall on 500 held-out scenes, the pointing game on the
                                60 saved scenes, ONNX vs PyTorch difference, training settings, seeds, seconds
  ../tests/data/scenes/NNN.jpg + boxes.json   60 held-out scenes (JPEG quality 90) with their boxes

Needs torch, torchvision, numpy, pillow, onnx and onnxruntime. Takes about 15 minutes on two idle CPU cores (an
epoch is about 90 s; 19 minutes on the first run, on cores shared with a compiler):
    /work/venv-det/bin/python models/train_detector.py [--weights /tmp/shapes_detector.pt]
"""

import io
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
import torchvision
from PIL import Image, ImageDraw, ImageFilter

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import train_demo  # noqa: E402  (the demo's shapes: polygon(), LABELS, jpeg_roundtrip())

SCENES = HERE.parent / "tests" / "data" / "scenes"
SIZE = 256
LABELS = train_demo.LABELS  # circle, square, triangle, star, cross, hexagon
NC = len(LABELS)
STRIDES = (8, 16, 32)
# Seeds: training scenes, the 500 evaluation scenes, the 60 saved scenes, torch.
SEED_TRAIN, SEED_EVAL, SEED_SAVED, SEED_TORCH = 0, 777, 2024, 0
CONF, IOU_NMS, MAX_DET = 0.25, 0.7, 300  # Ultralytics' predict defaults
N_TRAIN, N_EVAL, EPOCHS, BATCH, LR = 8000, 500, 8, 16, 2e-3
MAX_OBJECTS_TRAIN = 5  # training scenes are a little more crowded than the 1-4 of the held-out ones
OUT = HERE  # where the model files go

# ---------------------------------------------------------------------------------------------------------------
# Scenes


def background(rng):
    """The demo's cluttered background (gradient, noise, lines, dots), at SIZE x SIZE with clutter scaled up."""
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    t = np.linspace(0, 1, SIZE)[None, :, None] if rng.random() < 0.5 else np.linspace(0, 1, SIZE)[:, None, None]
    base = np.broadcast_to(c0 * (1 - t) + c1 * t, (SIZE, SIZE, 3))
    bg = base + rng.normal(0, 18, (SIZE, SIZE, 3))
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    for _ in range(rng.integers(6, 20)):  # clutter: lines
        pts = [tuple(rng.uniform(0, SIZE, 2)) for _ in range(2)]
        d.line(pts, fill=tuple(int(v) for v in rng.uniform(0, 255, 3)), width=int(rng.integers(1, 4)))
    for _ in range(rng.integers(5, 25)):  # clutter: dots
        x, y = rng.uniform(0, SIZE, 2)
        r = rng.uniform(1, 5)
        d.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in rng.uniform(0, 255, 3)))
    return img, base


def shape_points(kind, cx, cy, r, angle):
    if kind == "circle":
        return None
    return train_demo.polygon(kind, cx, cy, r, angle)


def box_of(kind, cx, cy, r, pts):
    if pts is None:
        return (cx - r, cy - r, cx + r, cy + r)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    return (min(xs), min(ys), max(xs), max(ys))


def box_iou_np(a, b):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    aa, ab = (a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1])
    return inter / (aa + ab - inter), inter / min(aa, ab)


def make_scene(rng, max_objects=4):
    """Returns (PIL image, [(class index, (x0, y0, x1, y1)), ...]) with boxes in pixels (rounded to integers)."""
    img, base = background(rng)
    objects = []  # (r, cls, cx, cy, angle, pts, box)
    for _ in range(int(rng.integers(1, max_objects + 1))):
        cls = int(rng.integers(NC))
        for _try in range(30):
            r = float(np.exp(rng.uniform(math.log(13), math.log(55))))
            cx, cy = rng.uniform(r + 1, SIZE - r - 1, 2)
            angle = rng.uniform(0, 2 * math.pi)
            pts = shape_points(LABELS[cls], cx, cy, r, angle)
            box = box_of(LABELS[cls], cx, cy, r, pts)
            # Limited overlap: box IoU < 0.3 and no box more than half covered by another.
            if all(max(box_iou_np(box, o[6])[0] / 0.3, box_iou_np(box, o[6])[1] / 0.5) < 1 for o in objects):
                objects.append((r, cls, cx, cy, angle, pts, box))
                break
    d = ImageDraw.Draw(img)
    found = []
    for r, cls, cx, cy, angle, pts, box in sorted(objects, key=lambda o: -o[0]):  # large first: small ones on top
        local = base[int(cy), int(cx)]
        for _try in range(20):  # a colour that stands out from the background gradient under the object
            colour = rng.uniform(0, 255, 3)
            if np.linalg.norm(colour - local) >= 60:
                break
        colour = tuple(int(v) for v in colour)
        outline = (0, 0, 0) if rng.random() < 0.5 else None
        if pts is None:
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour, outline=outline)
        else:
            d.polygon(pts, fill=colour, outline=outline)
        found.append((cls, tuple(int(round(v)) for v in box)))
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 1.0))))
    return img, found


def make_set(seed, n, jpeg_p, max_objects=4):
    rng = np.random.default_rng(seed)
    images, targets = np.empty((n, SIZE, SIZE, 3), np.uint8), []
    for i in range(n):
        img, objs = make_scene(rng, max_objects)
        if rng.random() < jpeg_p:
            img = train_demo.jpeg_roundtrip(img, rng)
        images[i] = np.asarray(img)
        targets.append(torch.tensor([[c, *b] for c, b in objs], dtype=torch.float32).reshape(-1, 5))
    return images, targets


def to_input(images_u8):
    """uint8 [N, H, W, 3] -> float32 [N, 3, H, W], pixel / 255 (Ultralytics' preprocessing)."""
    return torch.from_numpy(images_u8).permute(0, 3, 1, 2).float().div_(255.0)


# ---------------------------------------------------------------------------------------------------------------
# Model


class Conv(nn.Module):
    """Conv2d + BatchNorm2d + SiLU (exports as /model.N/conv/Conv, /model.N/bn folded, /model.N/act/Mul)."""

    def __init__(self, cin, cout, k=3, s=1, p=None):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, s, k // 2 if p is None else p, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Block(nn.Module):
    """A 1x1 projection (when the widths differ), then a residual bottleneck: y + 3x3(1x1(y))."""

    def __init__(self, cin, cout, e=0.5):
        super().__init__()
        self.cv1 = Conv(cin, cout, 1) if cin != cout else nn.Identity()
        self.cv2 = Conv(cout, int(cout * e), 1)
        self.cv3 = Conv(int(cout * e), cout, 3)

    def forward(self, x):
        y = self.cv1(x)
        return y + self.cv3(self.cv2(y))


class Concat(nn.Module):
    def forward(self, xs):
        return torch.cat(xs, 1)


class Detect(nn.Module):
    """Anchor-free head: per stride a box branch (4 side distances) and a class branch; decodes in the graph to
    [N, 4 + nc, A] (cx, cy, w, h in input pixels, then the class scores after their sigmoid)."""

    def __init__(self, chs, nc=NC, hidden=32, size=SIZE):
        super().__init__()
        self.nc = nc
        self.box = nn.ModuleList(nn.Sequential(Conv(c, hidden, 3), nn.Conv2d(hidden, 4, 1)) for c in chs)
        self.cls = nn.ModuleList(nn.Sequential(Conv(c, hidden, 3), nn.Conv2d(hidden, nc, 1)) for c in chs)
        points, strides = [], []
        for s in STRIDES:
            n = size // s
            ys, xs = torch.meshgrid(torch.arange(n, dtype=torch.float32), torch.arange(n, dtype=torch.float32), indexing="ij")
            points.append(torch.stack([xs.flatten(), ys.flatten()]) * s + s / 2)
            strides.append(torch.full((1, n * n), float(s)))
        self.register_buffer("points", torch.cat(points, 1), persistent=False)  # [2, A], cell centres in pixels
        self.register_buffer("strides", torch.cat(strides, 1), persistent=False)  # [1, A]
        for seq in self.cls:
            nn.init.constant_(seq[-1].bias, -math.log((1 - 0.01) / 0.01))
        for seq in self.box:
            nn.init.constant_(seq[-1].bias, 1.0)  # softplus(1) ~ 1.3 strides to each side

    def raw(self, xs):
        """Side distances in pixels [N, 4, A] (left, top, right, bottom) and class logits [N, nc, A]."""
        n = xs[0].shape[0]
        ltrb = torch.cat([b(x).reshape(n, 4, -1) for b, x in zip(self.box, xs)], 2)
        logits = torch.cat([c(x).reshape(n, self.nc, -1) for c, x in zip(self.cls, xs)], 2)
        return F.softplus(ltrb) * self.strides, logits

    def decode(self, ltrb, logits):
        lt, rb = ltrb[:, :2], ltrb[:, 2:]
        centre = self.points + (rb - lt) / 2
        return torch.cat([centre, lt + rb, logits.sigmoid()], 1)

    def forward(self, xs):
        return self.decode(*self.raw(xs))


class Upsample(nn.Upsample):
    def __init__(self):
        super().__init__(scale_factor=2.0, mode="nearest")


class ShapesDetector(nn.Module):
    # (from, module): `from` is the index of an earlier module's output (-1: the previous one) or a list of them.
    def __init__(self):
        super().__init__()
        w = (32, 48, 64, 80)  # widths at strides 4, 8, 16, 32
        layers = [
            (-1, Conv(3, w[0], 4, 4, 0)),  # 0  /4 (4x4 patches)
            (-1, Block(w[0], w[0])),  # 1
            (-1, Conv(w[0], w[1], 3, 2)),  # 2  /8
            (-1, Block(w[1], w[1])),  # 3  C3
            (-1, Conv(w[1], w[2], 3, 2)),  # 4  /16
            (-1, Block(w[2], w[2])),  # 5  C4
            (-1, Conv(w[2], w[3], 3, 2)),  # 6  /32
            (-1, Block(w[3], w[3])),  # 7  C5
            (-1, Upsample()),  # 8  /16
            ([-1, 5], Concat()),  # 9
            (-1, Block(w[3] + w[2], w[2])),  # 10 N4
            (-1, Upsample()),  # 11 /8
            ([-1, 3], Concat()),  # 12
            (-1, Block(w[2] + w[1], w[1])),  # 13 P3 (stride 8, the head's first input)
            (-1, Conv(w[1], w[1], 3, 2)),  # 14 /16
            ([-1, 10], Concat()),  # 15
            (-1, Block(w[1] + w[2], w[2])),  # 16 P4
            (-1, Conv(w[2], w[2], 3, 2)),  # 17 /32
            ([-1, 7], Concat()),  # 18
            (-1, Block(w[2] + w[3], w[3])),  # 19 P5
            ([13, 16, 19], Detect([w[1], w[2], w[3]])),  # 20
        ]
        self.froms = [f for f, _ in layers]
        self.model = nn.ModuleList(m for _, m in layers)

    def features(self, x):
        outs = []
        for f, m in zip(self.froms, self.model[:-1]):
            if isinstance(f, list):
                x = m([outs[j] if j >= 0 else x for j in f])
            elif f != -1:
                x = m(outs[f])
            else:
                x = m(x)
            outs.append(x)
        return [outs[j] for j in self.froms[-1]]

    def raw(self, x):
        return self.model[-1].raw(self.features(x))

    def forward(self, x):
        return self.model[-1](self.features(x))


# ---------------------------------------------------------------------------------------------------------------
# Training


def box_xyxy(ltrb, points):
    """ltrb [.., 4, A] distances, points [2, A] -> boxes [.., 4, A] x0, y0, x1, y1."""
    return torch.cat([points - ltrb[..., :2, :], points + ltrb[..., 2:, :]], -2)


def assign(targets, points, strides):
    """FCOS-like, for a batch: each object goes to one stride by its longer side; the cells of that stride whose
    centres are inside its box and within 1.5 strides of its centre are positives (a cell claimed twice goes to the
    smaller object). `targets` [B, M, 5] (class, x0, y0, x1, y1; class -1 pads). Returns the owning object's index
    per anchor [B, A] and the positives mask [B, A]."""
    boxes, valid = targets[..., 1:], targets[..., 0] >= 0  # [B, M, 4], [B, M]
    side = (boxes[..., 2:] - boxes[..., :2]).max(-1).values
    level_stride = torch.where(side < 48, 8.0, torch.where(side < 80, 16.0, 32.0))[..., None]  # [B, M, 1]
    centre = (boxes[..., :2] + boxes[..., 2:]) / 2
    px, py = points[0], points[1]  # [A]
    b = boxes[..., None]  # [B, M, 4, 1]
    inside = (px > b[:, :, 0]) & (px < b[:, :, 2]) & (py > b[:, :, 1]) & (py < b[:, :, 3])  # [B, M, A]
    radius = 1.5 * level_stride
    near = ((px - centre[..., 0:1]).abs() < radius) & ((py - centre[..., 1:2]).abs() < radius)
    ok = inside & near & (strides[0] == level_stride) & valid[..., None]
    area = ((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1]))[..., None]
    best, owner = torch.where(ok, area, torch.full_like(area, float("inf"))).min(1)  # [B, A]
    return owner, torch.isfinite(best)


def pad_targets(targets):
    m = max(1, max(len(t) for t in targets))
    out = torch.full((len(targets), m, 5), -1.0)
    out[..., 1:] = 0
    for i, t in enumerate(targets):
        out[i, :len(t)] = t
    return out


def pairwise_iou(a, b):
    """IoU of matching rows of two [P, 4] x0 y0 x1 y1 box sets."""
    wh = (torch.min(a[:, 2:], b[:, 2:]) - torch.max(a[:, :2], b[:, :2])).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / (area(a) + area(b) - inter + 1e-9)


def losses(model, x, targets):
    head = model.model[-1]
    ltrb, logits = model.raw(x)  # [B, 4, A], [B, nc, A]
    points = head.points
    t = pad_targets(targets)
    owner, pos = assign(t, points, head.strides)
    gt = t.gather(1, owner[..., None].expand(-1, -1, 5))  # [B, A, 5], the owning object per anchor
    bi, ai = pos.nonzero(as_tuple=True)
    npos = max(1, len(bi))
    pred = box_xyxy(ltrb, points).permute(0, 2, 1)[bi, ai]  # [P, 4]
    gt_box, gt_cls = gt[bi, ai, 1:], gt[bi, ai, 0].long()
    # Score targets as Ultralytics' task-aligned assigner normalises them: alignment s^0.5 * IoU^6, scaled so that
    # each object's best-aligned cell gets the object's best IoU. The cells next to the best one get lower targets,
    # so one object gives one confident box, not a ring of them that NMS at IoU 0.7 would keep.
    iou = pairwise_iou(pred.detach(), gt_box).clamp(min=1e-6)
    score = logits.detach().sigmoid()[bi, gt_cls, ai]
    align = score.pow(0.5) * iou.pow(6)
    obj = bi * t.shape[1] + owner[bi, ai]
    n_obj = t.shape[0] * t.shape[1]
    max_align = torch.zeros(n_obj).scatter_reduce(0, obj, align, "amax", include_self=False)
    max_iou = torch.zeros(n_obj).scatter_reduce(0, obj, iou, "amax", include_self=False)
    cls_target = torch.zeros_like(logits)
    cls_target[bi, gt_cls, ai] = align / (max_align[obj] + 1e-9) * max_iou[obj]
    # Quality focal loss (GFL): BCE towards the IoU, modulated by |score - target|^2.
    p = logits.sigmoid()
    qfl = (F.binary_cross_entropy_with_logits(logits, cls_target, reduction="none") * (p - cls_target).abs().pow(2)).sum() / npos
    giou = torchvision.ops.generalized_box_iou_loss(pred, gt_box, reduction="sum") / npos
    return qfl, giou


def augment(xb, targets, gen):
    """Random flips and transposes (the dihedral group: the shapes' classes do not change), per picture."""
    out_x, out_t = [], []
    for img, t in zip(xb, targets):
        t = t.clone()
        b = t[:, 1:]
        if torch.rand(1, generator=gen).item() < 0.5:  # transpose (swap x and y)
            img = img.transpose(1, 2)
            b = b[:, [1, 0, 3, 2]]
        if torch.rand(1, generator=gen).item() < 0.5:  # horizontal flip
            img = img.flip(2)
            b = torch.stack([SIZE - b[:, 2], b[:, 1], SIZE - b[:, 0], b[:, 3]], 1)
        if torch.rand(1, generator=gen).item() < 0.5:  # vertical flip
            img = img.flip(1)
            b = torch.stack([b[:, 0], SIZE - b[:, 3], b[:, 2], SIZE - b[:, 1]], 1)
        t[:, 1:] = b
        out_x.append(img)
        out_t.append(t)
    return torch.stack(out_x), out_t


# ---------------------------------------------------------------------------------------------------------------
# Evaluation


def postprocess(out):
    """Ultralytics' predict: best class score > CONF, class-wise NMS at IOU_NMS, at most MAX_DET. `out` [B, 4+nc, A];
    returns per picture (boxes [n, 4] x0 y0 x1 y1, scores [n], classes [n], anchors [n]), best first."""
    res = []
    for o in out:
        scores, classes = o[4:].max(0)
        keep = scores > CONF
        anchors = keep.nonzero()[:, 0]
        cx, cy, w, h = o[:4, anchors]
        boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
        s, c = scores[anchors], classes[anchors]
        order = s.argsort(descending=True, stable=True)
        boxes, s, c, anchors = boxes[order], s[order], c[order], anchors[order]
        k = torchvision.ops.batched_nms(boxes, s, c, IOU_NMS)[:MAX_DET]
        res.append((boxes[k], s[k], c[k], anchors[k]))
    return res


def average_precision(tp, conf, n_gt):
    """All-point interpolated AP (the area under the precision envelope, as VOC 2010+ and COCO's
    interpolation-free variant): recall steps at each true positive."""
    if n_gt == 0:
        return float("nan")
    if len(tp) == 0:
        return 0.0
    order = np.argsort(-conf, kind="stable")
    tp = tp[order]
    ctp, cfp = np.cumsum(tp), np.cumsum(1 - tp)
    recall = ctp / n_gt
    precision = ctp / (ctp + cfp)
    mrec = np.concatenate([[0.0], recall, [recall[-1]]])
    mpre = np.concatenate([[1.0], precision, [0.0]])
    mpre = np.flip(np.maximum.accumulate(np.flip(mpre)))
    i = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def match(dets, gts, iou_thr=0.5):
    """Greedy matching by score (detections arrive best first): a detection is a true positive when it overlaps an
    unmatched object of its class at IoU >= iou_thr. Returns per class lists of (score, tp) and object counts."""
    per_class = {c: [] for c in range(NC)}
    n_gt = np.zeros(NC, int)
    for (boxes, scores, classes, _), t in zip(dets, gts):
        for c in t[:, 0].long().tolist():
            n_gt[c] += 1
        used = torch.zeros(len(t), dtype=torch.bool)
        ious = torchvision.ops.box_iou(boxes, t[:, 1:]) if len(t) and len(boxes) else torch.zeros(len(boxes), len(t))
        for i in range(len(boxes)):
            c = int(classes[i])
            cand = ious[i].clone()
            cand[(t[:, 0].long() != c) | used] = -1
            j = int(cand.argmax()) if len(t) else -1
            hit = j >= 0 and cand[j] >= iou_thr
            if hit:
                used[j] = True
            per_class[c].append((float(scores[i]), 1.0 if hit else 0.0))
    return per_class, n_gt


def evaluate(model, images, targets, conf=CONF, batch=50):
    global CONF
    saved, CONF = CONF, conf
    model.eval()
    dets = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            dets += postprocess(model(to_input(images[i:i + batch])))
    CONF = saved
    per_class, n_gt = match(dets, targets)
    aps = {}
    tp_all = n_det = 0
    for c in range(NC):
        arr = np.array(per_class[c]).reshape(-1, 2)
        aps[LABELS[c]] = average_precision(arr[:, 1], arr[:, 0], n_gt[c])
        tp_all += arr[:, 1].sum()
        n_det += len(arr)
    return {
        "mAP50": float(np.mean(list(aps.values()))),
        "AP50_per_class": {k: round(v, 4) for k, v in aps.items()},
        "precision": float(tp_all / max(1, n_det)),
        "recall": float(tp_all / max(1, n_gt.sum())),
        "detections": int(n_det),
        "objects": int(n_gt.sum()),
    }


def hirescam_pointing(model, images, layer_index=None):
    """The pointing game, computed here with a plain HiResCAM / Grad-CAM: for each detection (CONF, NMS IOU_NMS) the
    map of its class score at its own output row, at model.<layer_index>'s output, upsampled to SIZE x SIZE
    (bilinear); a hit when the map's peak falls inside the detection's box grown to 1.25x its width and height.
    pytorch-grad-cam's HiResCAM and GradCAM at the same layer (target: output[4 + class, anchor]) gave the same
    counts on the bundled model."""
    model.eval()
    layer_index = model.froms[-1][0] if layer_index is None else layer_index
    store = {}
    handle = model.model[layer_index].register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    hits = {"hirescam": 0, "gradcam": 0}
    total = 0
    for img in images:
        x = to_input(img[None])
        with torch.no_grad():
            det = postprocess(model(x))[0]
        for box, score, cls, anchor in zip(*det):
            out = model(x)
            act = store["a"]
            (grad,) = torch.autograd.grad(out[0, 4 + int(cls), int(anchor)], act)
            maps = {
                "hirescam": (grad * act).sum(1, keepdim=True),
                "gradcam": (grad.mean((2, 3), keepdim=True) * act).sum(1, keepdim=True),
            }
            x0, y0, x1, y1 = box.tolist()
            cx, cy, w, h = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) * 1.25, (y1 - y0) * 1.25
            for name, cam in maps.items():
                cam = F.interpolate(F.relu(cam), size=(SIZE, SIZE), mode="bilinear", align_corners=False)[0, 0]
                py, px = divmod(int(cam.argmax()), SIZE)
                if cx - w / 2 <= px + 0.5 <= cx + w / 2 and cy - h / 2 <= py + 0.5 <= cy + h / 2:
                    hits[name] += 1
            total += 1
    handle.remove()
    return {"detections": total, **{f"{k}_hit_rate": round(v / max(1, total), 4) for k, v in hits.items()}, **{f"{k}_hits": v for k, v in hits.items()}}


# ---------------------------------------------------------------------------------------------------------------


def export(model, path, description):
    model.eval()
    x = torch.zeros(1, 3, SIZE, SIZE)
    torch.onnx.export(
        model, x, str(path), dynamo=False, opset_version=17,
        input_names=["images"], output_names=["output0"],
        dynamic_axes={"images": {0: "batch"}, "output0": {0: "batch"}},
    )
    m = onnx.load(str(path))
    meta = {
        "description": description,
        "author": "camserve (generated by models/train_detector.py)",
        "license": "Apache-2.0",
        "task": "detect",
        "stride": "32",
        "batch": "1",
        "imgsz": f"[{SIZE}, {SIZE}]",
        "names": repr({i: n for i, n in enumerate(LABELS)}),
    }
    del m.metadata_props[:]
    for k, v in meta.items():
        p = m.metadata_props.add()
        p.key, p.value = k, v
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    return meta


def main(weights=None):
    torch.manual_seed(SEED_TORCH)
    torch.set_num_threads(2)
    t0 = time.time()
    n_train, n_eval, epochs, batch, lr = N_TRAIN, N_EVAL, EPOCHS, BATCH, LR
    train_x, train_t = make_set(SEED_TRAIN, n_train, jpeg_p=0.6, max_objects=MAX_OBJECTS_TRAIN)
    eval_x, eval_t = make_set(SEED_EVAL, n_eval, jpeg_p=1.0)
    print(f"{n_train} training and {n_eval} evaluation scenes ({time.time() - t0:.0f} s)", flush=True)

    model = ShapesDetector()
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW(fused=True, params=[{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    steps = epochs * (n_train // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(SEED_TORCH)
    t_train = time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(n_train, generator=gen)
        sums = np.zeros(2)
        for i in range(n_train // batch):
            idx = perm[i * batch:(i + 1) * batch]
            xb, tb = augment(to_input(train_x[idx.numpy()]), [train_t[j] for j in idx], gen)
            qfl, giou = losses(model, xb, tb)
            loss = qfl + 2.0 * giou
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            sums += [qfl.item(), giou.item()]
            if epoch == 0 and i == 49:
                print(f"50 steps: {time.time() - t_train:.1f} s", flush=True)
        msg = f"epoch {epoch + 1}/{epochs}: qfl {sums[0] / (i + 1):.4f} giou {sums[1] / (i + 1):.4f}"
        ev = evaluate(model, eval_x[:200], eval_t[:200])
        msg += f" | 200 eval scenes: mAP50 {ev['mAP50']:.4f} P {ev['precision']:.3f} R {ev['recall']:.3f}"
        print(msg + f" ({time.time() - t0:.0f} s)", flush=True)
    train_seconds = time.time() - t_train

    model.eval()
    ev = evaluate(model, eval_x, eval_t)
    ev_val = evaluate(model, eval_x, eval_t, conf=0.001)
    print("eval (conf 0.25):", json.dumps(ev), flush=True)

    # The 60 saved held-out scenes (their own seed), JPEG quality 90 as written.
    SCENES.mkdir(parents=True, exist_ok=True)
    srng = np.random.default_rng(SEED_SAVED)
    records, saved = [], []
    for i in range(60):
        img, objs = make_scene(srng)
        name = f"{i:03d}.jpg"
        img.save(SCENES / name, quality=90)
        saved.append(np.asarray(Image.open(SCENES / name).convert("RGB")))
        records.append({"file": name, "objects": [{"label": LABELS[c], "class_index": c, "box": list(b)} for c, b in objs]})
    (SCENES / "boxes.json").write_text(json.dumps(records, indent=1) + "\n")
    saved = np.stack(saved)
    saved_t = [torch.tensor([[o["class_index"], *o["box"]] for o in r["objects"]], dtype=torch.float32).reshape(-1, 5) for r in records]
    ev_saved = evaluate(model, saved, saved_t)
    pointing = hirescam_pointing(model, saved)
    print("pointing game on the 60 saved scenes:", json.dumps(pointing), flush=True)

    onnx_path = OUT / "shapes_detector.onnx"
    description = "camserve shapes detector: 6 synthetic shapes (circle, square, triangle, star, cross, hexagon) on cluttered 256x256 scenes; YOLOv8-style raw head [N, 10, 1344]"
    meta = export(model, onnx_path, description)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    probe = to_input(np.concatenate([saved[:4], eval_x[:4]]))
    with torch.no_grad():
        ref = model(probe).numpy()
    got = sess.run(["output0"], {"images": probe.numpy()})[0]
    diff = np.abs(ref - got)
    onnx_check = {
        "pictures": len(probe),
        "max_abs_diff_boxes_px": float(diff[:, :4].max()),
        "max_abs_diff_scores": float(diff[:, 4:].max()),
        "same_detections": all(
            torch.equal(a[2], b[2]) and torch.allclose(a[0], b[0], atol=1e-2)
            for a, b in zip(postprocess(torch.from_numpy(ref)), postprocess(torch.from_numpy(got)))
        ),
    }
    print("ONNX vs PyTorch:", json.dumps(onnx_check), flush=True)
    (OUT / "shapes_detector.labels.txt").write_text("\n".join(LABELS) + "\n")
    metrics = {
        "task": "synthetic scenes, 256x256, 1-4 of 6 shapes on a cluttered background (boxes about 24-110 px, box IoU < 0.3); evaluation scenes JPEG-compressed (quality 60-95)",
        "postprocess": {"conf": CONF, "iou_nms": IOU_NMS, "max_det": MAX_DET, "nms": "class-wise, torchvision.ops.batched_nms", "match_iou": 0.5},
        "ap_method": "all-point interpolation (area under the monotone precision envelope), per class, mean over the 6 classes",
        "eval_500": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in ev.items()},
        "eval_500_conf_0.001": {"mAP50": round(ev_val["mAP50"], 4), "note": "the same scenes at Ultralytics val's conf 0.001, for comparison"},
        "saved_60": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in ev_saved.items()},
        "pointing_game_saved_60": {**pointing, "layer": f"model.{model.froms[-1][0]} (the stride-8 input of the head)", "box_scale": 1.25},
        "onnx_vs_pytorch": onnx_check,
        "model": {"parameters": n_params, "onnx_bytes": onnx_path.stat().st_size, "input": [1, 3, SIZE, SIZE], "output": [1, 4 + NC, sum((SIZE // s) ** 2 for s in STRIDES)], "strides": list(STRIDES)},
        "training": {
            "scenes": n_train, "objects_per_scene": f"1-{MAX_OBJECTS_TRAIN}", "jpeg_fraction": 0.6, "epochs": epochs, "batch": batch, "optimizer": "AdamW, OneCycle",
            "max_lr": lr, "weight_decay": 5e-4, "augment": "flips and transposes",
            "assignment": "FCOS-like: one stride per object by its longer side (<48 px: 8, <80: 16, else 32), cells within 1.5 strides of its centre and inside its box",
            "loss": "quality focal loss (task-aligned targets: s^0.5 * IoU^6, scaled to each object's best IoU) + 2 x GIoU", "threads": 2,
            "seconds": round(train_seconds, 1), "seconds_note": "the training loop, with its per-epoch evaluation on 200 scenes",
        },
        "seeds": {"train": SEED_TRAIN, "eval_500": SEED_EVAL, "saved_60": SEED_SAVED, "torch": SEED_TORCH},
        "metadata": meta,
        "seconds": round(time.time() - t0, 1),
    }
    if weights:
        torch.save(model.state_dict(), weights)
    (OUT / "shapes_detector.metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps({k: metrics[k] for k in ("eval_500", "pointing_game_saved_60", "seconds")}))


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", help="also save the trained PyTorch state dict here (for checks with other tools)")
    main(ap.parse_args().weights)
