//! DETR-family detectors (transformers' `DetrForObjectDetection`) against transformers' own processor and
//! post-processing and against float64 PyTorch, on committed fixtures (tests/fixtures/detr, made by
//! make_detr_fixtures.py: a small random-weight DETR, frozen BatchNorm calibrated on real photos, exported with
//! `torch.onnx.export`, outputs `logits` [N, 20, 6] and `pred_boxes` [N, 20, 4], batch dynamic).
//!
//! Criteria, fixed before the first measurement:
//! - the preprocessed input of each photo (resize to 320 x 320, ImageNet normalisation) equal to
//!   `DetrImageProcessor`'s within 1e-5 (the same resized pixels; the two normalise in a different order);
//! - decoding ONNX Runtime's own outputs: the detections `post_process_object_detection` found (the same queries
//!   and classes), boxes at IoU >= 0.99 in the upload's pixels, scores within 1e-4;
//! - through the API (the processor's tensor given as the model's input, and the image files): the same, the
//!   issue's definition of "equal";
//! - per-detection maps and input gradients (the target: the softmax probability of the detection's class at its
//!   query) within 1e-4 of pytorch-grad-cam and torch.autograd on the float64 model (max |a - b| / max |b|).

#[path = "support/detections.rs"]
mod detections;
#[path = "support/fixture.rs"]
#[allow(dead_code)]
mod fixture;
#[path = "support/server.rs"]
mod server;

use camserve::detection::{self, Thresholds};
use ndarray::ArrayD;
use ndarray_npy::NpzReader;
use serde_json::Value;
use detections::*;
use fixture::{oip_output, Fixture};
use server::*;

fn dir() -> std::path::PathBuf {
    Fixture::new("detr").0
}

fn npz(name: &str) -> NpzReader<std::fs::File> {
    Fixture::new("detr").npz(name)
}

fn json(name: &str) -> Value {
    Fixture::new("detr").json(name)
}

fn detr_config() -> camserve::config::Config {
    let mut c = demo_config();
    let mut m = camserve::config::ModelConfig::new("detr", dir().join("detr_320.onnx"));
    m.labels = Some(dir().join("labels.txt"));
    c.models = vec![m];
    c
}

/// (class, box, score) of the reference detections of image entry `r`, best first (post-processing keeps query
/// order), boxes scaled by `scale`.
fn reference(r: &Value, scale: [f32; 2]) -> Vec<(usize, [f32; 4], f32)> {
    let mut want: Vec<_> = r["detections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            let b = xyxy(&d["xyxy"]);
            (d["class"].as_u64().unwrap() as usize, [b[0] * scale[0], b[1] * scale[1], b[2] * scale[0], b[3] * scale[1]], d["score"].as_f64().unwrap() as f32)
        })
        .collect();
    want.sort_by(|a, b| b.2.total_cmp(&a.2));
    want
}

#[test]
fn decoding_onnx_runtimes_output_finds_the_post_processors_detections() {
    let mut z = npz("detr_raw_output.npz");
    let mut count = 0;
    for (k, r) in json("detections_detr.json").as_array().unwrap().iter().enumerate() {
        let logits: ArrayD<f32> = z.by_name(&format!("logits_{k}.npy")).unwrap();
        let boxes: ArrayD<f32> = z.by_name(&format!("pred_boxes_{k}.npy")).unwrap();
        let (q, kk) = (logits.shape()[1], logits.shape()[2]);
        // The joined output the rewrite builds: each query's logits, then its box.
        let joined: Vec<f32> = (0..q).flat_map(|i| logits.iter().skip(i * kk).take(kk).chain(boxes.iter().skip(i * 4).take(4)).copied().collect::<Vec<_>>()).collect();
        let found = detection::detr(&joined, kk, q, 320.0, 320.0, Thresholds { score: 0.5, iou: 0.7, max_detections: q });
        let (w, h) = (r["width"].as_f64().unwrap() as f32, r["height"].as_f64().unwrap() as f32);
        let got: Vec<_> = found.iter().map(|f| (f.class, [f.xyxy[0] * w / 320.0, f.xyxy[1] * h / 320.0, f.xyxy[2] * w / 320.0, f.xyxy[3] * h / 320.0], f.score)).collect();
        same_detections(r["image"].as_str().unwrap(), &got, &reference(r, [1.0, 1.0]));
        let mut queries: Vec<u64> = found.iter().map(|f| f.anchor as u64).collect();
        queries.sort();
        let want: Vec<u64> = r["detections"].as_array().unwrap().iter().map(|d| d["query"].as_u64().unwrap()).collect();
        assert_eq!(queries, want, "the same queries");
        count += found.len();
    }
    assert!(count >= 30, "only {count} detections");
}

#[test]
fn preprocessing_equals_detr_image_processor() {
    let mut z = npz("detr_inputs.npz");
    let px = camserve::preprocess::PixelFormat::default();
    let mut rows = Vec::new();
    for (k, r) in json("detections_detr.json").as_array().unwrap().iter().enumerate() {
        let want: ArrayD<f32> = z.by_name(&format!("{k}.npy")).unwrap();
        let bytes = std::fs::read(root().join(r["image"].as_str().unwrap())).unwrap();
        let img = camserve::preprocess::decode(&bytes, camserve::preprocess::DecodeLimits { max_pixels: 1 << 26, max_dimension: 1 << 14 }).unwrap();
        let (resized, _) = camserve::preprocess::to_model_size(&img, 320, 320, px);
        let got = camserve::preprocess::normalize(&resized, camserve::config::IMAGENET_MEAN, camserve::config::IMAGENET_STD, px);
        let max = got.iter().zip(want.iter()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        let n = got.iter().zip(want.iter()).filter(|(a, b)| (*a - *b).abs() > 1e-5).count();
        rows.push(format!("{}: {n} of {} values differ by more than 1e-5 (max {max:.3e})", r["image"], want.len()));
    }
    let failed = rows.iter().any(|r| !r.contains(": 0 of"));
    assert!(!failed, "camserve's resize and normalisation vs DetrImageProcessor:\n{}", rows.join("\n"));
}

/// The OIP request with the processor's own tensor for image `k` as the model's input.
fn tensor_request(z: &mut NpzReader<std::fs::File>, k: usize, parameters: Value, outputs: &[&str]) -> Value {
    fixture::tensor_request(z, &k.to_string(), "pixel_values", parameters, outputs)
}

/// The model loads with no configuration beyond its labels: task detection, format `detr`, transformers' threshold;
/// given the processor's tensor, its detections are the post-processor's (boxes in the input's 320 x 320 pixels).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detections_from_the_processors_tensor_equal_transformers() {
    let mut s = Server::start(detr_config()).await;
    let m: Value = s.client.get(s.url("/v1/models/detr")).send().await.unwrap().json().await.unwrap();
    check_response("/v1/models/{model}", "get", 200, "application/json", &m);
    assert_eq!(m["task"], "detection", "{m}");
    assert_eq!(m["detection"]["format"], "detr");
    assert_eq!(m["detection"]["classes"], 5);
    assert_eq!((m["detection"]["score_threshold"].as_f64(), m["detection"]["max_detections"].as_u64()), (Some(0.5), Some(20)));
    let mut z = npz("detr_inputs.npz");
    let mut count = 0;
    for (k, r) in json("detections_detr.json").as_array().unwrap().iter().enumerate() {
        let req = tensor_request(&mut z, k, serde_json::json!({}), &["num_detections", "boxes", "scores", "classes"]);
        let res: Value = s.client.post(s.url("/v2/models/detr/infer")).json(&req).send().await.unwrap().json().await.unwrap();
        check_response("/v2/models/{model}/infer", "post", 200, "application/json", &res);
        let n = oip_output(&res, "num_detections")["data"][0].as_u64().unwrap() as usize;
        let (boxes, scores, classes) = (oip_output(&res, "boxes"), oip_output(&res, "scores"), oip_output(&res, "classes"));
        let got: Vec<_> = (0..n)
            .map(|i| {
                let b: Vec<f32> = (0..4).map(|c| boxes["data"][i * 4 + c].as_f64().unwrap() as f32).collect();
                (classes["data"][i].as_u64().unwrap() as usize, [b[0], b[1], b[2], b[3]], scores["data"][i].as_f64().unwrap() as f32)
            })
            .collect();
        let (w, h) = (r["width"].as_f64().unwrap() as f32, r["height"].as_f64().unwrap() as f32);
        same_detections(r["image"].as_str().unwrap(), &got, &reference(r, [320.0 / w, 320.0 / h]));
        count += n;
    }
    assert!(count >= 30, "only {count} detections");
    s.stop().await.unwrap();
}

/// Per-detection maps against pytorch-grad-cam on the float64 PyTorch model (gradcam_detr.json), the target the
/// softmax probability of the detection's class at its query: Grad-CAM and HiResCAM (pytorch-grad-cam's map after
/// its ReLU, which is camserve's raw map) and Eigen-CAM (up to its sign, the SVD's) at the backbone's last stage and
/// at the input projection; and the input gradient (saliency's raw map) against torch.autograd. The model is given
/// the processor's tensor, so the comparison is of the gradients alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_detection_maps_equal_pytorch_grad_cam_in_float64() {
    let spec = json("gradcam_detr.json");
    let refs = json("detections_detr.json");
    let mut inputs = npz("detr_inputs.npz");
    let mut z = npz("gradcam_detr.npz");
    let mut s = Server::start(detr_config()).await;
    let mut rows = Vec::new();
    for d in spec["detections"].as_array().unwrap() {
        let image = d["image"].as_str().unwrap();
        let k = refs.as_array().unwrap().iter().position(|r| r["image"] == image).unwrap();
        // The detection's rank among the image's detections, best first, as camserve numbers them.
        let mut order: Vec<(f64, u64)> = refs[k]["detections"].as_array().unwrap().iter().map(|x| (x["score"].as_f64().unwrap(), x["query"].as_u64().unwrap())).collect();
        order.sort_by(|a, b| b.0.total_cmp(&a.0));
        let index = order.iter().position(|(_, q)| *q == d["query"].as_u64().unwrap()).unwrap();
        for m in d["maps"].as_array().unwrap() {
            let method = match m["method"].as_str().unwrap() {
                "GradCAM" => "gradcam",
                "HiResCAM" => "hirescam",
                "EigenCAM" => "eigencam",
                other => panic!("unknown method {other}"),
            };
            let layer = m["onnx_tensor"].as_str().unwrap();
            let req = tensor_request(&mut inputs, k, serde_json::json!({ "methods": [method], "target": index, "layer": layer }), &["scores", method]);
            let res: Value = s.client.post(s.url("/v2/models/detr/infer")).json(&req).send().await.unwrap().json().await.unwrap();
            check_response("/v2/models/{model}/infer", "post", 200, "application/json", &res);
            let score = oip_output(&res, "scores")["data"][index].as_f64().unwrap();
            assert!((score - d["score_onnx"].as_f64().unwrap()).abs() < 1e-6, "{image}: detection {index} is query {}", d["query"]);
            let out = oip_output(&res, method);
            let got: Vec<f64> = out["data"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            let key = format!("{}_{}.npy", m["key"].as_str().unwrap(), if method == "eigencam" { "raw" } else { "cam" });
            let want: ArrayD<f64> = z.by_name(&key).unwrap();
            assert_eq!(out["shape"].as_array().unwrap().iter().skip(1).map(|v| v.as_u64().unwrap() as usize).collect::<Vec<_>>(), want.shape()[1..], "{key}");
            let want: Vec<f64> = want.iter().copied().collect();
            assert!(want.iter().any(|v| *v != 0.0), "{key}: an all-zero reference proves nothing");
            let err = if method == "eigencam" { rel(&got, &want).min(rel(&got, &want.iter().map(|v| -v).collect::<Vec<_>>())) } else { rel(&got, &want) };
            rows.push(format!("{image} detection {index} (query {}) {method} at {layer}: {err:.2e}", d["query"]));
            assert!(err <= 1e-4, "{key}: camserve vs pytorch-grad-cam (float64) {err:.3e}\n{}", rows.join("\n"));
        }
        let key = format!("d{}_input_grad.npy", d["d"]);
        if let Ok(want) = z.by_name::<ndarray::OwnedRepr<f32>, ndarray::IxDyn>(&key) {
            let req = tensor_request(&mut inputs, k, serde_json::json!({ "methods": ["saliency"], "target": index }), &["saliency"]);
            let res: Value = s.client.post(s.url("/v2/models/detr/infer")).json(&req).send().await.unwrap().json().await.unwrap();
            let got: Vec<f64> = oip_output(&res, "saliency")["data"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            let err = rel(&got, &want.iter().map(|v| *v as f64).collect::<Vec<_>>());
            rows.push(format!("{image} detection {index} saliency (input gradient): {err:.2e}"));
            assert!(err <= 1e-4, "{key}: input gradient vs torch.autograd (float64) {err:.3e}\n{}", rows.join("\n"));
        }
    }
    println!("{}", rows.join("\n"));
    assert!(rows.len() >= 15, "only {} comparisons", rows.len());
    s.stop().await.unwrap();
}

/// The image files through /v1: the detections transformers found (DetrImageProcessor's resize and normalisation,
/// `post_process_object_detection` with the upload's size), in the upload's pixels and not clipped; an explain
/// request without options explains the best detection with HiResCAM at the input projection; the picks and their
/// errors; an image without detections; the methods a DETR refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detections_from_the_image_files_equal_transformers() {
    let mut s = Server::start(detr_config()).await;
    let m: Value = s.client.get(s.url("/v1/models/detr")).send().await.unwrap().json().await.unwrap();
    assert_eq!(m["default_layer"], "/model/model/input_projection/Conv_output_0", "{m}");
    assert_eq!(m["default_methods"], serde_json::json!(["hirescam"]));
    let methods: Vec<&str> = m["methods"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert!(methods.contains(&"drise") && methods.contains(&"gradcam") && !methods.contains(&"attention_rollout"), "{methods:?}");
    let mut count = 0;
    for r in json("detections_detr.json").as_array().unwrap() {
        let name = r["image"].as_str().unwrap();
        let bytes = std::fs::read(root().join(name)).unwrap();
        let res = s.client.post(s.url("/v1/models/detr/predict")).header("content-type", "image/png").body(bytes).send().await.unwrap();
        let status = res.status().as_u16();
        let body: Value = res.json().await.unwrap();
        assert_eq!(status, 200, "{name}: {body}");
        check_response("/v1/models/{model}/predict", "post", 200, "application/json", &body);
        let got: Vec<_> = body["detections"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                let b = &d["box"];
                let (x, y, w, h) = (b["x"].as_f64().unwrap() as f32, b["y"].as_f64().unwrap() as f32, b["width"].as_f64().unwrap() as f32, b["height"].as_f64().unwrap() as f32);
                (d["class_index"].as_u64().unwrap() as usize, [x, y, x + w, y + h], d["score"].as_f64().unwrap() as f32)
            })
            .collect();
        same_detections(name, &got, &reference(r, [1.0, 1.0]));
        let labels: Vec<&str> = body["detections"].as_array().unwrap().iter().map(|d| d["label"].as_str().unwrap()).collect();
        let want: Vec<&str> = {
            let mut v: Vec<(f64, &str)> = r["detections"].as_array().unwrap().iter().map(|d| (d["score"].as_f64().unwrap(), d["label"].as_str().unwrap())).collect();
            v.sort_by(|a, b| b.0.total_cmp(&a.0));
            v.into_iter().map(|(_, l)| l).collect()
        };
        assert_eq!(labels, want, "{name}: labels from labels.txt");
        count += got.len();
    }
    assert!(count >= 30, "only {count} detections");
    let png = std::fs::read(root().join("tests/fixtures/detection/photos/chelsea.png")).unwrap();
    let explain = |query: &str| s.client.post(s.url(&format!("/v1/models/detr/explain{query}"))).header("content-type", "image/png").body(png.clone());
    let body: Value = explain("").send().await.unwrap().json().await.unwrap();
    check_response("/v1/models/{model}/explain", "post", 200, "application/json", &body);
    let e = &body["explanations"].as_array().unwrap()[0];
    assert_eq!((e["method"].as_str(), e["layer"].as_str()), (Some("hirescam"), Some("/model/model/input_projection/Conv_output_0")));
    assert_eq!(e["target"]["detection"], 0);
    let n = body["detections"].as_array().unwrap().len();
    let res = explain(&format!("?target={n}")).send().await.unwrap();
    assert_eq!(res.status(), 422);
    let problem: Value = res.json().await.unwrap();
    assert!(problem["detail"].as_str().unwrap().contains(&format!("has {n} detections")), "{problem}");
    let body: Value = explain("?target=triangle&methods=gradcam,saliency").send().await.unwrap().json().await.unwrap();
    let picked = body["explanations"][0]["target"]["detection"].as_u64().unwrap() as usize;
    assert_eq!(body["detections"][picked]["label"], "triangle", "the best triangle");
    assert_eq!(body["explanations"].as_array().unwrap().len(), 2);
    let res = explain("?methods=attention_rollout").send().await.unwrap();
    assert!(res.status().is_client_error(), "a DETR has no class token to roll attention out from");
    let body: Value = explain("?score_threshold=0.999").send().await.unwrap().json().await.unwrap();
    assert_eq!((body["detections"].as_array().map(Vec::len), body["explanations"].as_array().map(Vec::len)), (Some(0), Some(0)), "{body}");
    s.stop().await.unwrap();
}

/// `camserve inspect` says what it recognised: the joined outputs, the format, the default layer.
#[test]
fn inspect_prints_the_detr_format() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_camserve")).arg("inspect").arg(dir().join("detr_320.onnx")).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("task: detection (format detr: 5 classes, 20 queries, softmax with \"no object\" last, no NMS; outputs `logits` and `pred_boxes` joined; score_threshold 0.5"), "{text}");
    assert!(text.contains("default method hirescam at /model/model/input_projection/Conv_output_0"), "{text}");
}
