#!/usr/bin/env python3
"""Trains camserve's bundled embedding model: a small CNN that maps a 64x64 picture of a shape to a 64-d vector,
so that pictures of the same shape get similar vectors (cosine) whatever the shape's position, size, rotation and
colour and the background clutter.

The task is the demo classifier's (train_demo.py, whose generator is imported, not copied): a 64x64 RGB picture
with one object (circle, square, triangle, star, cross or hexagon) at a random position, scale, rotation and colour
on a cluttered background (colour gradient, noise, lines, dots); the object's shape is the identity to embed.

The network (`ShapeEmbedder`) is the trunk only:
  - `features`: conv3x3-BN-ReLU stages 3->16 (64x64), max-pool, 16->32 (32x32), max-pool, 32->64, 64->64
    (16x16), max-pool, 64->96 (8x8); the last ReLU's output [N, 96, 8, 8] (ONNX tensor
    `/features/features.17/Relu_output_0`) is the layer Grad-CAM reads;
  - global average pool, flatten, `proj`: Linear 96->64 (the ONNX graph ends GlobalAveragePool -> Flatten -> Gemm).
    122k parameters; the exporter folds each BatchNorm into its Conv, so the ONNX ops are Conv, Relu, MaxPool,
    GlobalAveragePool, Flatten and Gemm.
  - input `input` float32 [N, 3, 64, 64], RGB, ImageNet mean/std normalisation of pixel / 255 (like demo.onnx);
    output `embedding` float32 [N, 64], NOT L2-normalised (compare embeddings by cosine similarity).
Training (metric learning with a normalised-softmax head, NormFace with an additive cosine margin, i.e. CosFace):
the L2-normalised embedding is scored against 6 L2-normalised class weight vectors, logits = SCALE * (cos -
MARGIN * onehot), cross-entropy. The head is used only for training and is not exported. AdamW + OneCycle,
dihedral augmentation (random flips and transposes: the shape does not change), 12000 pictures (seed SEED_TRAIN,
60 % JPEG-compressed at quality 60-95, as train_demo.py does).
Evaluation on pictures the training never saw: EVAL_N fresh pictures from their own seed (all JPEG-compressed at
quality 60-95), and the 200 held-out pictures of ../tests/data/shapes (seed 12345, written by train_demo.py,
label from boxes.json). Metrics: recall@1 (the nearest other picture by cosine similarity has the same shape),
per-shape recall@1, mean cosine similarity over same-shape pairs and over different-shape pairs (i != j).
Also checks the ONNX file in onnxruntime against PyTorch float32 and batch 1 against batch 7.
Measured on the run that wrote the bundled files (2026-12-06, 12 epochs = 2250 steps, 572 s of training, 589 s in
all, one thread on two CPU cores shared with cargo builds): on the 1000 fresh pictures recall@1 0.946 (per shape
0.926-0.963), mean cosine same shape 0.786 vs different shape -0.072; on the 200 pictures of tests/data/shapes
recall@1 0.975, mean cosine same shape 0.810 vs different shape -0.106. ONNX vs PyTorch: max abs difference
7.2e-07 (embeddings up to 1.83 in absolute value), batch 1 vs batch 7 identical (difference 0).

Writes, next to this script:
  shapes_embedder.onnx           the trunk (opset 17, dynamic batch, TorchScript exporter), about 0.5 MB
  shapes_embedder.metrics.json   recall@1 and cosine similarities on both held-out sets, ONNX checks, training
                                 settings, seeds, seconds

Needs torch, numpy, pillow, onnx and onnxruntime. Takes about 10 minutes on two shared CPU cores (a few minutes
on idle ones; the number of steps is fixed, not a time budget, so a slower machine trains the same steps):
    /work/venv-det/bin/python models/train_embedder.py
"""

import json
import pathlib
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import train_demo  # noqa: E402  (LABELS, MEAN, STD, make_image(), jpeg_roundtrip(), to_tensor(), block())

HELDOUT = train_demo.HELDOUT  # ../tests/data/shapes
LABELS, MEAN, STD = train_demo.LABELS, train_demo.MEAN, train_demo.STD
SEED_TRAIN, SEED_EVAL, SEED_TORCH = 0, 2718, 0
N_TRAIN, EVAL_N = 12000, 1000
EPOCHS, BATCH, LR, WEIGHT_DECAY = 12, 64, 3e-3, 1e-4
EMBED_DIM = 64
SCALE, MARGIN = 16.0, 0.1
# One intra-op thread: on the two CPU cores shared with other work (cargo builds, load average about 3), two threads
# made a training step about 4x SLOWER than one (measured: batch 64, 0.8-1.2 s vs 0.22-0.27 s), as
# train_segmenter.py also found.
THREADS = 1


class ShapeEmbedder(nn.Module):
    def __init__(self, dim=EMBED_DIM):
        super().__init__()
        b = train_demo.block  # conv3x3 (no bias) - BatchNorm - ReLU
        self.features = nn.Sequential(
            *b(3, 16), nn.MaxPool2d(2),
            *b(16, 32), nn.MaxPool2d(2),
            *b(32, 64), *b(64, 64), nn.MaxPool2d(2),
            *b(64, 96),
        )
        self.proj = nn.Linear(96, dim)

    def forward(self, x):
        return self.proj(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


class CosineHead(nn.Module):
    """Normalised softmax (NormFace) with an additive cosine margin (CosFace); training only."""

    def __init__(self, dim=EMBED_DIM, n=len(LABELS), scale=SCALE, margin=MARGIN):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, dim) * 0.1)
        self.scale, self.margin = scale, margin

    def forward(self, emb, y=None):
        cos = F.normalize(emb, dim=1) @ F.normalize(self.weight, dim=1).t()
        if y is not None:
            cos = cos - self.margin * F.one_hot(y, cos.shape[1]).to(cos.dtype)
        return self.scale * cos


def dihedral(xb, gen):
    """Random flips and transposes per picture (the 8 symmetries of the square)."""
    n = xb.shape[0]
    r = torch.rand(n, 3, generator=gen) < 0.5
    xb = torch.where(r[:, 0, None, None, None], xb.flip(3), xb)
    xb = torch.where(r[:, 1, None, None, None], xb.flip(2), xb)
    return torch.where(r[:, 2, None, None, None], xb.transpose(2, 3), xb)


def make_set(seed, n, jpeg_p):
    rng = np.random.default_rng(seed)
    items = [train_demo.make_image(rng) for _ in range(n)]
    items = [(train_demo.jpeg_roundtrip(im, rng) if rng.random() < jpeg_p else im, c) for im, c, _ in items]
    return train_demo.to_tensor([i for i, _ in items]), torch.tensor([c for _, c in items])


def load_heldout():
    boxes = json.loads((HELDOUT / "boxes.json").read_text())
    imgs = [Image.open(HELDOUT / b["file"]).convert("RGB") for b in boxes]
    return train_demo.to_tensor(imgs), torch.tensor([LABELS.index(b["label"]) for b in boxes])


@torch.no_grad()
def embed(model, x, batch=250):
    model.eval()
    return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])


def retrieval_metrics(emb, y):
    e = F.normalize(emb.double(), dim=1)
    sim = e @ e.t()
    n = len(y)
    eye = torch.eye(n, dtype=torch.bool)
    same = (y[:, None] == y[None, :]) & ~eye
    diff = y[:, None] != y[None, :]
    nn_idx = sim.masked_fill(eye, -2.0).argmax(1)
    hit = (y[nn_idx] == y)
    per_shape = {LABELS[c]: round(hit[y == c].double().mean().item(), 4) for c in range(len(LABELS)) if (y == c).any()}
    return {
        "pictures": n,
        "recall_at_1": round(hit.double().mean().item(), 4),
        "recall_at_1_per_shape": per_shape,
        "mean_cos_same_shape": round(sim[same].mean().item(), 4),
        "mean_cos_different_shape": round(sim[diff].mean().item(), 4),
        "std_cos_same_shape": round(sim[same].std().item(), 4),
        "std_cos_different_shape": round(sim[diff].std().item(), 4),
    }


def export(model, path, example):
    model.eval()
    torch.onnx.export(
        model, example, str(path), opset_version=17, dynamo=False,
        input_names=["input"], output_names=["embedding"],
        dynamic_axes={"input": {0: "N"}, "embedding": {0: "N"}},
    )
    m = onnx.load(str(path))
    onnx.checker.check_model(m)
    return [n.op_type for n in m.graph.node]


def main():
    t0 = time.time()
    torch.manual_seed(SEED_TORCH)
    torch.set_num_threads(THREADS)
    xtr, ytr = make_set(SEED_TRAIN, N_TRAIN, 0.6)
    xev, yev = make_set(SEED_EVAL, EVAL_N, 1.0)
    xho, yho = load_heldout()
    print(f"data ready ({time.time() - t0:.0f} s)", flush=True)

    model, head = ShapeEmbedder(), CosineHead()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW([
        {"params": model.parameters(), "weight_decay": WEIGHT_DECAY},
        {"params": head.parameters(), "weight_decay": 0.0},
    ], lr=LR)
    steps = N_TRAIN // BATCH
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=EPOCHS * steps)
    gen = torch.Generator().manual_seed(SEED_TORCH)
    t_train = time.time()
    for epoch in range(EPOCHS):
        model.train()
        perm = torch.randperm(N_TRAIN, generator=gen)
        tot = 0.0
        for i in range(steps):
            idx = perm[i * BATCH:(i + 1) * BATCH]
            xb = dihedral(xtr[idx], gen)
            loss = F.cross_entropy(head(model(xb), ytr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            tot += loss.item()
        ev = retrieval_metrics(embed(model, xev[:500]), yev[:500])
        print(f"epoch {epoch + 1}: loss {tot / steps:.3f} recall@1 {ev['recall_at_1']:.4f} cos same "
              f"{ev['mean_cos_same_shape']:.3f} diff {ev['mean_cos_different_shape']:.3f} "
              f"({time.time() - t0:.0f} s)", flush=True)
    train_s = time.time() - t_train

    model.eval()
    ev_fresh = retrieval_metrics(embed(model, xev), yev)
    ev_held = retrieval_metrics(embed(model, xho), yho)
    print("fresh:", json.dumps(ev_fresh), "\nheld-out:", json.dumps(ev_held), flush=True)

    onnx_path = HERE / "shapes_embedder.onnx"
    ops = export(model, onnx_path, xho[:1])
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    x = xho[:50]
    with torch.no_grad():
        ref = model(x).numpy()
    got = sess.run(["embedding"], {"input": x.numpy()})[0]
    b7 = sess.run(["embedding"], {"input": x[:7].numpy()})[0]
    b1 = np.concatenate([sess.run(["embedding"], {"input": x[i:i + 1].numpy()})[0] for i in range(7)])
    ort_ev = retrieval_metrics(torch.from_numpy(sess.run(["embedding"], {"input": xho.numpy()})[0]), yho)
    onnx_check = {
        "pictures": len(x),
        "output_shape": list(got.shape),
        "max_abs_diff_vs_pytorch": float(np.abs(got - ref).max()),
        "max_abs_embedding": float(np.abs(ref).max()),
        "batch1_vs_batch7_max_abs_diff": float(np.abs(b7 - b1).max()),
        "heldout_200_recall_at_1_onnxruntime": ort_ev["recall_at_1"],
    }
    print("ONNX:", json.dumps(onnx_check), "\nops:", ops, flush=True)

    metrics = {
        "task": "embedding of synthetic shapes pictures, 64x64, 6 shapes on a cluttered background (train_demo.py's "
                "generator); same shape => high cosine similarity",
        "metric_method": "cosine similarity of the embeddings; recall@1 = share of pictures whose nearest other "
                         "picture (cosine) has the same shape; mean cosine over all same-shape pairs (i != j) and "
                         "all different-shape pairs",
        "fresh_eval": dict(ev_fresh, seed=SEED_EVAL, jpeg="all, quality 60-95"),
        "heldout_tests_data_shapes": dict(ev_held, source="tests/data/shapes (seed 12345, JPEG quality 92)"),
        "onnx_vs_pytorch": onnx_check,
        "onnx_ops": ops,
        "model": {
            "input": "input float32 [N,3,64,64], RGB, (pixel/255 - mean)/std",
            "output": f"embedding float32 [N,{EMBED_DIM}], not L2-normalised",
            "gradcam_layer": "last ReLU of features, [N,96,8,8]",
            "parameters": n_params, "onnx_bytes": onnx_path.stat().st_size,
        },
        "training": {
            "loss": "normalised softmax (NormFace) with additive cosine margin (CosFace) over the 6 shapes",
            "scale": SCALE, "margin": MARGIN, "train_images": N_TRAIN, "train_jpeg_share": 0.6,
            "epochs": EPOCHS, "batch": BATCH, "optimizer": "AdamW + OneCycle", "max_lr": LR,
            "weight_decay": WEIGHT_DECAY, "augmentation": "random flips and transposes",
            "seeds": {"train": SEED_TRAIN, "eval": SEED_EVAL, "torch": SEED_TORCH}, "threads": THREADS,
            "final_loss": round(tot / steps, 4), "train_seconds": round(train_s, 1),
        },
        "seconds": round(time.time() - t0, 1),
        "mean": MEAN, "std": STD,
    }
    (HERE / "shapes_embedder.metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps({k: metrics[k] for k in ("fresh_eval", "heldout_tests_data_shapes", "seconds")}))
    # The goals, fixed before the first training run: recall@1 >= 0.9 on the held-out pictures; the ONNX file equal
    # to PyTorch (1e-4 of the largest value) and batch-independent. The files are written either way; a miss exits 1.
    missed = [what for what, ok in (
        (f"held-out recall@1 {ev_held['recall_at_1']} < 0.9", ev_held["recall_at_1"] >= 0.9),
        (f"ONNX vs PyTorch {onnx_check['max_abs_diff_vs_pytorch']:.2e}", onnx_check["max_abs_diff_vs_pytorch"] <= 1e-4 * onnx_check["max_abs_embedding"]),
        (f"batch 1 vs 7 {onnx_check['batch1_vs_batch7_max_abs_diff']:.2e}", onnx_check["batch1_vs_batch7_max_abs_diff"] == 0.0),
    ) if not ok]
    if missed:
        raise SystemExit("goal missed: " + "; ".join(missed))


if __name__ == "__main__":
    main()
