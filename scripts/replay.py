#!/usr/bin/env python3
"""Record-and-replay check of camserve's HTTP answers (issue 23): the /v1 API, Open Inference Protocol (v2) and
KServe v1 answers must stay byte-for-byte what they are for the same request, except for fields added on purpose.

    scripts/replay.py record --bin target/debug/camserve --out tests/replay
    scripts/replay.py check  --bin target/debug/camserve --against tests/replay

Both start the binary (`BIN serve --bind 127.0.0.1:<free port> --device cpu --threads 2`, no config file, so the
built-in defaults and the two bundled models, run in the repository root), wait for `GET /readyz` to answer 200,
send a fixed list of requests (REQUESTS below) one at a time, and stop the server. `record` writes each answer
under DIR (`NN-name.<ext>`: the body exactly as received) and `DIR/index.json` (per request: status, the selected
headers, the body's file, length and SHA-256, and the SHA-256 of the request that was sent). `check` sends the
same requests, compares each answer with the recorded one, prints one line per request and
`replay: N requests, M identical, K different`, and exits 1 when any differ (2 on a usage or start-up failure).

What is compared:
- the status and the selected headers (content-type, allow, retry-after, cache-control,
  inference-header-content-length); never x-request-id, date or content-length;
- the body, byte for byte, after ONE normalisation: each `"timings_ms":{...}` object (/v1 answers, KServe
  `predictions`/`explanations` entries) is replaced by the list of its keys, in order (keys kept, values
  dropped), since times vary. This is done with a regular expression on the raw bytes (`"timings_ms":` then a
  flat `{...}`, which a JSON string cannot contain unescaped), so number formatting, key order, whitespace,
  PNG base64 and raw arrays are compared as sent, not as Python re-renders them. A guard parses the result and
  refuses it if any `timings_ms` object is left (the regex would then have missed one); for that case, and for
  JSON that does not parse, the comparison falls back to a canonical form (parsed with key order kept,
  timings replaced, dumped with separators=(',', ':'), ensure_ascii=False), which re-renders floats, and says
  so in the line it prints;
- binary Open Inference Protocol answers (application/octet-stream with Inference-Header-Content-Length): the
  JSON header as above, and the binary tensors after it byte for byte (a difference names the output tensor).

Nothing else is normalised. SmoothGrad requests always carry `seed`. A DIFFERENT line names the first
difference (its JSON path, or the output tensor and byte offset), as `recorded != now`; `check --save DIR2` keeps the new answers for
a closer look. Python 3.11, standard library only.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import http.client
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

FORMAT = 1
HEADERS_KEPT = ("content-type", "allow", "retry-after", "cache-control", "inference-header-content-length")
BOUNDARY = "camserve-replay-3d1f0b6c"
THREADS = 2
JSON_TYPES = ("application/json", "application/problem+json")


# ------------------------------------------------------------------------------------------------ requests


class Req:
    def __init__(self, name, method, path, body=b"", headers=None):
        self.name, self.method, self.path, self.body = name, method, path, body
        self.headers = dict(headers or {})

    def digest(self) -> str:
        h = hashlib.sha256()
        h.update(f"{self.method} {self.path}\n".encode())
        for k in sorted(self.headers):
            h.update(f"{k.lower()}: {self.headers[k]}\n".encode())
        h.update(b"\n" + self.body)
        return h.hexdigest()


def get(name, path):
    return Req(name, "GET", path)


def multipart(name, path, image: bytes, fields=()):
    """multipart/form-data: the file part `image` then text parts (an `options` part is a JSON text)."""
    out = []
    out.append(f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"image.jpg\"\r\n"
               "Content-Type: image/jpeg\r\n\r\n".encode() + image + b"\r\n")
    for k, v in fields:
        ctype = "Content-Type: application/json\r\n" if k == "options" else ""
        out.append(f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n{ctype}\r\n{v}\r\n".encode())
    out.append(f"--{BOUNDARY}--\r\n".encode())
    return Req(name, "POST", path, b"".join(out), {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})


def post_json(name, path, obj, headers=None):
    return Req(name, "POST", path, json.dumps(obj, separators=(",", ":")).encode(),
               {"Content-Type": "application/json", **(headers or {})})


def raw_image(name, path, image: bytes, query="", ctype="image/jpeg"):
    return Req(name, "POST", path + (f"?{query}" if query else ""), image, {"Content-Type": ctype} if ctype else {})


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def ramp(n: int) -> list[float]:
    """A deterministic preprocessed input: values in [-2, 2) in steps of 1/16, exactly representable."""
    return [((i * 7) % 64) / 16.0 - 2.0 for i in range(n)]


def oip_binary(name, path, header: dict, tensors: list[bytes]):
    """Triton's binary tensor form: the JSON header, then the tensors, the header's length in a header."""
    head = json.dumps(header, separators=(",", ":")).encode()
    return Req(name, "POST", path, head + b"".join(tensors),
               {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))})


def bytes_tensor(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(i)) + i for i in items)


def build_requests(repo: Path) -> list[Req]:
    photo = lambda n: (repo / "assets/photos" / n).read_bytes()  # noqa: E731
    cat, shapes = photo("chelsea.jpg"), photo("shapes.jpg")
    s0, s1 = (repo / "tests/data/shapes/000.jpg").read_bytes(), (repo / "tests/data/shapes/001.jpg").read_bytes()
    D, I = "/v1/models/demo", "/v1/models/imagenet"  # noqa: E741
    demo_input = DEMO_INPUT_NAME
    r: list[Req] = []

    # --- metadata and health
    r += [
        get("healthz", "/healthz"),
        get("readyz", "/readyz"),
        get("v1-models", "/v1/models"),
        get("v1-model-demo", D),
        get("v1-model-imagenet", I),
        get("v2", "/v2"),
        get("v2-health-ready", "/v2/health/ready"),
        get("v2-model-demo", "/v2/models/demo"),
        get("v2-model-imagenet-v1", "/v2/models/imagenet/versions/1"),
        get("v2-model-imagenet-ready", "/v2/models/imagenet/versions/1/ready"),
        get("example-shapes", "/examples/shapes.jpg"),
    ]

    # --- /v1 predict, the three request forms (multipart text parts, multipart `options`, JSON, raw body)
    r += [
        multipart("predict-demo-multipart", f"{D}/predict", shapes, [("top_k", "3")]),
        multipart("predict-demo-multipart-options", f"{D}/predict", s0, [("options", json.dumps({"top_k": 6}))]),
        post_json("predict-imagenet-json", f"{I}/predict", {"image": b64(cat), "top_k": 3}),
        raw_image("predict-imagenet-raw", f"{I}/predict", cat, "top_k=7"),
    ]

    # --- /v1 explain, the forms, defaults, pictures
    r += [
        multipart("explain-demo-defaults", f"{D}/explain", shapes),  # gradcam,guided_gradcam; heatmap,overlay
        multipart("explain-demo-multipart-text", f"{D}/explain", s1,
                  [("methods", "gradcam++"), ("methods", "layercam"), ("target", "square"), ("outputs", "raw,mask")]),
        multipart("explain-demo-multipart-options", f"{D}/explain", s0,
                  [("options", json.dumps({"methods": ["xgradcam", "saliency"], "target": 2, "outputs": ["raw", "mask"]}))]),
        post_json("explain-demo-json-colormap", f"{D}/explain",
                  {"image": b64(shapes), "methods": ["gradcam"], "outputs": ["heatmap", "overlay"], "colormap": "gray", "alpha": 0.8}),
        raw_image("explain-demo-raw-query", f"{D}/explain", shapes, "methods=gradcam++,hirescam&outputs=mask,raw&colormap=turbo"),
        multipart("explain-imagenet-multipart-topk", f"{I}/explain", cat, [("methods", "gradcam"), ("top_k", "3"), ("outputs", "raw")]),
        post_json("explain-imagenet-json-label", f"{I}/explain",
                  {"image": b64(cat), "methods": "gradcam", "target": "Egyptian cat", "outputs": "heatmap,overlay,raw",
                   "colormap": "viridis", "alpha": 0.3}),
        raw_image("explain-imagenet-raw-original", f"{I}/explain", cat, "methods=layercam&outputs=mask,raw&size=original&target=281"),
        multipart("explain-imagenet-multipart-options", f"{I}/explain", cat,
                  [("options", json.dumps({"methods": ["eigencam", "xgradcam"], "target": [285, "tiger cat"], "outputs": ["raw"]}))]),
    ]

    # --- every method the demo model offers (outputs raw,mask; the multi-pass ones with small settings)
    small = {"scorecam": "&channels=4", "integrated_gradients": "&steps=4", "smoothgrad": "&samples=3&noise=0.2&seed=7"}
    for m in DEMO_METHODS:
        q = f"methods={urllib.parse.quote(m)}&outputs=raw,mask&target=1" + small.get(m, "")
        r.append(raw_image(f"method-demo-{m.replace('+', 'p')}", f"{D}/explain", shapes, q))
    # --- and the imagenet model: the one-pass CAMs in one request, the input-gradient ones and multi-pass ones
    r += [
        raw_image("methods-imagenet-cams", f"{I}/explain", cat, "methods=gradcam,gradcam++,xgradcam,hirescam,layercam,eigencam&outputs=raw"),
        raw_image("methods-imagenet-gradients", f"{I}/explain", cat, "methods=guided_backprop,deconvnet,saliency,guided_gradcam&outputs=mask&target=285"),
        raw_image("methods-imagenet-scorecam-finercam", f"{I}/explain", cat, "methods=scorecam,finercam&channels=4&outputs=raw"),
        raw_image("methods-imagenet-ig-smoothgrad", f"{I}/explain", cat, "methods=integrated_gradients,smoothgrad&steps=3&samples=2&seed=11&outputs=mask"),
    ]

    # --- layers, metrics
    r += [
        raw_image("layer-demo-tensor", f"{D}/explain", shapes, f"methods=gradcam&outputs=raw,mask&layer={urllib.parse.quote(DEMO_LAYER_TENSOR)}"),
        raw_image("layer-demo-module", f"{D}/explain", shapes, f"methods=gradcam&outputs=raw,mask&layer={urllib.parse.quote(DEMO_LAYER_MODULE)}"),
        raw_image("layer-imagenet-module", f"{I}/explain", cat, f"methods=gradcam,gradcam++&outputs=raw&layer={urllib.parse.quote(IMAGENET_LAYER_MODULE)}"),
        post_json("metrics-demo-all-curves", f"{D}/explain",
                  {"image": b64(shapes), "methods": ["gradcam", "saliency"], "metrics": "all", "outputs": ["curves", "raw"]}),
        raw_image("metrics-imagenet-deletion", f"{I}/explain", cat, "methods=gradcam&metrics=deletion,confidence_change&outputs=raw"),
    ]

    # --- Open Inference Protocol
    V = "/v2/models"
    r += [
        post_json("oip-demo-json-bytes", f"{V}/demo/infer",
                  {"parameters": {"methods": "gradcam"}, "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64(shapes)]}]}),
        oip_binary("oip-demo-binary-two-images", f"{V}/demo/infer",
                   {"id": "r1", "parameters": {"top_k": 2, "target": [2, 4]},
                    "inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": 8 + len(s0) + len(s1)}}],
                    "outputs": [{"name": "logits", "parameters": {"binary_data": True}}, {"name": "top_k"},
                                {"name": "gradcam", "parameters": {"binary_data": True}},
                                {"name": "saliency_heatmap_png", "parameters": {"binary_data": True}}]},
                   [bytes_tensor([s0, s1])]),
        post_json("oip-demo-json-two-images-labels", f"{V}/demo/infer",
                  {"parameters": {"target": ["circle", "square"], "colormap": "inferno"},
                   "inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": [b64(s0), b64(s1)]}],
                   "outputs": [{"name": "probabilities", "parameters": {"classification": 3}}, {"name": "layercam"},
                               {"name": "layercam_overlay_png"}]}),
        post_json("oip-demo-binary-output-all", f"{V}/demo/infer",
                  {"parameters": {"binary_data_output": True, "methods": "hirescam"},
                   "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64(s1)]}]}),
        post_json("oip-demo-fp32-json", f"{V}/demo/infer",
                  {"inputs": [{"name": demo_input, "datatype": "FP32", "shape": [1, 3, 64, 64], "data": ramp(3 * 64 * 64)}],
                   "outputs": [{"name": "logits"}, {"name": "probabilities", "parameters": {"classification": 2}},
                               {"name": "gradcam"}, {"name": "guided_backprop_heatmap_png"}]}),
        oip_binary("oip-demo-fp32-binary", f"{V}/demo/versions/1/infer",
                   {"parameters": {"top_k": 3, "target": "star"},
                    "inputs": [{"name": demo_input, "datatype": "FP32", "shape": [1, 3, 64, 64], "parameters": {"binary_data_size": 4 * 3 * 64 * 64}}],
                    "outputs": [{"name": "top_k"}, {"name": "eigencam", "parameters": {"binary_data": True}}]},
                   [struct.pack(f"<{3 * 64 * 64}f", *ramp(3 * 64 * 64)[::-1])]),
        post_json("oip-imagenet-json", f"{V}/imagenet/infer",
                  {"id": "cat", "parameters": {"methods": "gradcam", "top_k": 3},
                   "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64(cat)]}],
                   "outputs": [{"name": "top_k"}, {"name": "logits", "parameters": {"classification": 3}},
                               {"name": "gradcam"}, {"name": "gradcam_heatmap_png"}]}),
    ]

    # --- KServe v1
    r += [
        post_json("kserve-demo-predict", f"{D}:predict", {"instances": [{"image": {"b64": b64(shapes)}}]}),
        post_json("kserve-demo-explain-two", f"{D}:explain",
                  {"instances": [{"image": {"b64": b64(s0)}}, {"image": {"b64": b64(s1)}}], "methods": "gradcam", "outputs": "raw,mask"}),
        post_json("kserve-demo-explain-tensor", f"{D}:explain",
                  {"instances": [[[ramp(3 * 64 * 64)[(c * 64 + y) * 64:(c * 64 + y + 1) * 64] for y in range(64)] for c in range(3)]],
                   "methods": ["gradcam", "smoothgrad"], "samples": 2, "seed": 3, "outputs": ["raw"]}),
        post_json("kserve-imagenet-explain", f"{I}:explain",
                  {"instances": [{"image": {"b64": b64(cat)}}], "methods": "gradcam++", "top_k": 2, "outputs": "raw"}),
    ]

    # --- errors
    r += [
        multipart("err-unknown-model", "/v1/models/nope/predict", shapes),
        raw_image("err-unknown-method", f"{D}/explain", shapes, "methods=gradcam,nope"),
        raw_image("err-top-k-zero", f"{D}/explain", shapes, "top_k=0"),
        post_json("err-top-k-too-many", f"{I}/predict", {"image": b64(cat), "top_k": 50}),
        raw_image("err-unknown-layer", f"{D}/explain", shapes, "layer=nope"),
        raw_image("err-unknown-label", f"{D}/explain", shapes, "target=pentagon"),
        raw_image("err-unavailable-method", f"{I}/explain", cat, "methods=cam"),
        raw_image("err-cost", f"{I}/explain", cat, "methods=scorecam&top_k=4&outputs=raw"),
        raw_image("err-undecodable", f"{D}/predict", b"this is not an image"),
        raw_image("err-media-type", f"{D}/predict", shapes, ctype="text/plain"),
        post_json("err-oip-input-name", f"{V}/demo/infer", {"inputs": [{"name": "pixels", "datatype": "BYTES", "shape": [1], "data": [b64(shapes)]}]}),
        post_json("err-oip-metrics", f"{V}/demo/infer",
                  {"parameters": {"metrics": "all"}, "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64(shapes)]}]}),
        post_json("err-kserve-no-instances", f"{D}:predict", {"image": {"b64": b64(shapes)}}),
        get("err-unknown-route", "/v1/nope"),
        get("err-method-not-allowed", f"{D}/explain"),
    ]
    names = [x.name for x in r]
    assert len(names) == len(set(names)), "request names must be unique"
    return r


# From the bundled models at bf8355a (GET /v1/models): the demo model's methods (the imagenet model offers the
# same but `cam` and `ablationcam`), its FP32 input's name, and layers named by tensor and by module path.
DEMO_METHODS = ["gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "eigencam", "guided_backprop", "deconvnet",
                "saliency", "guided_gradcam", "cam", "scorecam", "ablationcam", "finercam", "integrated_gradients", "smoothgrad"]
DEMO_INPUT_NAME = "image"
DEMO_LAYER_TENSOR = "/features/features.10/Relu_output_0"
DEMO_LAYER_MODULE = "features.6"
IMAGENET_LAYER_MODULE = "_blocks.14"


# ------------------------------------------------------------------------------------------------ server


def fail(message: str):
    print(f"replay: {message}", file=sys.stderr)
    sys.exit(2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, binary: Path, repo: Path, ort: Path | None, threads: int, ready_timeout: float):
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("CAMSERVE_")}
        env.setdefault("RUST_LOG", "warn")
        if ort is not None:
            env["ORT_DYLIB_PATH"] = str(ort)
        self.log = tempfile.NamedTemporaryFile(prefix="camserve-replay-", suffix=".log", delete=False)
        cmd = [str(binary), "serve", "--bind", f"127.0.0.1:{self.port}", "--device", "cpu", "--threads", str(threads)]
        self.proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + ready_timeout
        while True:
            if self.proc.poll() is not None:
                tail = self.log_tail()
                self.stop()
                fail(f"the server exited with {self.proc.returncode} before it was ready:\n{tail}")
            try:
                status, _, _ = self.send(Req("readyz", "GET", "/readyz"), timeout=5)
                if status == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                tail = self.log_tail()
                self.stop()
                fail(f"/readyz not 200 within {ready_timeout:.0f} s:\n{tail}")
            time.sleep(0.5)

    def log_tail(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-4000:]

    def send(self, req: Req, timeout: float = 900):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            c.putrequest(req.method, req.path, skip_accept_encoding=True)
            for k, v in req.headers.items():
                c.putheader(k, v)
            if req.body or req.method in ("POST", "PUT"):
                c.putheader("Content-Length", str(len(req.body)))
            c.endheaders(req.body or None)
            res = c.getresponse()
            body = res.read()
            headers = {k: res.getheader(k) for k in HEADERS_KEPT if res.getheader(k) is not None}
            return res.status, headers, body
        finally:
            c.close()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        os.unlink(self.log.name)


# ------------------------------------------------------------------------------------------------ compare

TIMINGS = re.compile(rb'("timings_ms"\s*:\s*)\{([^{}"]*(?:"[^"\\]*"[^{}"]*)*)\}')


def strip_timings(body: bytes) -> bytes:
    """Each `"timings_ms":{...}` replaced by the list of its keys, on the raw bytes."""

    def keys(m: re.Match) -> bytes:
        pairs = json.loads(b"{" + m.group(2) + b"}", object_pairs_hook=list)
        return m.group(1) + json.dumps([k for k, _ in pairs], separators=(",", ":")).encode()

    return TIMINGS.sub(keys, body)


def canonical(value) -> str:
    """The fallback: parsed (key order kept), timings replaced, re-serialised."""

    def norm(v):
        if isinstance(v, Obj):
            return Obj((k, [kk for kk, _ in x] if k == "timings_ms" and isinstance(x, Obj) else norm(x)) for k, x in v)
        if isinstance(v, list):
            return [norm(x) for x in v]
        return v

    return dumps(norm(value))


class Obj(list):
    """A JSON object as its (key, value) pairs, in order, duplicates kept."""


def loads(b: bytes):
    return json.loads(b, object_pairs_hook=Obj)


def dumps(v) -> str:
    if isinstance(v, Obj):
        return "{" + ",".join(json.dumps(k, ensure_ascii=False) + ":" + dumps(x) for k, x in v) + "}"
    if isinstance(v, list):
        return "[" + ",".join(dumps(x) for x in v) + "]"
    return json.dumps(v, ensure_ascii=False)


def has_timings_object(v) -> bool:
    if isinstance(v, Obj):
        return any((k == "timings_ms" and isinstance(x, Obj)) or has_timings_object(x) for k, x in v)
    if isinstance(v, list):
        return any(has_timings_object(x) for x in v)
    return False


def normalised_json(body: bytes) -> tuple[bytes, str]:
    """The bytes to compare for a JSON body, and how they were made ('raw' or 'canonical')."""
    stripped = strip_timings(body)
    try:
        parsed = loads(stripped)
    except ValueError:
        return stripped, "raw"  # not JSON after all: compared as bytes
    if has_timings_object(parsed):
        return canonical(loads(body)).encode(), "canonical"
    return stripped, "raw"


def first_json_difference(a, b, path="$") -> str | None:
    if type(a) is not type(b):
        return f"{path}: {short(a)} != {short(b)}"
    if isinstance(a, Obj):
        ka, kb = [k for k, _ in a], [k for k, _ in b]
        if ka != kb:
            missing, added = [k for k in ka if k not in kb], [k for k in kb if k not in ka]
            if missing or added:
                return f"{path}: keys {'removed ' + str(missing) if missing else ''}{' ' if missing and added else ''}{'added ' + str(added) if added else ''}"
            return f"{path}: key order {ka} != {kb}"
        for (k, x), (_, y) in zip(a, b):
            d = first_json_difference(x, y, f"{path}.{k}")
            if d:
                return d
        return None
    if isinstance(a, list):
        for i, (x, y) in enumerate(zip(a, b)):
            d = first_json_difference(x, y, f"{path}[{i}]")
            if d:
                return d
        if len(a) != len(b):
            return f"{path}: {len(a)} items != {len(b)}"
        return None
    if a != b:
        if isinstance(a, str) and len(a) > 60:
            i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            return f"{path}: strings differ at character {i} (lengths {len(a)}, {len(b)})"
        return f"{path}: {short(a)} != {short(b)}"
    return None


def short(v) -> str:
    s = dumps(v) if isinstance(v, (Obj, list)) else json.dumps(v)
    return s if len(s) <= 60 else s[:57] + "..."


def first_byte_difference(a: bytes, b: bytes) -> str:
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"bytes differ at offset {i} (lengths {len(a)}, {len(b)}): {a[max(0, i - 20):i + 20]!r} != {b[max(0, i - 20):i + 20]!r}"


def compare_json(old: bytes, new: bytes, where="body") -> str | None:
    (a, how_a), (b, how_b) = normalised_json(old), normalised_json(new)
    if a == b:
        return None
    note = "" if how_a == how_b == "raw" else " [compared in canonical form: a timings_ms object escaped the regex]"
    try:
        pa, pb = loads(a), loads(b)
    except ValueError:
        return f"{where}: {first_byte_difference(a, b)}{note}"
    d = first_json_difference(pa, pb)
    if d is None:
        d = f"same JSON value, but {first_byte_difference(a, b)}"
    return f"{where}: {d}{note}"


def split_binary(headers: dict, body: bytes) -> tuple[bytes, bytes]:
    n = int(headers["inference-header-content-length"])
    return body[:n], body[n:]


def compare_binary(old_h, old: bytes, new_h, new: bytes) -> str | None:
    (ha, ta), (hb, tb) = split_binary(old_h, old), split_binary(new_h, new)
    d = compare_json(ha, hb, "JSON header")
    if d:
        return d
    if ta == tb:
        return None
    # Name the output tensor where the first difference is.
    i = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), min(len(ta), len(tb)))
    offset = 0
    for o in json.loads(ha).get("outputs", []):
        size = o.get("parameters", {}).get("binary_data_size")
        if size is None:
            continue
        if i < offset + size:
            return f"binary tensor `{o.get('name')}` differs at its byte {i - offset} (of {size})"
        offset += size
    return f"binary part: {first_byte_difference(ta, tb)}"


def compare(rec: dict, old: bytes, status: int, headers: dict, new: bytes) -> str | None:
    if status != rec["status"]:
        return f"status {rec['status']} != {status}"
    ctype = (headers.get("content-type") or "").split(";")[0].strip()
    binary = "inference-header-content-length" in headers and "inference-header-content-length" in rec["headers"]
    if headers.get("content-type") == rec["headers"].get("content-type"):
        # The body first: its first difference says more than a header that follows from it.
        if ctype == "application/octet-stream" and binary:
            d = compare_binary(rec["headers"], old, headers, new)
        elif ctype in JSON_TYPES:
            d = compare_json(old, new)
        else:
            d = None if old == new else f"body: {first_byte_difference(old, new)}"
        if d:
            return d
    if headers != rec["headers"]:
        keys = sorted(set(headers) | set(rec["headers"]))
        k = next(k for k in keys if headers.get(k) != rec["headers"].get(k))
        return f"header {k}: {rec['headers'].get(k)!r} != {headers.get(k)!r}"
    return None


# ------------------------------------------------------------------------------------------------ main


def extension(ctype: str) -> str:
    ctype = ctype.split(";")[0].strip()
    return {"application/json": "json", "application/problem+json": "json", "application/octet-stream": "bin",
            "image/jpeg": "jpg", "application/yaml": "yaml", "text/html": "html"}.get(ctype, "txt")


def sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def git_head(repo: Path) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main() -> int:
    here = Path(__file__).resolve().parent.parent
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("record", "check"):
        s = sub.add_parser(name)
        s.add_argument("--bin", required=True, type=Path, help="the camserve executable")
        s.add_argument("--repo", type=Path, default=here, help="the checkout the server runs in (models, photos); default: this script's")
        s.add_argument("--ort", type=Path, help="libonnxruntime.so (ORT_DYLIB_PATH); default: $ORT_DYLIB_PATH, else REPO/.ort/libonnxruntime.so if present")
        s.add_argument("--threads", type=int, default=THREADS, help=f"ONNX Runtime threads (default {THREADS}: the same on every machine)")
        s.add_argument("--ready-timeout", type=float, default=900, help="seconds to wait for /readyz (default 900)")
        if name == "record":
            s.add_argument("--out", required=True, type=Path, help="folder for the answers and index.json")
        else:
            s.add_argument("--against", required=True, type=Path, help="a folder written by record")
            s.add_argument("--save", type=Path, help="also write the new answers here (as record would)")
    a = p.parse_args()

    repo = a.repo.resolve()
    ort = a.ort
    if ort is None and not os.environ.get("ORT_DYLIB_PATH") and (repo / ".ort/libonnxruntime.so").exists():
        ort = repo / ".ort/libonnxruntime.so"
    binary = a.bin.resolve()
    if not binary.is_file():
        fail(f"no executable at {binary}")
    index = None
    if a.cmd == "check":
        try:
            index = json.loads((a.against / "index.json").read_text())
        except (OSError, ValueError) as e:
            fail(f"cannot read {a.against / 'index.json'}: {e}")
        if index.get("format") != FORMAT:
            fail(f"{a.against}/index.json has format {index.get('format')}, this script reads {FORMAT}")
    requests = build_requests(repo)
    out = a.out if a.cmd == "record" else a.save
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        for f in out.glob("*"):
            if f.is_file() and (f.name == "index.json" or re.match(r"\d\d-", f.name)):
                f.unlink()

    started = time.monotonic()
    server = Server(binary, repo, ort, a.threads, a.ready_timeout)
    print(f"replay: {binary} ready on port {server.port} after {time.monotonic() - started:.0f} s", flush=True)
    if a.cmd == "check":
        print("replay: a difference reads `recorded != now`", flush=True)
    entries, same, different = [], 0, 0
    recorded = {e["name"]: e for e in index["requests"]} if index else {}
    try:
        for i, req in enumerate(requests):
            t0 = time.monotonic()
            status, headers, body = server.send(req)
            secs = time.monotonic() - t0
            fname = f"{i:02d}-{req.name}.{extension(headers.get('content-type', ''))}"
            entry = {"name": req.name, "request": f"{req.method} {req.path}", "request_sha256": req.digest(), "status": status,
                     "headers": headers, "file": fname, "bytes": len(body), "sha256": sha256(body)}
            entries.append(entry)
            if out is not None:
                (out / fname).write_bytes(body)
            if a.cmd == "record":
                print(f"  {status} {fname} ({len(body)} bytes, {secs:.1f} s)", flush=True)
                continue
            rec = recorded.get(req.name)
            if rec is None:
                why = "not in the recording"
            elif rec["request_sha256"] != entry["request_sha256"]:
                why = "the request itself changed since the recording (re-record)"
            else:
                why = compare(rec, (a.against / rec["file"]).read_bytes(), status, headers, body)
            if why is None:
                same += 1
                print(f"  same       {req.name}", flush=True)
            else:
                different += 1
                print(f"  DIFFERENT  {req.name}: {why}", flush=True)
    finally:
        server.stop()

    if out is not None:
        meta = {"format": FORMAT, "git_commit": git_head(repo), "binary_sha256": sha256(binary.read_bytes()),
                "server": f"serve --bind 127.0.0.1:PORT --device cpu --threads {a.threads}", "normalised": ["timings_ms"],
                "requests": entries}
        (out / "index.json").write_text(json.dumps(meta, indent=1) + "\n")
    if a.cmd == "record":
        total = sum((out / e["file"]).stat().st_size for e in entries)
        print(f"replay: recorded {len(entries)} requests into {out} ({total} bytes) in {time.monotonic() - started:.0f} s")
        return 0
    missing = [n for n in recorded if n not in {r.name for r in requests}]
    for n in missing:
        different += 1
        print(f"  DIFFERENT  {n}: recorded, but no longer sent")
    print(f"replay: {same + different} requests, {same} identical, {different} different")
    return 1 if different else 0


if __name__ == "__main__":
    sys.exit(main())
