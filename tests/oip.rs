//! The Open Inference Protocol ("v2") and the KServe v1 shim, at the byte level: the binary tensor extension both
//! ways, the protocol's error form, keys, versions and limits. The real Triton and KServe clients run against
//! the same endpoints in scripts/oip-test.sh (part of `make test`), each answer compared with /v1's.

#[path = "support/server.rs"]
mod server;

use base64::Engine as _;
use serde_json::{json, Value};
use server::*;

const HEADER_LENGTH: &str = "inference-header-content-length";

/// A body in Triton's binary form: the JSON header, then the binary tensors, and the header's length.
fn binary_body(header: &Value, tensors: &[&[u8]]) -> (Vec<u8>, usize) {
    let mut body = serde_json::to_vec(header).unwrap();
    let n = body.len();
    for t in tensors {
        body.extend_from_slice(t);
    }
    (body, n)
}

/// A BYTES tensor's binary form: each element's 4-byte little-endian length, then the element.
fn bytes_tensor(items: &[&[u8]]) -> Vec<u8> {
    items.iter().flat_map(|i| (i.len() as u32).to_le_bytes().into_iter().chain(i.iter().copied())).collect()
}

async fn infer_raw(s: &Server, path: &str, body: Vec<u8>, header_len: Option<usize>) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
    let mut req = s.client.post(s.url(path)).body(body);
    if let Some(n) = header_len {
        req = req.header(HEADER_LENGTH, n.to_string()).header("content-type", "application/octet-stream");
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, headers, r.bytes().await.unwrap().to_vec())
}

/// POSTs JSON, returns the JSON answer.
async fn post_json(s: &Server, path: &str, body: &Value) -> Value {
    s.client.post(s.url(path)).json(body).send().await.unwrap().json().await.unwrap()
}

/// The error's text, asserting the protocol's form `{"error": "..."}`.
fn error_text(body: &[u8]) -> String {
    let v: Value = serde_json::from_slice(body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)));
    assert_eq!(v.as_object().map(|o| o.len()), Some(1), "{v}");
    v["error"].as_str().unwrap_or_else(|| panic!("no error string: {v}")).to_string()
}

#[tokio::test]
async fn health_metadata_and_versions() {
    let mut s = Server::start(demo_config()).await;
    for path in ["/v2/health/live", "/v2/health/ready", "/v2/models/demo/ready", "/v2/models/demo/versions/1/ready"] {
        assert_eq!(s.client.get(s.url(path)).send().await.unwrap().status(), 200, "{path}");
    }
    let meta: Value = s.client.get(s.url("/v2")).send().await.unwrap().json().await.unwrap();
    assert_eq!(meta["name"], "camserve");
    assert_eq!(meta["extensions"], json!(["binary_tensor_data", "classification", "parameters"]));
    let m: Value = s.client.get(s.url("/v2/models/demo")).send().await.unwrap().json().await.unwrap();
    assert_eq!(m["inputs"][0], json!({"name": "image", "datatype": "BYTES", "shape": [-1]}));
    assert_eq!(m["inputs"][1]["shape"], json!([-1, 3, 64, 64]));
    assert_eq!(m["outputs"][0], json!({"name": "logits", "datatype": "FP32", "shape": [-1, 6]}));
    assert!(m["outputs"].as_array().unwrap().iter().any(|o| o["name"] == "saliency" && o["shape"] == json!([-1, 3, 64, 64])));
    assert_eq!(m["versions"], json!(["1"]));
    check_response("/v2/models/{model}", "get", 200, "application/json", &m);
    check_response("/v2", "get", 200, "application/json", &meta);
    let same: Value = s.client.get(s.url("/v2/models/demo/versions/1")).send().await.unwrap().json().await.unwrap();
    assert_eq!(same, m);
    for path in ["/v2/models/demo/versions/2", "/v2/models/nope", "/v2/models/nope/ready"] {
        let r = s.client.get(s.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 404, "{path}");
        let text = error_text(&r.bytes().await.unwrap());
        assert!(text.contains("version `2`") || text.contains("no model named `nope`"), "{text}");
    }
    s.stop().await.unwrap();
}

#[tokio::test]
async fn binary_tensors_both_ways_equal_json() {
    let mut s = Server::start(demo_config()).await;
    let (a, b) = (image_bytes("000.jpg"), image_bytes("001.jpg"));
    let outputs = json!([
        {"name": "logits", "parameters": {"binary_data": true}},
        {"name": "top_k"},
        {"name": "gradcam", "parameters": {"binary_data": true}},
        {"name": "saliency_heatmap_png", "parameters": {"binary_data": true}},
    ]);
    let header = json!({
        "id": "r1",
        "parameters": {"top_k": 2, "target": [2, 4]},
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": 8 + a.len() + b.len()}}],
        "outputs": outputs,
    });
    let (body, n) = binary_body(&header, &[&bytes_tensor(&[&a, &b])]);
    let (status, headers, body) = infer_raw(&s, "/v2/models/demo/infer", body, Some(n)).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let json_len: usize = headers[HEADER_LENGTH].to_str().unwrap().parse().unwrap();
    let head: Value = serde_json::from_slice(&body[..json_len]).unwrap();
    assert_eq!(head["id"], "r1");
    assert_eq!(head["model_name"], "demo");
    let outs = head["outputs"].as_array().unwrap();
    assert_eq!(outs.iter().map(|o| o["name"].as_str().unwrap()).collect::<Vec<_>>(), ["logits", "top_k", "gradcam", "saliency_heatmap_png"]);
    // The binary tensors follow the JSON in the order of the outputs that have binary_data_size.
    let mut rest = &body[json_len..];
    let mut take = |o: &Value| {
        let size = o["parameters"]["binary_data_size"].as_u64().unwrap() as usize;
        let (t, r) = rest.split_at(size);
        rest = r;
        t.to_vec()
    };
    let logits = take(&outs[0]);
    assert_eq!(outs[0]["shape"], json!([2, 6]));
    assert_eq!(logits.len(), 2 * 6 * 4);
    assert_eq!(outs[1]["shape"], json!([2, 2]));
    assert_eq!(outs[1]["data"].as_array().unwrap().len(), 4, "top_k in JSON: 2 per image");
    let gradcam = take(&outs[2]);
    let pngs = take(&outs[3]);
    assert!(rest.is_empty(), "{} bytes left over", rest.len());
    assert_eq!(outs[3]["shape"], json!([2]));
    let first_png_len = u32::from_le_bytes(pngs[..4].try_into().unwrap()) as usize;
    assert_eq!(&pngs[4..12], b"\x89PNG\r\n\x1a\n");
    assert_eq!(&pngs[4 + first_png_len + 4..4 + first_png_len + 12], b"\x89PNG\r\n\x1a\n");

    // The same request in JSON both ways gives the same numbers.
    let b64 = |f: &[u8]| base64::engine::general_purpose::STANDARD.encode(f);
    let json_req = json!({
        "parameters": {"top_k": 2, "target": [2, 4]},
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": [b64(&a), b64(&b)]}],
        "outputs": [{"name": "logits"}, {"name": "gradcam"}],
    });
    let r = post_json(&s, "/v2/models/demo/infer", &json_req).await;
    check_response("/v2/models/{model}/infer", "post", 200, "application/json", &r);
    let floats = |bytes: &[u8]| bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect::<Vec<_>>();
    let as_f32 = |v: &Value| v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect::<Vec<_>>();
    assert_eq!(floats(&logits), as_f32(&r["outputs"][0]["data"]));
    assert_eq!(floats(&gradcam), as_f32(&r["outputs"][1]["data"]));
    assert_eq!(r["outputs"][1]["shape"], outs[2]["shape"]);
    // No `outputs`: logits, probabilities, top_k and the raw map of each requested method.
    let body = json!({"parameters": {"methods": "gradcam"}, "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64(&a)]}]});
    let r = post_json(&s, "/v2/models/demo/infer", &body).await;
    let names: Vec<&str> = r["outputs"].as_array().unwrap().iter().map(|o| o["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["logits", "probabilities", "top_k", "gradcam"]);
    s.stop().await.unwrap();
}

#[tokio::test]
async fn malformed_requests_get_the_protocols_error_form() {
    let mut s = Server::start(demo_config()).await;
    let img = image_bytes("002.jpg");
    let input = |size: usize| json!({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": size}}]});
    let cases: Vec<(&str, Vec<u8>, Option<usize>, u16, &str)> = vec![
        // The header length points past the body.
        ("header length", b"{}".to_vec(), Some(10), 400, "but the body has 2 bytes"),
        // binary_data_size runs past the end.
        ("binary past the end", binary_body(&input(10_000), &[&bytes_tensor(&[&img])]).0, Some(binary_body(&input(10_000), &[]).1), 400, "runs past the end"),
        // Binary bytes nobody claimed.
        ("trailing binary", {
            let t = bytes_tensor(&[&img]);
            binary_body(&input(t.len()), &[&t, b"xx"]).0
        }, Some(binary_body(&input(bytes_tensor(&[&img]).len()), &[]).1), 400, "2 bytes of binary data after the inputs"),
        // A BYTES element's length is cut off.
        ("cut element", binary_body(&input(6), &[&[200, 0, 0, 0, 1, 2]]).0, Some(binary_body(&input(6), &[]).1), 400, "runs past its tensor"),
        ("not JSON", b"{".to_vec(), None, 400, "not valid"),
        ("two inputs", serde_json::to_vec(&json!({"inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [1], "data": ["AA=="]},
            {"name": "image", "datatype": "BYTES", "shape": [1], "data": ["AA=="]}]})).unwrap(), None, 400, "expected one input"),
        ("shape", serde_json::to_vec(&json!({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [0.0]}]})).unwrap(), None, 400, "must have shape [N, 3, 64, 64]"),
        ("count", serde_json::to_vec(&json!({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 3, 64, 64], "data": [0.0, 1.0]}]})).unwrap(), None, 400, "but 2 values"),
        ("not base64", serde_json::to_vec(&json!({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["%%"]}]})).unwrap(), None, 400, "not base64"),
        ("bad option", serde_json::to_vec(&json!({"parameters": {"alpha": 3}, "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["AA=="]}]})).unwrap(), None, 422, "alpha must be between 0 and 1"),
        ("metrics", serde_json::to_vec(&json!({"parameters": {"metrics": "all"}, "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["AA=="]}]})).unwrap(), None, 422, "not offered by v2 infer"),
        ("targets", serde_json::to_vec(&json!({"parameters": {"target": [1, 2]}, "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["AA=="]}]})).unwrap(), None, 400, "one class for all images, or one per image"),
        ("method without output", serde_json::to_vec(&json!({"parameters": {"methods": "gradcam,saliency"}, "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["AA=="]}], "outputs": [{"name": "gradcam"}]})).unwrap(), None, 400, "method `saliency` is in `methods` but no output asks for it"),
        ("classification", serde_json::to_vec(&json!({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["AA=="]}], "outputs": [{"name": "top_k", "parameters": {"classification": 2}}]})).unwrap(), None, 400, "classification applies to"),
    ];
    for (what, body, n, status, needle) in cases {
        let (got, _, body) = infer_raw(&s, "/v2/models/demo/infer", body, n).await;
        let text = error_text(&body);
        assert_eq!(got, status, "{what}: {text}");
        check_response("/v2/models/{model}/infer", "post", got, "application/json", &serde_json::from_slice(&body).unwrap());
        assert!(text.contains(needle), "{what}: {text}");
    }
    // A NaN in a binary FP32 tensor.
    let mut t = vec![0u8; 3 * 64 * 64 * 4];
    t[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    let header = json!({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 3, 64, 64], "parameters": {"binary_data_size": t.len()}}]});
    let (body, n) = binary_body(&header, &[&t]);
    let (got, _, body) = infer_raw(&s, "/v2/models/demo/infer", body, Some(n)).await;
    assert_eq!((got, error_text(&body).contains("NaN")), (400, true));
    // Over the image limit.
    let many: Vec<&str> = vec!["AA=="; 65];
    let r = s
        .client
        .post(s.url("/v2/models/demo/infer"))
        .json(&json!({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [65], "data": many}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(error_text(&r.bytes().await.unwrap()).contains("at most 64"));
    // The server still serves.
    assert_eq!(s.client.get(s.url("/v2/health/ready")).send().await.unwrap().status(), 200);
    s.stop().await.unwrap();
}

#[tokio::test]
async fn keys_apply_to_v2_in_its_error_form() {
    let mut config = demo_config();
    config.server.api_keys = vec!["k3y".to_string()].into();
    let mut s = Server::start(config).await;
    let body = json!({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["AA=="]}]});
    let r = s.client.post(s.url("/v2/models/demo/infer")).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(error_text(&r.bytes().await.unwrap()).contains("API key"));
    assert_eq!(s.client.get(s.url("/v2/models/demo")).send().await.unwrap().status(), 401);
    // Health follows healthz and readyz, open by default.
    assert_eq!(s.client.get(s.url("/v2/health/live")).send().await.unwrap().status(), 200);
    assert_eq!(s.client.get(s.url("/v2/health/ready")).send().await.unwrap().status(), 200);
    let r = s.client.get(s.url("/v2/models/demo")).bearer_auth("k3y").send().await.unwrap();
    assert_eq!(r.status(), 200);
    s.stop().await.unwrap();
}

#[tokio::test]
async fn kserve_v1_shim() {
    let mut s = Server::start(demo_config()).await;
    let b64 = base64::engine::general_purpose::STANDARD.encode(image_bytes("003.jpg"));
    let body = json!({"instances": [{"image": {"b64": b64}}, {"image": {"b64": b64}}], "methods": "gradcam", "target": [1, 2]});
    let r = post_json(&s, "/v1/models/demo:explain", &body).await;
    let ex = r["explanations"].as_array().unwrap();
    assert_eq!(ex.len(), 2);
    // Each instance answers as /v1 does: here two targets, one Grad-CAM each.
    assert_eq!(ex[0]["explanations"].as_array().unwrap().len(), 2);
    assert_eq!(ex[0]["explanations"][1]["target"]["index"], 2);
    let r = post_json(&s, "/v1/models/demo:predict", &json!({"instances": [{"image": {"b64": b64}}]})).await;
    assert_eq!(r["predictions"][0]["model"], "demo");
    check_response("/v1/models/{model}:predict", "post", 200, "application/json", &r);
    assert!(r["predictions"][0].get("explanations").is_none());
    for (path, body, status, needle) in [
        ("/v1/models/demo:train", json!({"instances": []}), 405, ":predict and :explain"),
        ("/v1/models/demo:predict", json!({"inputs": []}), 400, "`instances`"),
        ("/v1/models/demo:predict", json!({"instances": [[1.0, 2.0]]}), 400, "takes [3][64][64]"),
        ("/v1/models/demo:predict", json!({"instances": [{"img": 1}]}), 400, "expected {\"image\""),
        ("/v1/models/nope:predict", json!({"instances": [{"image": {"b64": b64}}]}), 404, "no model named `nope`"),
    ] {
        let r = s.client.post(s.url(path)).json(&body).send().await.unwrap();
        assert_eq!(r.status(), status, "{path} {body}");
        let text = error_text(&r.bytes().await.unwrap());
        assert!(text.contains(needle), "{path}: {text}");
    }
    s.stop().await.unwrap();
}
