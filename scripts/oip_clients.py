"""The Open Inference Protocol ("v2") and the KServe v1 shim checked with the real clients people use:
Triton's `tritonclient[http]` and the `kserve` SDK's REST client. Every answer is compared with the /v1 API's
answer for the same image (raw maps within 1e-6). Run by scripts/oip-test.sh against a running camserve:

    python scripts/oip_clients.py http://127.0.0.1:PORT

Exits 1 at the first failed check, printing it.
"""

import asyncio
import base64
import io
import json
import pathlib
import sys
import urllib.error
import urllib.request

import numpy as np
import tritonclient.http as triton
from PIL import Image
from tritonclient.utils import InferenceServerException

import checklist
from checklist import check

BASE = sys.argv[1].rstrip("/")
HOSTPORT = BASE.split("://", 1)[1]
ROOT = pathlib.Path(__file__).resolve().parent.parent
SHAPES = sorted((ROOT / "tests/data/shapes").glob("*.jpg"))
MODEL = "demo"
TOL = 1e-6
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def text(items):
    """BYTES elements as text: tritonclient gives bytes for binary tensors, str for JSON ones."""
    return [s.decode() if isinstance(s, bytes) else s for s in items]


def class_string(p):
    """Triton's classification string for a /v1 prediction."""
    return f"{p['score']:.6f}:{p['index']}" + (f":{p['label']}" if p["label"] is not None else "")


def v1(image: bytes, **options):
    """The /v1 answer for one image, raw maps decoded."""
    query = "&".join(f"{k}={v}" for k, v in options.items())
    req = urllib.request.Request(f"{BASE}/v1/models/{MODEL}/explain?{query}", data=image, headers={"content-type": "application/octet-stream"})
    with urllib.request.urlopen(req) as r:
        d = json.load(r)
    for e in d.get("explanations", []):
        if "raw" in e:
            e["array"] = np.frombuffer(base64.b64decode(e["raw"]["data"]), "<f4").reshape(e["raw"]["shape"])
    return d


def v1_map(answer, method):
    return next(e["array"] for e in answer["explanations"] if e["method"] == method)


def close(a, b):
    return a.shape == b.shape and float(np.max(np.abs(a - b))) <= TOL


def png_of(path):
    """A shape picture as PNG (lossless) and the model's input tensor made from the same pixels, in the order
    camserve computes it ((p / 255 - mean) / std in float32), so both paths see identical numbers."""
    rgb = np.asarray(Image.open(path).convert("RGB"))
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    x = ((rgb.astype(np.float32) / np.float32(255.0) * np.float32(1.0) - MEAN) / STD).transpose(2, 0, 1)
    return buf.getvalue(), np.ascontiguousarray(x, dtype=np.float32)


def triton_checks():
    c = triton.InferenceServerClient(url=HOSTPORT)
    check(c.is_server_live(), "tritonclient: server live")
    check(c.is_server_ready(), "tritonclient: server ready")
    meta = c.get_server_metadata()
    check("binary_tensor_data" in meta["extensions"], f"tritonclient: server metadata {meta}")
    check(c.is_model_ready(MODEL), "tritonclient: model ready")
    mm = c.get_model_metadata(MODEL)
    names = [o["name"] for o in mm["outputs"]]
    input_name = mm["inputs"][1]["name"]
    check(mm["inputs"][0] == {"name": "image", "datatype": "BYTES", "shape": [-1]} and "gradcam" in names
          and "guided_gradcam_overlay_png" in names, f"tritonclient: model metadata, inputs {mm['inputs']}")

    jpeg = SHAPES[0].read_bytes()
    ref = v1(jpeg, methods="gradcam,guided_gradcam", outputs="raw,overlay")

    # BYTES image, binary tensors both ways (tritonclient's default), several outputs.
    inp = triton.InferInput("image", [1], "BYTES")
    inp.set_data_from_numpy(np.array([jpeg], dtype=np.object_), binary_data=True)
    outs = [triton.InferRequestedOutput(n, binary_data=b) for n, b in
            [("logits", True), ("probabilities", False), ("top_k", False), ("gradcam", True),
             ("guided_gradcam", True), ("gradcam_overlay_png", True)]]
    r = c.infer(MODEL, [inp], outputs=outs, parameters={"methods": "gradcam,guided_gradcam", "top_k": 3})
    top = text(r.as_numpy("top_k")[0])
    want = [class_string(p) for p in ref["predictions"][:3]]
    check(top == want, f"binary BYTES image: top_k {top} = v1's {want}")
    logits = r.as_numpy("logits")[0]
    check(np.allclose(logits[[p["index"] for p in ref["predictions"]]], [p["logit"] for p in ref["predictions"]], atol=TOL, rtol=0),
          "binary BYTES image: logits = v1's")
    probs = r.as_numpy("probabilities")[0]
    check(abs(float(probs.sum()) - 1) < 1e-5 and abs(probs[ref["predictions"][0]["index"]] - ref["predictions"][0]["score"]) <= TOL,
          "JSON probabilities sum to 1 and match v1's top score")
    for m in ("gradcam", "guided_gradcam"):
        got, want_map = r.as_numpy(m)[0], v1_map(ref, m)
        check(close(got, want_map), f"binary BYTES image: raw {m} {got.shape} = v1's within {TOL} "
              f"(max diff {float(np.max(np.abs(got - want_map))):.2e})")
    png = r.as_numpy("gradcam_overlay_png")[0]
    v1_png = base64.b64decode(next(e["overlay_png"] for e in ref["explanations"] if e["method"] == "gradcam"))
    check(png[:8] == b"\x89PNG\r\n\x1a\n" and png == v1_png, f"gradcam_overlay_png is v1's overlay ({len(png)} bytes)")

    # The same in JSON both ways: the image as a base64 string.
    inp = triton.InferInput("image", [1], "BYTES")
    inp.set_data_from_numpy(np.array([base64.b64encode(jpeg).decode()], dtype=np.object_), binary_data=False)
    r = c.infer(MODEL, [inp], outputs=[triton.InferRequestedOutput("gradcam", binary_data=False)], parameters={"methods": "gradcam"})
    check(close(r.as_numpy("gradcam")[0], v1_map(ref, "gradcam")), "JSON BYTES image (base64): raw gradcam = v1's")

    # Several images, each with its own target, in one request.
    files = [p.read_bytes() for p in SHAPES[:3]]
    targets = [0, 3, 5]
    inp = triton.InferInput("image", [3], "BYTES")
    inp.set_data_from_numpy(np.array(files, dtype=np.object_))
    r = c.infer(MODEL, [inp], outputs=[triton.InferRequestedOutput("gradcam"), triton.InferRequestedOutput("saliency")],
                parameters={"target": targets})
    for i, (f, t) in enumerate(zip(files, targets)):
        ref_i = v1(f, methods="gradcam,saliency", outputs="raw", target=t)
        for m in ("gradcam", "saliency"):
            check(close(r.as_numpy(m)[i], v1_map(ref_i, m)), f"3 images in one request: image {i} target {t}: raw {m} = v1's")

    # The model's own input, FP32 [N, 3, H, W], binary and JSON, against v1 on the same pixels.
    pngs, tensors = zip(*(png_of(p) for p in SHAPES[3:5]))
    batch = np.stack(tensors)
    for binary in (True, False):
        inp = triton.InferInput(input_name, list(batch.shape), "FP32")
        inp.set_data_from_numpy(batch, binary_data=binary)
        r = c.infer(MODEL, [inp], outputs=[triton.InferRequestedOutput("guided_gradcam", binary_data=binary),
                                           triton.InferRequestedOutput("probabilities", class_count=2)],
                    parameters={"methods": "guided_gradcam"})
        for i, png in enumerate(pngs):
            ref_i = v1(png, methods="guided_gradcam", outputs="raw")
            got = r.as_numpy("guided_gradcam")[i]
            check(close(got, v1_map(ref_i, "guided_gradcam")),
                  f"FP32 tensor ({'binary' if binary else 'JSON'}): image {i}: raw guided_gradcam = v1's on the same pixels")
            cls = text(r.as_numpy("probabilities")[i])
            want = [class_string(p) for p in ref_i["predictions"][:2]]
            check(cls == want, f"classification extension (class_count=2): {cls}")

    # Errors: the protocol's form, the right status.
    def error_of(call):
        try:
            call()
        except InferenceServerException as e:
            return e
        return None

    inp = triton.InferInput("image", [1], "BYTES")
    inp.set_data_from_numpy(np.array([jpeg], dtype=np.object_))
    e = error_of(lambda: c.infer("nope", [inp]))
    check(e is not None and "no model named `nope`" in e.message() and e.status() == "404", f"unknown model: {e}")
    e = error_of(lambda: c.infer(MODEL, [inp], parameters={"methods": "nosuch"}))
    check(e is not None and "nosuch" in e.message() and e.status() == "422", f"unknown method: {e}")
    e = error_of(lambda: c.infer(MODEL, [inp], parameters={"target": 99}))
    check(e is not None and "out of range" in e.message() and e.status() == "422", f"target out of range: {e}")
    bad = triton.InferInput("image", [1], "BYTES")
    bad.set_data_from_numpy(np.array([b"not an image"], dtype=np.object_))
    e = error_of(lambda: c.infer(MODEL, [bad]))
    check(e is not None and e.status() == "400", f"bytes that are no image: {e}")
    wrong = triton.InferInput("pixels", [1, 3, 64, 64], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 3, 64, 64), np.float32))
    e = error_of(lambda: c.infer(MODEL, [wrong]))
    check(e is not None and "pixels" in e.message() and input_name in e.message() and e.status() == "400", f"unknown input: {e}")
    e = error_of(lambda: c.infer(MODEL, [inp], outputs=[triton.InferRequestedOutput("nosuch_heatmap_png")]))
    check(e is not None and e.status() == "400", f"unknown output: {e}")
    # And the server still serves.
    check(c.is_server_ready(), "still ready after the errors")


def embedder_checks():
    """An embedder through tritonclient: the image and a reference image as two BYTES inputs, the embedding and
    similarity outputs and the image's Grad-CAM map, each equal to /v1's answer for the same pair (multipart);
    a reference vector as a second FP32 input."""
    c = triton.InferenceServerClient(HOSTPORT)
    meta = c.get_model_metadata("embedder")
    check([i["name"] for i in meta["inputs"]] == ["image", "input", "reference", "reference_vector"], f"tritonclient: an embedder's inputs {meta['inputs']}")
    a, b = SHAPES[0].read_bytes(), SHAPES[6].read_bytes()
    import httpx  # the kserve SDK's HTTP client

    ref = httpx.post(f"{BASE}/v1/models/embedder/explain", params={"methods": "gradcam", "outputs": "raw,embedding"},
                     files={"image": ("a.jpg", a, "image/jpeg"), "reference": ("b.jpg", b, "image/jpeg")}, timeout=60).json()
    image, reference = triton.InferInput("image", [1], "BYTES"), triton.InferInput("reference", [1], "BYTES")
    image.set_data_from_numpy(np.array([a], dtype=object))
    reference.set_data_from_numpy(np.array([b], dtype=object))
    r = c.infer("embedder", [image, reference], outputs=[triton.InferRequestedOutput(n) for n in ("embedding", "similarity", "gradcam")])
    emb = np.frombuffer(base64.b64decode(ref["embedding"]["data"]), "<f4")
    check(np.array_equal(r.as_numpy("embedding")[0], emb), "tritonclient: an embedder's embedding = v1's")
    check(abs(float(r.as_numpy("similarity")[0]) - ref["similarity"]) <= TOL, f"tritonclient: similarity {r.as_numpy('similarity')[0]} = v1's {ref['similarity']}")
    want = np.frombuffer(base64.b64decode(ref["explanations"][0]["raw"]["data"]), "<f4").reshape(ref["explanations"][0]["raw"]["shape"])
    check(close(r.as_numpy("gradcam")[0], want), "tritonclient: the image's Grad-CAM against its reference = v1's")
    vector = triton.InferInput("reference_vector", [emb.size], "FP32")
    vector.set_data_from_numpy(emb.astype(np.float32))
    r = c.infer("embedder", [image, vector], outputs=[triton.InferRequestedOutput("similarity")])
    check(abs(float(r.as_numpy("similarity")[0]) - 1.0) <= 1e-6, f"tritonclient: the image against its own embedding: similarity {r.as_numpy('similarity')[0]}")


async def kserve_checks():
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

    client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
    check(await client.is_server_live(BASE), "kserve: server live")
    check(await client.is_server_ready(BASE), "kserve: server ready")
    check(await client.is_model_ready(BASE, MODEL), "kserve: model ready")
    jpeg = SHAPES[6].read_bytes()
    ref = v1(jpeg, methods="gradcam", outputs="raw")
    inp = InferInput(name="image", shape=[1], datatype="BYTES", data=[base64.b64encode(jpeg).decode()])
    req = InferRequest(model_name=MODEL, infer_inputs=[inp], parameters={"methods": "gradcam"})
    res = await client.infer(BASE, req, model_name=MODEL)
    out = {o.name: o for o in res.outputs}
    check(close(out["gradcam"].as_numpy()[0], v1_map(ref, "gradcam")), "kserve: JSON BYTES image: raw gradcam = v1's")
    top = text(out["top_k"].as_numpy()[0])
    check(top[0].split(":")[1] == str(ref["predictions"][0]["index"]), f"kserve: top_k {top[:2]}")
    await client.close()


def kserve_v1_checks():
    """The KServe v1 shim: :predict and :explain with {"instances": [...]}, options next to them."""
    jpeg = SHAPES[7].read_bytes()
    b64 = base64.b64encode(jpeg).decode()

    def post(path, body):
        req = urllib.request.Request(f"{BASE}{path}", data=json.dumps(body).encode(), headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as e:
            return e.code, json.load(e)

    ref = v1(jpeg, methods="gradcam", outputs="raw")
    status, d = post(f"/v1/models/{MODEL}:predict", {"instances": [{"image": {"b64": b64}}]})
    check(status == 200 and d["predictions"][0]["predictions"][0]["index"] == ref["predictions"][0]["index"], f"kserve v1 :predict: {status}")
    status, d = post(f"/v1/models/{MODEL}:explain", {"instances": [{"image": {"b64": b64}}], "methods": "gradcam", "outputs": "raw"})
    e = d["explanations"][0]["explanations"][0]
    got = np.frombuffer(base64.b64decode(e["raw"]["data"]), "<f4").reshape(e["raw"]["shape"])
    check(status == 200 and close(got, v1_map(ref, "gradcam")), "kserve v1 :explain: raw gradcam = v1's")
    _, x = png_of(SHAPES[7])
    png, _ = png_of(SHAPES[7])
    ref = v1(png, methods="gradcam", outputs="raw")
    status, d = post(f"/v1/models/{MODEL}:explain", {"instances": [x.tolist()], "methods": "gradcam", "outputs": "raw"})
    e = d["explanations"][0]["explanations"][0]
    got = np.frombuffer(base64.b64decode(e["raw"]["data"]), "<f4").reshape(e["raw"]["shape"])
    check(status == 200 and close(got, v1_map(ref, "gradcam")), "kserve v1 :explain, preprocessed tensor: raw gradcam = v1's")
    status, d = post(f"/v1/models/{MODEL}:predict", {"instances": [{"image": {"b64": "!!"}}]})
    check(status == 400 and "error" in d, f"kserve v1: bad base64: {status} {d}")


if __name__ == "__main__":
    triton_checks()
    embedder_checks()
    if "--no-kserve" not in sys.argv:
        asyncio.run(kserve_checks())
    if "--no-kserve-v1" not in sys.argv:
        kserve_v1_checks()
    print(f"oip clients: {checklist.passed} checks passed")
