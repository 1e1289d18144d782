#!/usr/bin/env python3
"""Segmentation, multi-label and embedding explanations: camserve against pytorch-grad-cam with the same target, one
session, CPU.

    /work/venv-det/bin/python bench/tasks.py [--n 7] [--threads 2] [--tasks segmentation,multilabel,embedding]
    (needs a release build and the fixtures; --tasks: a comma-separated subset, default all three)

camserve serves the segmentation fixtures (tests/fixtures/segmentation: LRASPP and DeepLabV3 with MobileNetV3-Large,
256x256, 6 classes) and the multi-label fixture (tests/fixtures/multilabel: MobileNetV3-small with its Sigmoid,
224x224, 6 classes) and answers HTTP requests for a PNG photo (tests/fixtures/detection/photos/chelsea.png): the
default explain request with `methods=gradcam&outputs=raw` (a segmenter: the largest class that is not the
background over its predicted pixels, at the default layer, the classifier's input; a multi-label classifier: every
class scoring at least 0.5, one explain pass for all of them), one request at a time, the client's wall time
(decode, the forward pass that finds the targets, the explain pass).

pytorch-grad-cam 1.5.7's GradCAM runs on the same PyTorch models, rebuilt by the fixture scripts (`build`,
`calibrate` and the head's conditioning: the same weights), on the fixture's input tensor of the same photo, as its
tutorials run it: a forward pass for the predicted mask (or the scores), then one call with
`SemanticSegmentationTarget(class, mask)` at the same layer (a multi-label classifier: one call for all default
targets with `ClassifierOutputTarget`, the image repeated once per target, the library's batched form). Prints a
Markdown table of medians and ratios.

The embedding rows (a second table): camserve also serves the embedding fixtures (tests/fixtures/embedding: ResNet-50
without its fc, 2048-d; DINOv2-small's widths at 4 layers, 384-d; CLIP ViT-B/32's vision tower at 2 layers with its
projection, 512-d; 224x224, ImageNet mean and std, stretched) and answers, for the same photo: predict (one image:
its embedding) and two explain requests with `methods=gradcam&outputs=raw` at the fixture's layer (ResNet-50
`layer4`, DINOv2 the last layer's norm1, CLIP the last layer's layer_norm1: camserve's `default_layer` when it is
that tensor, else `layer=<the fixture's ONNX tensor>`, checked with GET /v1/models/{m}): (a) multipart with the file
parts `image` (chelsea.png) and `reference` (coffee.png): one forward pass embeds both, one explain pass over both
rows, both maps (the image against the reference's embedding, the reference against the image's); (b) multipart with
`image` and the text part `reference_vector` (the fixture's client vector, `vector` in references_<m>.npz,
comma-separated float32 values): one row. pytorch-grad-cam 1.5.7's
GradCAM runs on the same PyTorch models (the fixture script's `build`, ResNet-50's BatchNorm `calibrate` on the 7
photos: the same weights), on the fixture's preprocessing of the same photos (`load_input`, without the fixture's
jitter, as camserve gets the PNG files), with the fixture's `SimilarityToConceptTarget` (the library's tutorial
"Pixel Attribution for embeddings") at the same module (the tutorial's ViT reshape_transform, `tokens_to_grid`, for
the token layers): (a) a no-grad forward of the batch of the two images for the embeddings, then one call on that
batch with one target per row (the other row's embedding), the library's batched form; (b) a no-grad forward of the
image (its embedding, for the similarity camserve reports), then one call on the image with the vector (the call
alone is printed below the table too). The PyTorch forward column there is a no-grad forward of one image. Each
side's similarities and maps are compared (printed below the table: the maps as pytorch-grad-cam scales them,
camserve's raw map through the library's own `scale_cam_image`).
"""

import argparse
import base64
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import torch
import torch.nn as nn
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget, SemanticSegmentationTarget

from multipass import median_s, post

ROOT = pathlib.Path(__file__).resolve().parent.parent
SEG = ROOT / "tests/fixtures/segmentation"
ML = ROOT / "tests/fixtures/multilabel"
PHOTO = ROOT / "tests/fixtures/detection/photos/chelsea.png"
PHOTO_INDEX = 3  # chelsea.png among the sorted photos (the fixtures' keys)
EMB = ROOT / "tests/fixtures/embedding"
REFERENCE = ROOT / "tests/fixtures/detection/photos/coffee.png"
REFERENCE_INDEX = 4  # coffee.png
EMB_LAYERS = {"resnet50": "layer4", "dinov2": "norm1", "clip": "layer_norm1"}  # the fixture's layer per embedder
TASKS = ("segmentation", "multilabel", "embedding")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def module(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    argv, sys.argv = sys.argv, [sys.argv[0]]
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.argv = argv
    return mod


def post_multipart(url, parts):
    """POST a multipart/form-data body: parts are (name, filename or None, bytes); a file part is sent as image/png."""
    boundary = "camserve-bench-7c1f0e9a2b"
    body = bytearray()
    for name, filename, data in parts:
        body += f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"".encode()
        if filename:
            body += f"; filename=\"{filename}\"\r\nContent-Type: image/png".encode()
        body += b"\r\n\r\n" + data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    req = urllib.request.Request(url, data=bytes(body), headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=900) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise SystemExit(f"{url}: HTTP {e.code}: {e.read().decode(errors='replace')}")


def raw_map(explanation):
    r = explanation["raw"]
    assert r["dtype"] == "float32", r["dtype"]
    return np.frombuffer(base64.b64decode(r["data"]), dtype="<f4").reshape(r["shape"])


def emb_onnx_tensor(name):
    """The fixture's ONNX tensor for the model's explained layer (references_<m>.json, `layers`)."""
    return json.loads((EMB / f"references_{name}.json").read_text())["layers"][EMB_LAYERS[name]]["onnx_tensor"]


def emb_vector(name):
    """The fixture's client vector (float32 [D])."""
    return np.load(EMB / f"references_{name}.npz")["vector"]


def camserve_times(png, threads, n, tasks=TASKS, reference_png=None):
    port = 18743
    env = dict(os.environ, CAMSERVE_RUNTIME__THREADS=str(threads), CAMSERVE_RUNTIME__DEVICE="cpu")
    cfg = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
    if "segmentation" in tasks:
        for name in ("lraspp", "deeplabv3"):
            cfg.write(f'[[models]]\nname = "{name}"\npath = "{SEG / f"{name}_256.onnx"}"\nlabels = "{SEG / "labels.txt"}"\n')
    if "multilabel" in tasks:
        cfg.write(f'[[models]]\nname = "multilabel"\npath = "{ML / "multilabel_224.onnx"}"\nlabels = "{ML / "labels.txt"}"\n')
    if "embedding" in tasks:
        for name in EMB_LAYERS:
            cfg.write(f'[[models]]\nname = "{name}"\npath = "{EMB / f"{name}_224.onnx"}"\n'
                      f'mean = {list(IMAGENET_MEAN)}\nstd = {list(IMAGENET_STD)}\n')
    cfg.close()
    proc = subprocess.Popen([str(ROOT / "target/release/camserve"), "serve", "--config", cfg.name, "--bind", f"127.0.0.1:{port}"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(900):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1)
                break
            except Exception:
                time.sleep(0.2)
        out = {}
        names = (("lraspp", "deeplabv3") if "segmentation" in tasks else ()) + (("multilabel",) if "multilabel" in tasks else ())
        for name in names:
            base = f"http://127.0.0.1:{port}/v1/models/{name}"
            out[name, "predict"] = median_s(lambda: post(f"{base}/predict", png), n)
            answer = post(f"{base}/explain?methods=gradcam&outputs=raw", png)
            out[name, "targets"] = [e["target"]["index"] for e in answer["explanations"]]
            out[name, "explain"] = median_s(lambda: post(f"{base}/explain?methods=gradcam&outputs=raw", png), n)
        for name in EMB_LAYERS if "embedding" in tasks else ():
            base = f"http://127.0.0.1:{port}/v1/models/{name}"
            with urllib.request.urlopen(base, timeout=60) as r:
                view = json.loads(r.read())
            assert view["task"] == "embedding" and view["resize"] == "stretch", (view["task"], view["resize"])
            tensor = emb_onnx_tensor(name)
            out[name, "default_layer"] = view["default_layer"]
            query = "methods=gradcam&outputs=raw" + ("" if view["default_layer"] == tensor else "&" + urllib.parse.urlencode({"layer": tensor}))
            out[name, "query"] = query
            # A text part takes the comma-separated form (not a JSON array); float32 values, shortest round-trip text.
            vector = ",".join(str(v) for v in emb_vector(name))
            pair = [("image", "chelsea.png", png), ("reference", "coffee.png", reference_png)]
            single = [("image", "chelsea.png", png), ("reference_vector", None, vector.encode())]
            out[name, "predict"] = median_s(lambda: post(f"{base}/predict", png), n)
            for case, parts, rows in (("pair", pair, 2), ("vector", single, 1)):
                answer = post_multipart(f"{base}/explain?{query}", parts)
                ex = answer["explanations"]
                assert len(ex) == rows and all(e["layer"] == tensor for e in ex), (name, case, [e.get("layer") for e in ex])
                assert [e["target"]["image"] for e in ex] == ["query", "reference"][:rows], (name, case)
                out[name, case, "similarity"] = [e["target"]["similarity"] for e in ex]
                out[name, case, "maps"] = [raw_map(e) for e in ex]
                out[name, case] = median_s(lambda: post_multipart(f"{base}/explain?{query}", parts), n)
        return out
    finally:
        proc.terminate()
        proc.wait()
        os.unlink(cfg.name)


def pytorch_times(threads, n, tasks=TASKS):
    torch.set_num_threads(threads)
    out = {}
    if "segmentation" in tasks:
        fx = module(SEG / "make_segmentation_fixtures.py", "make_segmentation_fixtures")
        # The photos as the fixture script reads them (its weights are conditioned on these; its per-model inputs add a
        # jitter of half a grey level to some, which does not change the timing).
        inputs = [fx.load_input(p)[0][None] for p in fx.PHOTOS]
        batch = torch.cat(inputs)
        for name in ("lraspp", "deeplabv3"):
            model = fx.build(name)
            fx.calibrate(model, batch)
            fx.condition_head(name, model, batch, fx.CONFIG[name])
            model.eval()
            x = inputs[PHOTO_INDEX]
            path, where = fx.CONFIG[name]["layers"]["decoder"]
            if where == "input":  # LRASPP: the tensor entering the classifier conv, tapped as pytorch-grad-cam needs it
                parent_path, attr = path.rsplit(".", 1)
                parent = fx.module_of(model, parent_path)
                setattr(parent, attr, nn.Sequential(nn.Identity(), getattr(parent, attr)))
                layer = getattr(parent, attr)[0]
            else:
                layer = fx.module_of(model, path)
            cam = GradCAM(model=model, target_layers=[layer])

            def explain(x=x, cam=cam, model=model):
                with torch.no_grad():
                    label = model(x)[0].argmax(0).numpy()
                counts = np.bincount(label.ravel(), minlength=6)
                counts[0] = 0  # the background is never the default target
                c = int(counts.argmax())
                return cam(input_tensor=x, targets=[SemanticSegmentationTarget(c, (label == c).astype(np.float32))]), c

            out[name, "target"] = explain()[1]
            out[name, "forward"] = median_s(lambda: model(x), n)
            out[name, "explain"] = median_s(explain, n)
    if "multilabel" in tasks:
        mx = module(ML / "make_multilabel_fixtures.py", "make_multilabel_fixtures")
        z = np.load(ML / "inputs.npz")
        inputs = [torch.from_numpy(z[str(k)])[None] for k in range(len(z.files))]
        model = mx.build()
        mx.calibrate(model, torch.cat(inputs))
        mx.condition_fc(model, torch.cat(inputs))
        model.eval()
        x = inputs[PHOTO_INDEX]
        cam = GradCAM(model=model, target_layers=[model.features[12]])

        def explain_ml():
            with torch.no_grad():
                scores = model(x)[0]
            classes = [int(c) for c in torch.argsort(scores, descending=True) if scores[c] >= 0.5]
            return cam(input_tensor=x.repeat(len(classes), 1, 1, 1), targets=[ClassifierOutputTarget(c) for c in classes]), classes

        out["multilabel", "targets"] = explain_ml()[1]
        out["multilabel", "forward"] = median_s(lambda: model(x), n)
        out["multilabel", "explain"] = median_s(explain_ml, n)
    return out


def real_transformers():
    """Import Hugging Face's transformers, not bench/transformers.py (on sys.path when this script runs)."""
    here = str(pathlib.Path(__file__).resolve().parent)
    cached = sys.modules.get("transformers")
    if cached is not None and pathlib.Path(getattr(cached, "__file__", "") or "").resolve().parent == pathlib.Path(here):
        del sys.modules["transformers"]
    path = sys.path[:]
    sys.path[:] = [q for q in sys.path if pathlib.Path(q or ".").resolve() != pathlib.Path(here)]
    try:
        import transformers
    finally:
        sys.path[:] = path
    assert "site-packages" in transformers.__file__, transformers.__file__
    return transformers


def pytorch_embedding_times(threads, n):
    real_transformers()
    ex = module(EMB / "make_embedding_fixtures.py", "make_embedding_fixtures")
    torch.set_num_threads(threads)  # (the fixture script sets 2 on import)
    photos = [ex.load_input(p)[0] for p in ex.PHOTOS]  # the fixture's preprocessing, without its jitter
    x = photos[PHOTO_INDEX][None]
    pair = torch.stack([photos[PHOTO_INDEX], photos[REFERENCE_INDEX]])
    out = {}
    for name, lname in EMB_LAYERS.items():
        model = ex.build(name)
        if name == "resnet50":
            ex.calibrate(model, torch.stack(photos))
        model.eval()
        path, grid = ex.CONFIG[name]["layers"][lname]
        cam = GradCAM(model=model, target_layers=[ex.module_of(model, path)],
                      reshape_transform=ex.tokens_to_grid(*grid) if grid else None)
        vector = torch.from_numpy(emb_vector(name))

        def explain_pair(model=model, cam=cam):
            with torch.no_grad():
                e = model(pair)
            targets = [ex.SimilarityToConceptTarget(e[1]), ex.SimilarityToConceptTarget(e[0])]
            return cam(input_tensor=pair, targets=targets), [float(t(r)) for t, r in zip(targets, e)]

        def explain_vector(model=model, cam=cam, vector=vector):
            with torch.no_grad():
                e = model(x)
            target = ex.SimilarityToConceptTarget(vector)
            return cam(input_tensor=x, targets=[target]), [float(target(e[0]))]

        def gradcam_vector(cam=cam, vector=vector):
            return cam(input_tensor=x, targets=[ex.SimilarityToConceptTarget(vector)])

        out[name, "path"] = path
        out[name, "pair", "maps"], out[name, "pair", "similarity"] = explain_pair()
        out[name, "vector", "maps"], out[name, "vector", "similarity"] = explain_vector()

        def forward(model=model):
            with torch.no_grad():
                return model(x)

        out[name, "forward"] = median_s(forward, n)
        out[name, "pair"] = median_s(explain_pair, n)
        out[name, "vector"] = median_s(explain_vector, n)
        out[name, "vector", "call"] = median_s(gradcam_vector, n)
        del cam, model
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma-separated subset of " + ",".join(TASKS))
    args = ap.parse_args()
    tasks = tuple(t for t in args.tasks.split(",") if t)
    assert tasks and all(t in TASKS for t in tasks), tasks
    cs = camserve_times(PHOTO.read_bytes(), args.threads, args.n, tasks, REFERENCE.read_bytes())
    pt = pytorch_times(args.threads, args.n, tasks)
    names = (("lraspp", "deeplabv3") if "segmentation" in tasks else ()) + (("multilabel",) if "multilabel" in tasks else ())
    print(f"median of {args.n}, {args.threads} threads, CPU; photo chelsea.png" + ("; reference coffee.png" if "embedding" in tasks else ""))
    if names:
        print()
        print("| model | target | camserve predict (HTTP, ms) | PyTorch forward (ms) | camserve Grad-CAM (HTTP, ms) | pytorch-grad-cam Grad-CAM (ms) | ratio |")
        print("|---|---|---|---|---|---|---|")
    for name in names:
        target = cs[name, "targets"]
        want = pt[name, "targets"] if name == "multilabel" else [pt[name, "target"]]
        assert target == want, (name, target, want)
        print(f"| {name} | {', '.join(map(str, target))} | {cs[name, 'predict'] * 1e3:.1f} | {pt[name, 'forward'] * 1e3:.1f} | "
              f"{cs[name, 'explain'] * 1e3:.1f} | {pt[name, 'explain'] * 1e3:.1f} | {cs[name, 'explain'] / pt[name, 'explain']:.2f} |")
    if "embedding" not in tasks:
        return
    pe = pytorch_embedding_times(args.threads, args.n)
    cases = {"pair": "image + reference image (2 maps)", "vector": "image + reference_vector (1 map)"}
    print()
    print("| model | layer | request | camserve predict (HTTP, ms) | PyTorch forward, no grad (ms) | camserve Grad-CAM (HTTP, ms) | "
          "pytorch-grad-cam: forward + GradCAM (ms) | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    notes = []
    for name, lname in EMB_LAYERS.items():
        for case, what in cases.items():
            print(f"| {name} | {lname} | {what} | {cs[name, 'predict'] * 1e3:.1f} | {pe[name, 'forward'] * 1e3:.1f} | "
                  f"{cs[name, case] * 1e3:.1f} | {pe[name, case] * 1e3:.1f} | {cs[name, case] / pe[name, case]:.2f} |")
        tensor = emb_onnx_tensor(name)
        layer = "camserve's default_layer" if cs[name, "default_layer"] == tensor else f"layer= given (camserve's default_layer is `{cs[name, 'default_layer']}`)"
        notes.append(f"- {name}: `{tensor}` ({layer}), PyTorch `{pe[name, 'path']}`; reference_vector without the forward "
                     f"(the GradCAM call alone): {pe[name, 'vector', 'call'] * 1e3:.1f} ms, ratio {cs[name, 'vector'] / pe[name, 'vector', 'call']:.2f}")
        for case in cases:
            sc, sp = cs[name, case, "similarity"], pe[name, case, "similarity"]
            diffs = [float(np.abs(scale_cam_image(m[None], (224, 224))[0] - q).max()) for m, q in zip(cs[name, case, "maps"], pe[name, case, "maps"])]
            assert all(abs(a - b) < 2e-2 for a, b in zip(sc, sp)), (name, case, sc, sp)
            notes.append(f"  - {case}: similarity camserve {', '.join(f'{v:.5f}' for v in sc)} / PyTorch {', '.join(f'{v:.5f}' for v in sp)}; "
                         f"scaled 224x224 maps max abs diff {', '.join(f'{d:.3f}' for d in diffs)}")
    print()
    print("\n".join(notes))


if __name__ == "__main__":
    main()
