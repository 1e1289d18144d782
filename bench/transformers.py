#!/usr/bin/env python3
"""camserve against pytorch-grad-cam (with its reshape_transform) on vision transformers, in one session.

    /work/venv/bin/python bench/transformers.py [--rounds 3] [--per-round 4] [--threads 2] [--models vit_b_16,swin_t]

For torchvision `vit_b_16` and `swin_t` (seeded random weights, eval, 224x224, batch 1, CPU), exported with the
TorchScript exporter (opset 17, dynamic batch), it measures:
  - `camserve augment IN --output OUT` on ViT-B/16 (release binary, median of 3) and the model's size;
  - one Grad-CAM explanation, target class --target, the same 224x224 PNG for both sides:
      pytorch-grad-cam 1.5.7 `GradCAM` with the reshape_transform of its tutorials (ViT: target layer
      `encoder.layers[-1].ln_1`, class token dropped, 14x14 grid; Swin-T: `features[-1][-1].norm1`, torchvision
      keeps [N, H, W, C], so the transform is a permute to NCHW), torch threads --threads;
      camserve over HTTP (`camserve serve`, one client, `methods=gradcam`, outputs `raw` and the default
      `heatmap,overlay`);
      camserve in engine (`camserve-bench --plans forward,gradcam`, the default layer, ONNX Runtime only);
    the HTTP and PyTorch timings alternate in rounds (--rounds x --per-round runs each, after warm-up) so that
    drift hits both sides; camserve-bench runs once per model, between the first and the second round;
  - that camserve's default layer is the same module as pytorch-grad-cam's target layer, and that camserve's raw
    map equals pytorch-grad-cam's map at the token grid: pytorch-grad-cam's own `get_cam_image` on the
    activations and gradients it captured (after its reshape_transform), with its ReLU, before its
    `scale_cam_image` (min-max normalisation and upsampling to 224).
Prints Markdown tables. Needs torch, torchvision, grad-cam, Pillow and a release build (`cargo build --release --bins`).

torchvision initialises ViT's classification head to zeros, which makes every gradient zero; the script
re-initialises it (normal, std 0.02, seeded) so the maps are not trivially zero.
"""

import argparse
import base64
import json
import pathlib
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import torch
import torchvision
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

ROOT = pathlib.Path(__file__).resolve().parent.parent
CAMSERVE = ROOT / "target/release/camserve"
BENCH = ROOT / "target/release/camserve-bench"
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def vit_reshape_transform(tensor, height=14, width=14):
    # pytorch-grad-cam's ViT tutorial: drop the class token, tokens to a grid, channels first.
    result = tensor[:, 1:, :].reshape(tensor.size(0), height, width, tensor.size(2))
    result = result.transpose(2, 3).transpose(1, 2)
    return result


def swin_reshape_transform(tensor):
    # pytorch-grad-cam's Swin tutorial reshapes [N, L, C] tokens to [N, H, W, C] then moves channels first;
    # torchvision's Swin already keeps [N, H, W, C], so only the permute is left.
    return tensor.permute(0, 3, 1, 2)


def build(name):
    torch.manual_seed(0)
    if name == "vit_b_16":
        model = torchvision.models.vit_b_16(weights=None)
        torch.nn.init.normal_(model.heads.head.weight, std=0.02)
        torch.nn.init.normal_(model.heads.head.bias, std=0.02)
        model.eval()
        return model, model.encoder.layers[-1].ln_1, vit_reshape_transform, (14, 14)
    if name == "swin_t":
        model = torchvision.models.swin_t(weights=None).eval()
        return model, model.features[-1][-1].norm1, swin_reshape_transform, (7, 7)
    raise SystemExit(f"unknown model {name}")


def export(model, path):
    x = torch.randn(1, 3, 224, 224)
    torch.onnx.export(model, x, str(path), opset_version=17, dynamo=False, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url, body):
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "image/png"}, method="POST")
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req) as r:
            data = r.read()
    except urllib.error.HTTPError as e:  # camserve's error body (e.g. a refused op) is JSON too
        data = e.read()
    return (time.perf_counter() - t0) * 1000, json.loads(data)


class Server:
    def __init__(self, name, path, log):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = open(log, "w")
        self.proc = subprocess.Popen([str(CAMSERVE), "serve", "--model", f"{name}={path}", "--bind", f"127.0.0.1:{self.port}"],
                                     cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 600
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"camserve serve exited with {self.proc.returncode}; see {log}")
            try:
                with urllib.request.urlopen(f"{self.base}/readyz") as r:
                    if r.status == 200:
                        return
            except Exception:
                pass
            time.sleep(0.3)
        raise RuntimeError("camserve serve not ready after 600 s")

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--per-round", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--target", type=int, default=281)
    ap.add_argument("--models", default="vit_b_16,swin_t")
    ap.add_argument("--image", default=str(ROOT / "assets/photos/chelsea.jpg"))
    ap.add_argument("--augment-runs", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    n_total = a.rounds * a.per_round
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}, torch {torch.__version__}, torch threads {a.threads}")

    tmp = pathlib.Path(tempfile.mkdtemp(prefix="camserve-tf-"))
    # One 224x224 PNG: camserve does not resize an image of the model's size, so both sides see the same pixels.
    img = Image.open(a.image).convert("RGB")
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((224, 224), Image.BILINEAR)
    png = tmp / "input.png"
    img.save(png)
    body = png.read_bytes()
    arr = (np.asarray(Image.open(png).convert("RGB"), dtype=np.float32) / 255.0 - MEAN) / STD
    x = torch.from_numpy(arr.transpose(2, 0, 1).copy())[None]

    rows, checks, augment = [], [], None
    for name in a.models.split(","):
        model, layer, reshape, grid = build(name)
        path = tmp / f"{name}.onnx"
        t = time.perf_counter()
        export(model, path)
        print(f"\n{name}: exported {path.stat().st_size / 1e6:.1f} MB in {time.perf_counter() - t:.1f} s")

        if name == "vit_b_16":
            times, printed = [], []
            for i in range(a.augment_runs):
                out = tmp / f"{name}.aug.onnx"
                t = time.perf_counter()
                r = subprocess.run([str(CAMSERVE), "augment", str(path), "--output", str(out)], cwd=ROOT, capture_output=True, text=True)
                times.append((time.perf_counter() - t) * 1000)
                if r.returncode != 0:
                    print(f"camserve augment failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
                    augment = dict(model=name, size_mb=path.stat().st_size / 1e6, error=(r.stdout + r.stderr).strip()[-400:],
                                   wall_ms=statistics.median(times))
                    times = []
                    break
                printed.append((r.stdout + r.stderr).strip().splitlines()[-1] if (r.stdout + r.stderr).strip() else "")
            if times:
                augment = dict(model=name, size_mb=path.stat().st_size / 1e6, out_mb=out.stat().st_size / 1e6,
                               wall_ms=statistics.median(times), all_ms=times, printed=printed)
                print(f"augment: wall {['%.0f' % v for v in times]} ms; camserve printed: {printed}")

        # pytorch-grad-cam as its users call it.
        cam = GradCAM(model=model, target_layers=[layer], reshape_transform=reshape)
        targets = [ClassifierOutputTarget(a.target)]

        def run_pgc():
            return cam(input_tensor=x, targets=targets)

        # Reference grid map from pytorch-grad-cam's own captures (before scale_cam_image).
        full = run_pgc()
        acts = cam.activations_and_grads.activations[0].cpu().numpy()
        grads = cam.activations_and_grads.gradients[0].cpu().numpy()
        ref = np.maximum(cam.get_cam_image(x, layer, targets, acts, grads, False), 0)[0]
        with torch.no_grad():
            top1 = int(model(x).argmax())

        row = dict(model=name, grid=grid)
        # `camserve inspect`: the default layer, its module path, and what the rewrite refuses (exit 2).
        ins = subprocess.run([str(CAMSERVE), "inspect", str(path)], cwd=ROOT, capture_output=True, text=True)
        text = ins.stdout + ins.stderr
        dl = re.search(r"default layer: (\S+)", text)
        if dl:
            row["default_layer"] = dl.group(1)
            m = re.search(re.escape(dl.group(1)) + r" .*module (\S+)", text)
            row["module"] = m.group(1) if m else None
        refused = {}
        for m in re.finditer(r"^  (\w+) \(node `[^`]*`\): node `[^`]*` \(\w+\): (.*)$", text, re.M):
            refused[f"{m.group(1)}: {m.group(2)}"] = refused.get(f"{m.group(1)}: {m.group(2)}", 0) + 1
        row["refused"] = refused
        print(f"camserve inspect (exit {ins.returncode}): default layer {row.get('default_layer')} (module {row.get('module')}); "
              f"refused on the gradient path: {refused or 'nothing'}")
        try:
            srv = Server(name, path, tmp / f"{name}.serve.log")
        except Exception as e:
            print(f"camserve serve failed: {e}\n{(tmp / f'{name}.serve.log').read_text()[-3000:]}")
            srv = None
        if srv is not None:
            info = json.loads(urllib.request.urlopen(f"{srv.base}/v1/models/{name}").read())
            dl = info.get("default_layer")
            mod = next((l.get("module") for l in info.get("layers", []) if l.get("name") == dl), None)
            print(f"camserve default layer: {dl} (module {mod})")
            q = urllib.parse.urlencode({"methods": "gradcam", "target": a.target})
            url_raw = f"{srv.base}/v1/models/{name}/explain?{q}&outputs=raw"
            url_img = f"{srv.base}/v1/models/{name}/explain?{q}"
            _, j = post(url_raw, body)
            if "explanations" not in j:
                print(f"explain failed: {j}")
                row["explain_error"] = json.dumps(j)[:400]
                url_raw = url_img = None
            else:
                e = j["explanations"][0]
                raw = e["raw"]
                ours = np.frombuffer(base64.b64decode(raw["data"]), dtype="<f4").reshape(raw["shape"])
                ours2 = ours.reshape(ours.shape[-2:])
                rel = float(np.abs(ours2 - ref).max() / max(np.abs(ref).max(), 1e-30))
                norm = lambda m: (m - m.min()) / max(m.max() - m.min(), 1e-7)
                rel_n = float(np.abs(norm(ours2) - norm(ref)).max())
                checks.append(dict(model=name, shape=list(raw["shape"]), ref_shape=list(ref.shape), rel=rel, rel_norm=rel_n,
                                   ref_max=float(ref.max()), ours_max=float(ours2.max()), layer=e.get("layer"),
                                   top1_torch=top1, top1_camserve=j["predictions"][0]["index"]))
                print(f"raw {raw['shape']} vs reference {list(ref.shape)}: max rel error {rel:.2e} "
                      f"(after min-max normalisation {rel_n:.2e}); max {ours2.max():.4g} vs {ref.max():.4g}")

        # Warm-up, then interleaved rounds: pytorch-grad-cam, HTTP raw, HTTP heatmap+overlay.
        for _ in range(2):
            run_pgc()
            if srv is not None and url_raw:
                post(url_raw, body)
                post(url_img, body)
        pgc, http_raw, http_img, eng_raw = [], [], [], []
        for r in range(a.rounds):
            if r == 1:
                cmd = [str(BENCH), "--model", str(path), "--batch", "1", "--iters", str(n_total), "--threads", str(a.threads),
                       "--device", "cpu", "--plans", "forward,gradcam"]
                res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
                if res.returncode == 0:
                    got = {m.group(1): float(m.group(2)) for m in re.finditer(r"\| 1 \| (\w+) \| ([\d.]+) \|", res.stdout)}
                    row["engine_forward"], row["engine_gradcam"] = got.get("forward"), got.get("gradcam")
                    print(res.stdout.strip())
                else:
                    print(f"camserve-bench failed ({res.returncode}): {res.stderr[-2000:]}")
                    err = [l for l in res.stderr.splitlines() if l.lower().startswith("error")]
                    row["bench_error"] = err[0][:400] if err else f"exit {res.returncode}"
                    # the forward pass alone, for scale
                    res = subprocess.run(cmd[:-1] + ["forward"], cwd=ROOT, capture_output=True, text=True)
                    got = {m.group(1): float(m.group(2)) for m in re.finditer(r"\| 1 \| (\w+) \| ([\d.]+) \|", res.stdout)}
                    row["engine_forward"] = got.get("forward")
                    print(res.stdout.strip() or res.stderr[-1000:])
            for _ in range(a.per_round):
                t = time.perf_counter()
                run_pgc()
                pgc.append((time.perf_counter() - t) * 1000)
            if srv is not None and url_raw:
                for _ in range(a.per_round):
                    ms, j = post(url_raw, body)
                    http_raw.append(ms)
                    eng_raw.append(j["timings_ms"])
                for _ in range(a.per_round):
                    http_img.append(post(url_img, body)[0])
        if srv is not None:
            srv.close()
        row["pgc"] = statistics.median(pgc)
        row["pgc_all"] = pgc
        if http_raw:
            row["http_raw"] = statistics.median(http_raw)
            row["http_img"] = statistics.median(http_img)
            row["server_inference"] = statistics.median(t["inference"] for t in eng_raw)
            row["server_total"] = statistics.median(t["total"] for t in eng_raw)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "pgc_all"}, default=str))

    f = lambda v: "" if v is None else f"{v:.1f}"
    ratio = lambda n, d: "" if n is None or d is None else f"{n / d:.3f}"
    print(f"\nbatch 1, 224x224, CPU, {a.threads} threads, Grad-CAM, target class {a.target}, median of {n_total} (ms)\n")
    print("| model | pytorch-grad-cam | camserve HTTP, raw | camserve HTTP, heatmap+overlay | camserve in engine | "
          "HTTP raw / pytorch-grad-cam | in engine / pytorch-grad-cam |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {f(r['pgc'])} | {f(r.get('http_raw'))} | {f(r.get('http_img'))} | {f(r.get('engine_gradcam'))} | "
              f"{ratio(r.get('http_raw'), r['pgc'])} | {ratio(r.get('engine_gradcam'), r['pgc'])} |")
    print()
    for r in rows:
        print(f"{r['model']}: camserve forward in engine {f(r.get('engine_forward'))} ms; server inference (timings_ms) "
              f"{f(r.get('server_inference'))} ms, server total {f(r.get('server_total'))} ms; default layer "
              f"{r.get('default_layer')} (module {r.get('module')})")
        for k, v in r.get("refused", {}).items():
            print(f"{r['model']}: refused {v}x {k}")
        for k in ("explain_error", "bench_error"):
            if r.get(k):
                print(f"{r['model']}: {k}: {r[k]}")
    for c in checks:
        print(f"{c['model']}: raw {c['shape']} vs pytorch-grad-cam grid {c['ref_shape']}: max |diff| / max|ref| = {c['rel']:.2e}, "
              f"after min-max {c['rel_norm']:.2e}; top-1 torch {c['top1_torch']}, camserve {c['top1_camserve']}")
    if augment and "error" in augment:
        print(f"\ncamserve augment {augment['model']} ({augment['size_mb']:.1f} MB) refused after {augment['wall_ms']:.0f} ms: {augment['error']}")
    elif augment:
        print(f"\ncamserve augment {augment['model']} ({augment['size_mb']:.1f} MB -> {augment['out_mb']:.1f} MB): median wall "
              f"{augment['wall_ms']:.0f} ms of {len(augment['all_ms'])} ({', '.join('%.0f' % v for v in augment['all_ms'])}); "
              f"printed: {augment['printed']}")
    # What the benchmark exists to show: camserve explains both models, on pytorch-grad-cam's layer, with the same
    # map (within 1e-3 of its grid map). Exit 1 when any of that fails.
    failures = [f"{r['model']}: {k}" for r in rows for k in ("refused", "explain_error") if r.get(k)]
    failures += [f"{c['model']}: map differs by {c['rel']:.2e}" for c in checks if c["rel"] > 1e-3]
    failures += [f"{m}: no map compared" for m in a.models.split(",") if m not in {c["model"] for c in checks}]
    if augment and "error" in augment:
        failures.append(f"augment {augment['model']}: {augment['error']}")
    if failures:
        print("FAILED: " + "; ".join(failures))
        sys.exit(1)


if __name__ == "__main__":
    main()
