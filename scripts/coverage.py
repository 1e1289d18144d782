#!/usr/bin/env python3
"""Model-coverage sweep for camserve: export timm/torchvision classifiers to ONNX,
rewrite them with `camserve augment --rules plain` and check the explain graph
against PyTorch. Writes docs/COVERAGE.md.

NOT run by CI. Needs the PyTorch venv (torch, torchvision, timm, onnx,
onnxscript, onnxruntime==1.31.1) and a built `target/debug/camserve`
(override with --camserve). Usage:

    /work/venv/bin/python scripts/coverage.py [--only NAME[,NAME]] \
        [--exporter torchscript|dynamo] [--redo | --redo-failed] [--report-only]

Each model is exported with random weights (pretrained=False, seed 0, eval mode,
native input size, dynamic batch) by BOTH exporters:
  torchscript: torch.onnx.export(..., dynamo=False, opset_version=17)
  dynamo:      torch.onnx.export(..., dynamo=True) at its default opset,
               batch dynamic via dynamic_shapes.
Exports and per-row results are cached under --work (default /work/coverage):
reruns skip finished rows unless --redo (all selected rows) or --redo-failed
(only rows whose result is not "pass"; cached exports are reused).

Check, per export: `camserve inspect` (exit 2 = unsupported ops -> "fail: inspect"),
`camserve augment --rules plain` (-> "fail: augment"), then onnxruntime (CPU) on a
batch of 2 random images with 2 different one-hot seeds: the logits and
`camserve.input_grad.plain` (= d sum(seed * logits) / d input) against PyTorch.

Criterion (judged in float64): the truth is the PyTorch model run in float64
(model.double()). Relative error = max|a - b| / max|b|. camserve's float32 error vs
the float64 truth must be <= max(1e-3, 10 x PyTorch's own float32 error vs the
float64 truth), separately for the logits and for the input gradient. The relative
floor comes from PyTorch's float32 error because near-ties at ReLU/MaxPool make
float32 input gradients of deep random-weight nets ill-conditioned: PyTorch's own
float32 gradient can be far from the float64 one, and camserve cannot be expected
to do better than the arithmetic allows. When only the gradient misses, the same
check runs at 4 inputs within 1e-6 of x; the row is "pass (kink)" when 3 of them meet
the tolerance and the float64 gradient itself jumps near x (see the report header).
All-zero initial parameters other than biases are redrawn (see redraw_zero_parameters)
and a row with constant logits or a zero gradient fails as degenerate.

Each row runs in its own subprocess (memory is freed between models; use
`nice -n 10`), with a per-step timeout.
"""
import argparse
import datetime
import json
import os
import subprocess
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (name, source). source: "timm", "tv" (torchvision.models), "custom".
MODELS = [
    ("resnet18", "tv"),
    ("resnet18d", "timm"),
    ("vgg11_bn", "tv"),
    ("densenet121", "tv"),
    ("squeezenet1_1", "tv"),
    ("mobilenet_v2", "tv"),
    ("mobilenet_v3_small", "tv"),
    ("efficientnet_b0", "tv"),
    ("efficientnetv2_rw_t", "timm"),
    ("tf_efficientnet_b0", "timm"),
    ("regnety_002", "timm"),
    ("shufflenet_v2_x0_5", "tv"),
    ("googlenet", "tv"),
    ("mnasnet0_5", "tv"),
    ("inception_v3", "tv"),
    ("legacy_xception", "timm"),
    ("dla34", "timm"),
    ("hrnet_w18_small", "timm"),
    ("ghostnet_100", "timm"),
    ("repvgg_a0", "timm"),
    ("convnext_atto", "timm"),
    ("convnext_tiny", "tv"),
    ("vit_tiny_patch16_224", "timm"),
    ("deit_tiny_patch16_224", "timm"),
    ("deit_tiny_distilled_patch16_224", "timm"),
    ("vit_b_16", "tv"),
    ("swin_t", "tv"),
    ("swin_tiny_patch4_window7_224", "timm"),
    ("levit_128s", "timm"),
    ("maxvit_nano_rw_256", "timm"),
    ("coatnet_nano_rw_224", "timm"),
    ("fastvit_t8", "timm"),
    ("efficientformer_l1", "timm"),
    ("convmixer_tiny", "custom"),
    ("eca_nfnet_l0", "timm"),
    ("mobilevitv2_050", "timm"),
    ("poolformer_s12", "timm"),
    ("edgenext_xx_small", "timm"),
    # extras
    ("alexnet", "tv"),
    ("mobilenetv4_conv_small", "timm"),
    ("lcnet_050", "timm"),
    ("pvt_v2_b0", "timm"),
    ("resmlp_12_224", "timm"),
    ("cait_xxs24_224", "timm"),
    ("tiny_vit_5m_224", "timm"),
]
EXPORTERS = ["torchscript", "dynamo"]
# Attention / token-mixing / unusual-op families: run first.
FIRST = {"vit_tiny_patch16_224", "deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", "vit_b_16",
         "swin_t", "swin_tiny_patch4_window7_224", "levit_128s", "maxvit_nano_rw_256", "coatnet_nano_rw_224",
         "fastvit_t8", "efficientformer_l1", "convmixer_tiny", "eca_nfnet_l0", "mobilevitv2_050",
         "poolformer_s12", "edgenext_xx_small", "convnext_atto", "convnext_tiny", "tf_efficientnet_b0",
         "inception_v3", "googlenet", "hrnet_w18_small", "ghostnet_100", "repvgg_a0", "shufflenet_v2_x0_5"}
EXTRAS = ["alexnet", "mobilenetv4_conv_small", "lcnet_050", "pvt_v2_b0", "resmlp_12_224", "cait_xxs24_224",
          "tiny_vit_5m_224"]


def build(name, source):
    """Returns (model in eval mode, input size (C, H, W))."""
    import torch

    torch.manual_seed(0)
    if source == "timm":
        import timm

        m = timm.create_model(name, pretrained=False)
        size = tuple(m.pretrained_cfg.get("input_size", (3, 224, 224)))
    elif source == "tv":
        import torchvision

        kw = {}
        if name in ("googlenet", "inception_v3"):
            kw = dict(aux_logits=False, init_weights=True)
        m = torchvision.models.get_model(name, weights=None, **kw)
        size = (3, 299, 299) if name == "inception_v3" else (3, 224, 224)
    elif name == "convmixer_tiny":
        # ConvMixer (Trockman & Kolter), small: dim 256, depth 8, kernel 9, patch 7.
        import torch.nn as nn

        class Residual(nn.Module):
            def __init__(self, fn):
                super().__init__()
                self.fn = fn

            def forward(self, x):
                return self.fn(x) + x

        dim, depth, k, p = 256, 8, 9, 7
        m = nn.Sequential(
            nn.Conv2d(3, dim, p, stride=p), nn.GELU(), nn.BatchNorm2d(dim),
            *[nn.Sequential(
                Residual(nn.Sequential(nn.Conv2d(dim, dim, k, groups=dim, padding="same"),
                                       nn.GELU(), nn.BatchNorm2d(dim))),
                nn.Conv2d(dim, dim, 1), nn.GELU(), nn.BatchNorm2d(dim)) for _ in range(depth)],
            nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(dim, 1000))
        size = (3, 224, 224)
    else:
        raise ValueError(name)
    m._redrawn = redraw_zero_parameters(m)
    return m.eval(), size


def redraw_zero_parameters(m):
    """Redraws the parameters that the model's own init sets to all zeros, other than biases: torchvision
    ViT's head and class token, the last BatchNorm gamma of each residual block (timm's zero_init_last:
    ResNet-D, RegNetY, TinyViT), NFNet's skip gains, LeViT's attention biases, ResMLP's affine shifts. Left at
    zero they make the logits constant or whole residual branches dead, and the check passes without testing
    the rules inside them. Vectors (gains, gammas, shifts) get U(0.5, 1.5), matrices and larger N(0, 0.02),
    from a generator seeded by the model, so reruns export the same weights. Returns the redrawn names."""
    import torch

    g = torch.Generator().manual_seed(3)
    redrawn = []
    with torch.no_grad():
        for n, p in m.named_parameters():
            if not p.is_floating_point() or n.endswith("bias") or p.numel() == 0 or not bool((p == 0).all()):
                continue
            if p.dim() <= 1:
                p.copy_(0.5 + torch.rand(p.shape, generator=g, dtype=p.dtype))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            redrawn.append(n)
    return redrawn


def rel(a, b):
    import numpy as np

    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    d = float(np.max(np.abs(a - b)))
    m = float(np.max(np.abs(b)))
    return d / m if m > 0 else d


def first_line(text, prefer=("unsupported", "error", "Error")):
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    for p in prefer:
        for l in lines:
            if p in l:
                return l[:300]
    return lines[-1][:300] if lines else ""


def camserve_reason(text):
    """The camserve message: the unsupported-op lines of `inspect`, else the first error line."""
    lines = [l.rstrip() for l in text.splitlines()]
    items = None
    for i, l in enumerate(lines):
        if l.startswith("unsupported ops"):
            items = [x.strip() for x in lines[i + 1:] if x.startswith("  ") and x.strip()]
            break
    if items is None:
        items = [x.strip() for x in lines if x.startswith("  ") and "(node `" in x]
    if not items:
        return first_line(text)
    seen, keep = set(), []  # one example per distinct message (node names differ)
    for it in items:
        k = norm_item(it)
        if k not in seen:
            seen.add(k)
            keep.append(it)
    return "; ".join(keep)


def norm_item(why):
    import re

    why = re.sub(r"\s*\(node `[^`]*`\): node `[^`]*`", "", why)
    why = re.sub(r"`[^`]*`", "`..`", why)
    return re.sub(r"\s+", " ", why).strip()


def reason_key(r):
    """Failure reason with node/tensor names and numbers removed, for grouping."""
    import re

    if r["result"] == "export failed":
        return re.sub(r"\s+", " ", re.sub(r"\x1b\[[0-9;]*m", "", r.get("reason", "")))[:160]
    if r["result"] == "fail: numeric":
        why = r.get("reason", "")
        if why.startswith("worker crashed") or "timed out" in why:
            return "fail: numeric: " + re.sub(r"[0-9.e+-]{3,}", "N", why)[:160]
        parts = []
        if "logits error" in why:
            parts.append("logits error above tolerance")
        if "input-gradient error" in why:
            k = r.get("kink_1e-6")
            parts.append("input-gradient error above tolerance" +
                         (", kink probe not run" if k is None else
                          ", input near a kink (float64 gradient moves > 1e-3 under 1e-6 noise)" if k > 1e-3
                          else ", not near a kink"))
        return "fail: numeric: " + ("; ".join(parts) or why)
    items = []
    for why in r.get("reason", "").split("; "):
        why = norm_item(why)
        if why and why not in items:
            items.append(why)
    return f"{r['result']}: " + "; ".join(items)


def export(name, source, exporter, path):
    import torch

    m, size = build(name, source)
    x = torch.randn(2, *size)
    tmp = path + ".tmp"
    if exporter == "torchscript":
        torch.onnx.export(m, (x,), tmp, dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    else:
        batch = torch.export.Dim("batch", min=1, max=64)
        prog = torch.onnx.export(m, (x,), dynamo=True, input_names=["input"],
                                 output_names=["logits"], dynamic_shapes=({0: batch},))
        prog.save(tmp, external_data=False)
    os.replace(tmp, path)


def check(name, source, exporter, work, camserve, timeout):
    """One row. Returns a dict (always; never raises)."""
    row = dict(model=name, exporter=exporter, opset=None, result=None, logits_err=None,
               grad_err=None, torch_logits_err=None, torch_grad_err=None, reason="")
    onnx_path = os.path.join(work, "onnx", f"{name}.{exporter}.onnx")
    out_path = os.path.join(work, "aug", f"{name}.{exporter}.plain.onnx")
    os.makedirs(os.path.dirname(onnx_path), exist_ok=True)
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    t0 = time.time()
    try:
        if not os.path.exists(onnx_path):
            export(name, source, exporter, onnx_path)
    except Exception as e:  # PyTorch's own failure, not camserve's
        row["result"] = "export failed"
        row["reason"] = "export failed: " + (f"{type(e).__name__}: " + str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)[:300]
        return row
    row["export_s"] = round(time.time() - t0, 1)
    import onnx

    mp = onnx.load(onnx_path, load_external_data=False)
    row["opset"] = next((o.version for o in mp.opset_import if o.domain in ("", "ai.onnx")), None)
    del mp

    def run(args):
        try:
            p = subprocess.run([camserve] + args, capture_output=True, text=True, timeout=timeout)
            return p.returncode, p.stdout + "\n" + p.stderr
        except subprocess.TimeoutExpired:
            return -1, f"timeout after {timeout} s"

    rc, out = run(["inspect", onnx_path])
    row["inspect_rc"] = rc
    if rc != 0:
        row["result"] = "fail: inspect"
        row["reason"] = camserve_reason(out)
        k = out.find("unsupported ops")
        row["inspect_output"] = out[k:k + 20000] if k >= 0 else out[-4000:]
        return row
    t1 = time.time()
    if os.path.exists(out_path):
        os.remove(out_path)
    rc, out = run(["augment", onnx_path, "-o", out_path, "--rules", "plain"])
    row["augment_s"] = round(time.time() - t1, 1)
    if rc != 0:
        row["result"] = "fail: augment"
        row["reason"] = camserve_reason(out)
        row["augment_output"] = out[-4000:]
        return row
    try:
        numeric(name, source, out_path, row)
    except Exception as e:
        row["result"] = "fail: numeric"
        row["reason"] = (f"{type(e).__name__}: " + (str(e).strip().splitlines() or [""])[0])[:300]
        row["traceback"] = traceback.format_exc()[-4000:]
    return row


def numeric(name, source, aug_path, row):
    import numpy as np
    import onnxruntime as ort
    import torch

    m, size = build(name, source)
    row["redrawn"] = list(m._redrawn)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, *size, generator=g)
    # torch f32
    x32 = x.clone().requires_grad_(True)
    y32 = m(x32)
    K = y32.shape[1]
    seed = torch.zeros(2, K)
    seed[0, 3 % K] = 1.0
    seed[1, 7 % K] = 1.0
    (y32 * seed).sum().backward()
    l32, g32 = y32.detach().numpy(), x32.grad.numpy()
    # torch f64 (truth)
    m = m.double()
    x64 = x.double().requires_grad_(True)
    y64 = m(x64)
    (y64 * seed.double()).sum().backward()
    l64, g64 = y64.detach().numpy(), x64.grad.numpy()

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(aug_path, so, providers=["CPUExecutionProvider"])
    ins = [i.name for i in sess.get_inputs()]
    img = [n for n in ins if n != "camserve.seed"]
    if len(img) != 1 or "camserve.seed" not in ins:
        raise RuntimeError(f"unexpected inputs {ins}")
    outs = [o.name for o in sess.get_outputs()]
    if "camserve.input_grad.plain" not in outs:
        raise RuntimeError(f"no camserve.input_grad.plain in outputs {outs}")
    logit_name = outs[0]
    lc, gc = sess.run([logit_name, "camserve.input_grad.plain"],
                      {img[0]: x.numpy(), "camserve.seed": seed.numpy()})
    row["logits_err"] = rel(lc, l64)
    row["grad_err"] = rel(gc, g64)
    row["torch_logits_err"] = rel(l32, l64)
    row["torch_grad_err"] = rel(g32, g64)
    tol_l = max(1e-3, 10 * row["torch_logits_err"])
    tol_g = max(1e-3, 10 * row["torch_grad_err"])
    bad = []
    # A check that cannot fail is no check: constant logits or a zero gradient (a dead head) fail the row.
    if float(np.ptp(l64, axis=1).max()) == 0.0 or float(np.abs(g64).max()) == 0.0:
        bad.append("degenerate: the float64 logits are constant or the input gradient is zero")
    if not np.isfinite(row["logits_err"]) or row["logits_err"] > tol_l:
        bad.append(f"logits error {row['logits_err']:.2e} > {tol_l:.2e}")
    grad_bad = not np.isfinite(row["grad_err"]) or row["grad_err"] > tol_g
    if grad_bad:
        bad.append(f"input-gradient error {row['grad_err']:.2e} > {tol_g:.2e}")
    result = "fail: numeric" if bad else "pass"
    if grad_bad and len(bad) == 1:
        # Only the gradient misses, at this input. Near-ties at ReLU/MaxPool: if the float64 gradient itself
        # jumps by as much when the input moves by 1e-6 (about 10 float32 ulps of a unit-scale pixel), the
        # input sits on a kink that any float32 evaluation may land on either side of. Then the same check,
        # same tolerance, is run at 4 nearby inputs x + 1e-6 * noise: a wrong rule misses at all of them, a
        # kink at most at a few. The row passes as "pass (kink)" when 3 of 4 meet the tolerance and the
        # float64 gradient moves by at least a tenth of camserve's error among them.
        errs, moves = [], []
        for k in range(4):
            noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(2 + k), dtype=torch.float64)
            xk = (x.double() + 1e-6 * noise).requires_grad_(True)
            (m(xk) * seed.double()).sum().backward()
            gk64 = xk.grad.numpy()
            (gck,) = sess.run(["camserve.input_grad.plain"],
                              {img[0]: xk.detach().numpy().astype(np.float32), "camserve.seed": seed.numpy()})
            errs.append(rel(gck, gk64))
            moves.append(rel(gk64, g64))
        row["nearby_grad_errs"] = errs
        row["kink_1e-6"] = max(moves)
        ok = sum(e <= tol_g for e in errs)
        bad.append(f"float64 gradient moves {row['kink_1e-6']:.1e} under 1e-6 input noise; at 4 nearby "
                   f"inputs the error is {', '.join(f'{e:.1e}' for e in errs)} ({ok}/4 within {tol_g:.0e})")
        if ok >= 3 and row["kink_1e-6"] >= row["grad_err"] / 10:
            result = "pass (kink)"
    del m
    row["result"] = result
    row["reason"] = "; ".join(bad)


def worker(args):
    import torch

    torch.set_num_threads(2)
    src = dict(MODELS)[args.worker]
    row = check(args.worker, src, args.worker_exporter, args.work, args.camserve, args.timeout)
    with open(args.result_file, "w") as f:
        json.dump(row, f, indent=1)


def git_commit():
    try:
        c = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                           text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return c + (" (+ uncommitted changes in the working tree)" if dirty else "")
    except Exception:
        return "unknown"


def fmt(v):
    return "" if v is None else f"{v:.1e}"


def report(work, rows, out_md, total_s):
    import re

    import onnx
    import timm
    import torch

    try:
        import onnxruntime
        ortv = onnxruntime.__version__
    except Exception:
        ortv = "missing"
    L = []
    L.append("# Model coverage")
    L.append("")
    L.append("Generated by `scripts/coverage.py` (needs the PyTorch venv; not run by CI) on "
             f"{datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}.")
    L.append("")
    L.append(f"Versions: torch {torch.__version__}, timm {timm.__version__}, onnx {onnx.__version__}, "
             f"onnxruntime {ortv}, camserve commit {git_commit()}.")
    if total_s is not None:
        L.append(f"Sum of the per-row times (export + checks; rows may run in parallel with --jobs): {total_s / 60:.1f} min on 2 shared CPU cores.")
    L.append("")
    L.append("Each model has random weights (pretrained=False, seed 0, eval mode) at its native input size, "
             "exported with a dynamic batch by the TorchScript exporter (`dynamo=False`, opset 17) and by "
             "the dynamo exporter (`dynamo=True`, its default opset). Each export goes through "
             "`camserve inspect` and `camserve augment --rules plain`, then ONNX Runtime (CPU) runs the explain "
             "graph on 2 random images with 2 different one-hot seeds. Parameters that the model's own init sets "
             "to all zeros (other than biases: zero-init heads, class tokens, residual-branch gammas and gains, "
             "attention biases) are redrawn first, U(0.5, 1.5) for vectors and N(0, 0.02) otherwise, since at "
             "zero they make the logits constant or whole branches dead and the check vacuous; the models "
             "concerned are listed under the table. A row whose float64 logits are constant or whose float64 "
             "input gradient is zero fails as degenerate.")
    L.append("")
    L.append("**Criterion.** The truth is the PyTorch model in float64 (`model.double()`). Relative error = "
             "max|a - b| / max|b|. camserve's float32 error vs the float64 truth must be "
             "<= max(1e-3, 10 x PyTorch's own float32 error vs float64), for the logits and for the plain "
             "input gradient separately. Near-ties at ReLU/MaxPool make float32 input gradients of deep "
             "random-weight nets ill-conditioned, so PyTorch's own float32 error sets the floor.")
    L.append("")
    L.append("**Kinks.** When only the input gradient misses, the float64 gradient is also taken at 4 nearby "
             "inputs x + 1e-6 * noise (about 10 float32 ulps of a unit-scale pixel). If it moves there by at "
             "least a tenth of camserve's error (x sits on a ReLU/MaxPool near-tie that any float32 evaluation "
             "may land on either side of) and camserve meets the same tolerance at 3 of the 4 nearby inputs, "
             "the row is `pass (kink)`: a wrong rule would miss at all of them. The reason column gives the "
             "numbers.")
    L.append("")
    L.append("Columns: logits err / grad err = camserve vs float64; torch f32 = PyTorch float32 vs float64 "
             "(logits / gradient).")
    L.append("")
    L.append("| model | exporter | opset | result | logits err | grad err | torch f32 (logits / grad) | reason |")
    L.append("|---|---|---|---|---|---|---|---|")
    for r in rows:
        tf = "" if r.get("torch_logits_err") is None else \
            f"{fmt(r['torch_logits_err'])} / {fmt(r['torch_grad_err'])}"
        reason = re.sub(r"\x1b\[[0-9;]*m", "", r.get("reason") or "").replace("|", "\\|")
        L.append(f"| {r['model']} | {r['exporter']} | {r.get('opset') or ''} | {r['result']} | "
                 f"{fmt(r.get('logits_err'))} | {fmt(r.get('grad_err'))} | {tf} | {reason} |")
    L.append("")
    redrawn = [f"{r['model']} ({len(r['redrawn'])})" for r in rows
               if r.get("redrawn") and r["exporter"] == EXPORTERS[0]]
    L.append("Models with redrawn all-zero parameters (tensor count): " + (", ".join(redrawn) or "none") + ".")
    L.append("")
    L.append("## Summary")
    L.append("")
    L.append("Pass rate counts only exports that PyTorch produced; export failures are listed separately.")
    L.append("")
    L.append("| exporter | rows | export failed | camserve pass (of which kink) | pass rate |")
    L.append("|---|---|---|---|---|")
    for ex in EXPORTERS + ["all"]:
        rs = [r for r in rows if ex == "all" or r["exporter"] == ex]
        ef = sum(r["result"] == "export failed" for r in rs)
        ok = sum(is_pass(r) for r in rs)
        kink = sum(r["result"] == "pass (kink)" for r in rs)
        n = len(rs) - ef
        rate = f"{100 * ok / n:.0f} % ({ok}/{n})" if n else "-"
        L.append(f"| {ex} | {len(rs)} | {ef} | {ok} ({kink}) | {rate} |")
    L.append("")
    L.append("### Failure reasons")
    L.append("")
    groups = {}
    for r in rows:
        if is_pass(r):
            continue
        for k in ("inspect_output", "augment_output"):
            if r["result"] in ("fail: inspect", "fail: augment") and r.get(k):
                r["reason"] = camserve_reason(r[k])  # rows cached before this parser
        key = reason_key(r)
        groups.setdefault(key, []).append(f"{r['model']} ({r['exporter']})")
    if not groups:
        L.append("None.")
    for k, v in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        L.append(f"- {len(v)} x `{k}`: {', '.join(v)}")
    L.append("")
    os.makedirs(os.path.dirname(out_md), exist_ok=True)
    with open(out_md, "w") as f:
        f.write("\n".join(L))


PASS_GOAL = 0.95


def is_pass(r):
    return r.get("result") in ("pass", "pass (kink)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma-separated model names")
    ap.add_argument("--exporter", choices=EXPORTERS)
    ap.add_argument("--redo", action="store_true", help="redo every selected row (exports are re-made too)")
    ap.add_argument("--redo-failed", action="store_true",
                    help="redo only rows whose cached result is not pass (cached exports are reused)")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--jobs", type=int, default=1, help="rows run in parallel (each ~1-3 GB)")
    ap.add_argument("--work", default="/work/coverage")
    ap.add_argument("--camserve", default=os.path.join(REPO, "target", "debug", "camserve"))
    ap.add_argument("--timeout", type=int, default=300, help="per camserve call, seconds")
    ap.add_argument("--row-timeout", type=int, default=900, help="per row (export + checks), seconds")
    ap.add_argument("--out", default=os.path.join(REPO, "docs", "COVERAGE.md"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-exporter", help=argparse.SUPPRESS)
    ap.add_argument("--result-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    res_dir = os.path.join(args.work, "results")
    os.makedirs(res_dir, exist_ok=True)
    only = set(args.only.split(",")) if args.only else None
    exporters = [args.exporter] if args.exporter else EXPORTERS
    t0 = time.time()
    if not args.report_only:
        tasks = []
        for name, _src in MODELS:
            if only and name not in only:
                continue
            for ex in exporters:
                rf = os.path.join(res_dir, f"{name}.{ex}.json")
                if os.path.exists(rf):
                    with open(rf) as f:
                        prev = json.load(f)
                    if not args.redo and not (args.redo_failed and not is_pass(prev)):
                        continue
                if args.redo:
                    p = os.path.join(args.work, "onnx", f"{name}.{ex}.onnx")
                    if os.path.exists(p):
                        os.remove(p)
                tasks.append((name, ex, rf))

        # Run the families most likely to need new rules first (the table keeps MODELS order).
        tasks.sort(key=lambda t: (t[0] not in FIRST, EXTRAS.count(t[0])))
        started = time.time()

        def one(task):
            name, ex, rf = task
            if os.path.exists(rf) and os.path.getmtime(rf) > started:
                return  # finished meanwhile by another run
            t = time.time()
            onnx_path = os.path.join(args.work, "onnx", f"{name}.{ex}.onnx")
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--worker-exporter", ex,
                   "--result-file", rf + ".tmp", "--work", args.work, "--camserve", args.camserve,
                   "--timeout", str(args.timeout)]
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.row_timeout)
                if os.path.exists(rf + ".tmp"):
                    os.replace(rf + ".tmp", rf)
                    with open(rf) as f:
                        r = json.load(f)
                else:
                    why = f"worker crashed (rc {p.returncode}): " + first_line(p.stderr, prefer=("Error", "error"))
                    r = dict(model=name, exporter=ex, result="fail: numeric", reason=why)
                    if not os.path.exists(onnx_path):
                        r.update(result="export failed", reason="export failed: " + why)
            except subprocess.TimeoutExpired:
                why = f"row timed out after {args.row_timeout} s"
                r = dict(model=name, exporter=ex, result="fail: numeric", reason=why)
                if not os.path.exists(onnx_path):
                    r.update(result="export failed", reason="export failed: " + why)
            r["row_s"] = round(time.time() - t, 1)
            with open(rf, "w") as f:
                json.dump(r, f, indent=1)
            print(f"{time.strftime('%H:%M:%S')} {name:34s} {ex:11s} {r['result']:14s} "
                  f"{r['row_s']:6.1f}s {r.get('reason', '')[:150]}", flush=True)

        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            list(pool.map(one, tasks))
    rows = []
    for name, _src in MODELS:
        for ex in EXPORTERS:
            rf = os.path.join(res_dir, f"{name}.{ex}.json")
            if os.path.exists(rf):
                with open(rf) as f:
                    rows.append(json.load(f))
    total = sum(r.get("row_s", 0) for r in rows)
    report(args.work, rows, args.out, total)
    print(f"wrote {args.out} ({len(rows)} rows; this run {time.time() - t0:.0f} s)")
    # The goal (issue 11): at least 95 % of the exports PyTorch produced pass. Exit 1 when it is missed.
    exported = [r for r in rows if r.get("result") != "export failed"]
    passed = sum(is_pass(r) for r in exported)
    rate = passed / len(exported) if exported else 0.0
    print(f"pass rate {passed}/{len(exported)} = {100 * rate:.1f} % (goal >= {100 * PASS_GOAL:.0f} %)")
    if rate < PASS_GOAL:
        sys.exit(1)


if __name__ == "__main__":
    main()
