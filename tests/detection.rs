//! Detectors against their exporter's own predictor, on committed fixtures (tests/fixtures/detection, made by
//! make_detection_fixtures.py with Ultralytics' own code on YOLOv8n, YOLO11n and YOLO26n built from their YAMLs,
//! BatchNorm calibrated on real photos, exported with `model.export(format="onnx", imgsz=320)`; YOLO26n with
//! `nms=False`, its end-to-end head).
//!
//! Criteria, fixed before the first measurement:
//! - OpenCV's `INTER_LINEAR` resize and Ultralytics' `LetterBox`: bit for bit on synthetic images;
//! - the letterboxed, /255 input of each photo: equal to the tensor Ultralytics' predictor fed ONNX Runtime;
//! - decoding and NMS on Ultralytics' own raw output: the same detections (classes, anchors), boxes at IoU >= 0.99
//!   and scores within 1e-4;
//! - through the HTTP API on the image files: the same classes in the same order, each box at IoU >= 0.99 in the
//!   upload's pixels, scores within 1e-4 (the definition of "equal").

#[path = "support/server.rs"]
mod server;

use camserve::detection::{self, Thresholds};
use camserve::letterbox;
use image::RgbImage;
use ndarray::{Array3, ArrayD};
use ndarray_npy::NpzReader;
use serde_json::Value;
use server::*;

fn dir() -> std::path::PathBuf {
    root().join("tests/fixtures/detection")
}

fn npz(name: &str) -> NpzReader<std::fs::File> {
    NpzReader::new(std::fs::File::open(dir().join(name)).unwrap()).unwrap()
}

fn reference() -> Vec<Value> {
    reference_of("detections.json")
}

fn reference_of(file: &str) -> Vec<Value> {
    serde_json::from_slice::<Vec<Value>>(&std::fs::read(dir().join(file)).unwrap()).unwrap()
}

fn rgb(a: &Array3<u8>) -> RgbImage {
    let (h, w, _) = a.dim();
    RgbImage::from_raw(w as u32, h as u32, a.as_standard_layout().iter().copied().collect()).unwrap()
}

fn xyxy(v: &Value) -> [f32; 4] {
    let a: Vec<f32> = v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
    [a[0], a[1], a[2], a[3]]
}

#[test]
fn opencv_resize_and_ultralytics_letterbox_bit_for_bit() {
    let mut z = npz("cv2_resize.npz");
    let names = z.names().unwrap();
    let mut checked = 0;
    for k in 0.. {
        let Ok(input) = z.by_name::<ndarray::OwnedRepr<u8>, ndarray::Ix3>(&format!("in_{k}.npy")) else { break };
        let img = rgb(&input);
        for j in 0.. {
            let key = format!("out_{k}_{j}.npy");
            if !names.iter().any(|n| *n == key || format!("{n}.npy") == key) {
                break;
            }
            let want: Array3<u8> = z.by_name(&key).unwrap();
            let size: ndarray::Array1<i64> = z.by_name(&format!("size_{k}_{j}.npy")).unwrap();
            let got = letterbox::resize_linear(&img, size[0] as u32, size[1] as u32);
            let diff = got.as_raw().iter().zip(want.iter()).filter(|(a, b)| a != b).count();
            let first: Vec<(usize, u8, u8)> = got.as_raw().iter().zip(want.iter()).enumerate().filter(|(_, (a, b))| a != b).take(6).map(|(i, (a, b))| (i, *a, *b)).collect();
            assert_eq!(diff, 0, "cv2.resize of image {k} ({}x{}) to {size}: {diff} bytes differ, first (index, camserve, cv2): {first:?}", img.width(), img.height());
            checked += 1;
        }
        let want: Array3<u8> = z.by_name(&format!("letterbox_{k}.npy")).unwrap();
        let (got, _) = letterbox::letterbox(&img, 320, 320);
        let diff = got.as_raw().iter().zip(want.iter()).filter(|(a, b)| a != b).count();
        assert_eq!(diff, 0, "LetterBox of image {k}: {diff} bytes differ");
        checked += 1;
    }
    assert!(checked >= 8, "only {checked} comparisons ran");
}

/// The photos as camserve decodes and letterboxes them are the tensors Ultralytics' predictor ran.
#[test]
fn letterboxed_inputs_equal_ultralytics_preprocessing() {
    let mut z = npz("letterbox.npz");
    let px = camserve::preprocess::PixelFormat { resize: camserve::preprocess::ResizePolicy::Letterbox, ..Default::default() };
    for r in reference() {
        let i = r["index"].as_u64().unwrap();
        let want: ArrayD<f32> = z.by_name(&format!("{i}.npy")).unwrap();
        let bytes = std::fs::read(root().join(r["image"].as_str().unwrap())).unwrap();
        let img = camserve::preprocess::decode(&bytes, camserve::preprocess::DecodeLimits { max_pixels: 1 << 26, max_dimension: 1 << 14 }).unwrap();
        let (boxed, _) = camserve::preprocess::to_model_size(&img, 320, 320, px);
        let got = camserve::preprocess::normalize(&boxed, [0.0; 3], [1.0; 3], px);
        let want = want.into_shape_with_order(got.dim()).unwrap();
        let max = got.iter().zip(want.iter()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        let n = got.iter().zip(want.iter()).filter(|(a, b)| a != b).count();
        assert_eq!(n, 0, "{}: {n} of {} values differ from Ultralytics' input (max {max})", r["image"], want.len());
    }
}

/// JPEG is decoded as libjpeg-turbo decodes it (OpenCV's `imread`, PIL's `Image.open`): each JPEG photo's pixels
/// equal, bit for bit, the PNG copy of what OpenCV decoded from it (photos/, written by `cv2.imwrite`).
#[test]
fn jpeg_photos_decode_as_opencv_decodes_them() {
    let limits = camserve::preprocess::DecodeLimits { max_pixels: 1 << 26, max_dimension: 1 << 14 };
    let pairs = [
        ("assets/photos/astronaut.jpg", "astronaut.png"),
        ("assets/photos/chelsea.jpg", "chelsea.png"),
        ("assets/photos/coffee.jpg", "coffee.png"),
        ("assets/photos/rocket.jpg", "rocket.png"),
        ("tests/data/shapes/001.jpg", "001.png"),
        ("tests/data/shapes/002.jpg", "002.png"),
    ];
    for (jpg, png) in pairs {
        let got = camserve::preprocess::decode(&std::fs::read(root().join(jpg)).unwrap(), limits).unwrap();
        let want = camserve::preprocess::decode(&std::fs::read(dir().join("photos").join(png)).unwrap(), limits).unwrap();
        assert_eq!(got.dimensions(), want.dimensions(), "{jpg}");
        let differ = got.as_raw().iter().zip(want.as_raw()).filter(|(a, b)| a != b).count();
        let max = got.as_raw().iter().zip(want.as_raw()).map(|(a, b)| a.abs_diff(*b)).max().unwrap_or(0);
        assert_eq!(differ, 0, "{jpg}: {differ} of {} bytes differ from OpenCV's decoding (max {max})", want.as_raw().len());
    }
}

fn same_detections(what: &str, got: &[(usize, [f32; 4], f32)], want: &[(usize, [f32; 4], f32)]) {
    assert_eq!(got.len(), want.len(), "{what}: {} detections, Ultralytics {}", got.len(), want.len());
    for (k, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.0, w.0, "{what}: detection {k} has class {}, Ultralytics {}", g.0, w.0);
        let iou = detection::iou(g.1, w.1);
        assert!(iou >= 0.99, "{what}: detection {k}: IoU {iou} with Ultralytics' box ({:?} vs {:?})", g.1, w.1);
        assert!((g.2 - w.2).abs() <= 1e-4, "{what}: detection {k}: score {} vs Ultralytics {}", g.2, w.2);
    }
}

/// Decoding and NMS alone, on the raw output Ultralytics' predictor got from ONNX Runtime.
#[test]
fn nms_on_ultralytics_raw_output_finds_its_detections() {
    let mut z = npz("raw_output.npz");
    let refs = reference();
    let mut checked = 0;
    for r in &refs {
        let i = r["index"].as_u64().unwrap();
        let Ok(raw) = z.by_name::<ndarray::OwnedRepr<f32>, ndarray::IxDyn>(&format!("{i}.npy")) else { continue };
        let (rows, anchors) = (raw.shape()[1], raw.shape()[2]);
        let flat: Vec<f32> = raw.iter().copied().collect();
        let found = detection::yolo_raw(&flat, rows - 4, anchors, Thresholds::default());
        let want: Vec<_> = r["detections"].as_array().unwrap().iter().map(|d| (d["class"].as_u64().unwrap() as usize, xyxy(&d["xyxy_input"]), d["score"].as_f64().unwrap() as f32)).collect();
        let got: Vec<_> = found.iter().map(|f| (f.class, f.xyxy, f.score)).collect();
        same_detections(r["image"].as_str().unwrap(), &got, &want);
        let anchors_want: Vec<u64> = r["detections"].as_array().unwrap().iter().map(|d| d["anchor"].as_u64().unwrap()).collect();
        assert_eq!(found.iter().map(|f| f.anchor as u64).collect::<Vec<_>>(), anchors_want, "{}: anchors", r["image"]);
        checked += 1;
    }
    assert!(checked >= 3, "only {checked} raw outputs");
}

fn yolo_config(file: &str) -> camserve::config::Config {
    let mut c = demo_config();
    c.models = vec![camserve::config::ModelConfig::new("yolo", dir().join(file))];
    c
}

/// The image files through the API: the detections Ultralytics' predict found on the same ONNX file (`file`, its
/// predictions `detections`), then an explain request with no options: the best detection, HiResCAM at the head's
/// stride-8 input (`layer`).
async fn detections_equal_predict(file: &str, detections: &str, format: &str, layer: &str) {
    let mut s = Server::start(yolo_config(file)).await;
    let m: Value = s.client.get(s.url("/v1/models/yolo")).send().await.unwrap().json().await.unwrap();
    check_response("/v1/models/{model}", "get", 200, "application/json", &m);
    assert_eq!(m["task"], "detection", "{m}");
    assert_eq!(m["detection"]["format"], format);
    assert_eq!(m["detection"]["classes"], 80);
    assert_eq!((m["detection"]["score_threshold"].as_f64(), m["detection"]["iou_threshold"].as_f64()), (Some(0.25), Some(0.7)));
    let mut count = 0;
    for r in reference_of(detections) {
        let name = r["image"].as_str().unwrap();
        let bytes = std::fs::read(root().join(name)).unwrap();
        let ctype = if name.ends_with(".png") { "image/png" } else { "image/jpeg" };
        let res = s.client.post(s.url("/v1/models/yolo/predict")).header("content-type", ctype).body(bytes).send().await.unwrap();
        let status = res.status().as_u16();
        let body: Value = res.json().await.unwrap();
        assert_eq!(status, 200, "{name}: {body}");
        check_response("/v1/models/{model}/predict", "post", 200, "application/json", &body);
        assert!(body.get("predictions").is_none(), "a detector has no predictions list");
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
        let want: Vec<_> = r["detections"].as_array().unwrap().iter().map(|d| (d["class"].as_u64().unwrap() as usize, xyxy(&d["xyxy"]), d["score"].as_f64().unwrap() as f32)).collect();
        same_detections(&format!("{file} {name}"), &got, &want);
        count += want.len();
    }
    assert!(count >= 20, "{file}: only {count} detections compared");
    let bytes = std::fs::read(dir().join("photos/rocket.png")).unwrap();
    let body: Value = s.client.post(s.url("/v1/models/yolo/explain")).header("content-type", "image/png").body(bytes).send().await.unwrap().json().await.unwrap();
    check_response("/v1/models/{model}/explain", "post", 200, "application/json", &body);
    let e = body["explanations"].as_array().unwrap();
    assert_eq!(e.len(), 1, "{body}");
    assert_eq!((e[0]["method"].as_str(), e[0]["layer"].as_str()), (Some("hirescam"), Some(layer)));
    assert_eq!(e[0]["target"]["detection"], 0);
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detections_through_the_api_equal_ultralytics_predict() {
    detections_equal_predict("yolov8n_320.onnx", "detections.json", "ultralytics", "/model.15/cv2/act/Mul_output_0").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn yolo11n_detections_equal_ultralytics_predict() {
    detections_equal_predict("yolo11n_320.onnx", "detections_yolo11n.json", "ultralytics", "/model.16/cv2/act/Mul_output_0").await;
}

/// The original JPEG files (not their PNG copies) through the API: the detections Ultralytics' predict found on
/// them (`detections_jpeg.json`), which needs JPEG decoded as OpenCV decodes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jpeg_photos_detections_equal_ultralytics_predict() {
    detections_equal_predict("yolov8n_320.onnx", "detections_jpeg.json", "ultralytics", "/model.15/cv2/act/Mul_output_0").await;
}

/// YOLO26n's end-to-end export (`nms=False`): [1, 300, 6] rows chosen by the graph's own TopK, only thresholded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn yolo26n_end_to_end_detections_equal_ultralytics_predict() {
    detections_equal_predict("yolo26n_320.onnx", "detections_yolo26n.json", "ultralytics_end2end", "/model.16/cv2/act/Mul_output_0").await;
}

/// The end-to-end decoding alone, on the [1, 300, 6] output Ultralytics' predictor got from ONNX Runtime.
#[test]
fn end_to_end_rows_of_ultralytics_output_are_its_detections() {
    let mut z = npz("raw_output_yolo26n.npz");
    let refs = reference_of("detections_yolo26n.json");
    let mut checked = 0;
    for r in &refs {
        let i = r["index"].as_u64().unwrap();
        let Ok(raw) = z.by_name::<ndarray::OwnedRepr<f32>, ndarray::IxDyn>(&format!("output_{i}.npy")) else { continue };
        assert_eq!(&raw.shape()[1..], &[300, 6]);
        let flat: Vec<f32> = raw.iter().copied().collect();
        let found = detection::yolo_end2end(&flat, 80, 300, Thresholds::default());
        let want: Vec<_> = r["detections"].as_array().unwrap().iter().map(|d| (d["class"].as_u64().unwrap() as usize, xyxy(&d["xyxy_input"]), d["score"].as_f64().unwrap() as f32)).collect();
        let got: Vec<_> = found.iter().map(|f| (f.class, f.xyxy, f.score)).collect();
        same_detections(r["image"].as_str().unwrap(), &got, &want);
        let rows_want: Vec<u64> = r["detections"].as_array().unwrap().iter().map(|d| d["row"].as_u64().unwrap()).collect();
        assert_eq!(found.iter().map(|f| f.anchor as u64).collect::<Vec<_>>(), rows_want, "{}: rows", r["image"]);
        checked += 1;
    }
    assert!(checked >= 2, "only {checked} raw outputs");
}

fn raw_f32(e: &Value) -> (Vec<usize>, Vec<f32>) {
    use base64::Engine as _;
    let shape = e["raw"]["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
    let bytes = base64::engine::general_purpose::STANDARD.decode(e["raw"]["data"].as_str().unwrap()).unwrap();
    (shape, bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect())
}

/// max |a - b| / max |b|.
fn rel(a: &[f32], b: &[f32]) -> f64 {
    let scale = b.iter().map(|v| v.abs() as f64).fold(0.0, f64::max).max(1e-30);
    a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).abs()).fold(0.0, f64::max) / scale
}

/// Per-box maps through the API against pytorch-grad-cam on the PyTorch model in float64, the target the detection's
/// class score at its own output row (gradcam.json): Grad-CAM and HiResCAM at the P3 head input and in the class
/// branch, Eigen-CAM (up to its sign, which pytorch-grad-cam leaves to the SVD), and the saliency map (the input
/// gradient, torch.autograd). Criterion, fixed before measuring: max |camserve - reference| / max |reference| <= 1e-4.
/// `file` is the served model, `spec` and `arrays` the references, `detections` predict's list, `tensor` the key in
/// `spec` that names each map's layer in `file`.
async fn per_box_maps_equal(file: &str, spec: &str, arrays: &str, detections: &str, tensor: &str) {
    use base64::Engine as _;
    let spec: Value = serde_json::from_slice(&std::fs::read(dir().join(spec)).unwrap()).unwrap();
    let mut z = npz(arrays);
    let refs = reference_of(detections);
    let mut s = Server::start(yolo_config(file)).await;
    let mut rows = Vec::new();
    for d in spec["detections"].as_array().unwrap() {
        let image = d["image"].as_str().unwrap();
        let entry = refs.iter().find(|r| r["image"] == image).unwrap_or_else(|| panic!("{image} is not in detections.json"));
        let index = entry["detections"].as_array().unwrap().iter().position(|x| x["anchor"] == d["anchor"] && x["class"] == d["class"]).expect("the detection");
        if let Some(row) = d.get("row") {
            assert_eq!(&entry["detections"][index]["row"], row, "{image}: the detection's output row");
        }
        let b64 = base64::engine::general_purpose::STANDARD.encode(std::fs::read(root().join(image)).unwrap());
        for m in d["maps"].as_array().unwrap() {
            let method = match m["method"].as_str().unwrap() {
                "GradCAM" => "gradcam",
                "HiResCAM" => "hirescam",
                "EigenCAM" => "eigencam",
                other => panic!("unknown method {other}"),
            };
            let layer = m[tensor].as_str().unwrap();
            let body = serde_json::json!({ "image": b64, "methods": [method], "target": index, "layer": layer, "outputs": ["raw"] });
            let res = s.client.post(s.url("/v1/models/yolo/explain")).json(&body).send().await.unwrap();
            let status = res.status().as_u16();
            let answer: Value = res.json().await.unwrap();
            assert_eq!(status, 200, "{answer}");
            check_response("/v1/models/{model}/explain", "post", 200, "application/json", &answer);
            let e = &answer["explanations"][0];
            assert_eq!(e["target"]["detection"], index);
            let (shape, got) = raw_f32(e);
            // `raw`: pytorch-grad-cam's own weighted sum (`get_cam_image`), before its ReLU; `cam`: after it, which is
            // what camserve's raw map is for Grad-CAM and HiResCAM. Eigen-CAM's projection has no ReLU in camserve's
            // raw map, and its sign is the SVD's in pytorch-grad-cam.
            let key = format!("{}_{}.npy", m["key"].as_str().unwrap(), if method == "eigencam" { "raw" } else { "cam" });
            let want: ArrayD<f32> = z.by_name(&key).unwrap();
            assert_eq!(&shape[..], &want.shape()[1..], "{key}: shape");
            let want: Vec<f32> = want.iter().copied().collect();
            if want.iter().all(|v| *v == 0.0) {
                // In the class branch's last conv (the class logits, all negative here) the map is zero after the
                // ReLU: camserve's must be too, but equal zeros prove nothing about the gradient, so the row does
                // not count.
                assert!(got.iter().all(|v| *v == 0.0), "{key}: the reference is all zeros, camserve's is not");
                continue;
            }
            let err = if method == "eigencam" {
                let neg: Vec<f32> = want.iter().map(|v| -v).collect();
                rel(&got, &want).min(rel(&got, &neg))
            } else {
                rel(&got, &want)
            };
            rows.push(format!("{image} detection {index} {method} at {layer}: {err:.2e}"));
            assert!(err <= 1e-4, "{key}: camserve vs pytorch-grad-cam (float64) {err:.3e}\n{}", rows.join("\n"));
        }
        let key = format!("d{}_input_grad.npy", d["detection"]);
        if let Ok(want) = z.by_name::<ndarray::OwnedRepr<f32>, ndarray::IxDyn>(&key) {
            let body = serde_json::json!({ "image": b64, "methods": ["saliency"], "target": index, "outputs": ["raw"] });
            let answer: Value = s.client.post(s.url("/v1/models/yolo/explain")).json(&body).send().await.unwrap().json().await.unwrap();
            let (_, got) = raw_f32(&answer["explanations"][0]);
            let want: Vec<f32> = want.iter().copied().collect();
            let err = rel(&got, &want);
            rows.push(format!("{image} detection {index} saliency (input gradient): {err:.2e}"));
            assert!(err <= 1e-4, "{key}: input gradient vs torch.autograd (float64) {err:.3e}");
        }
    }
    println!("{file}:\n{}", rows.join("\n"));
    assert!(rows.len() >= 10, "only {} comparisons", rows.len());
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_box_maps_equal_pytorch_grad_cam_in_float64() {
    per_box_maps_equal("yolov8n_320_dynbatch.onnx", "gradcam.json", "gradcam.npz", "detections.json", "onnx_tensor_dynbatch").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn yolo11n_per_box_maps_equal_pytorch_grad_cam_in_float64() {
    per_box_maps_equal("yolo11n_320.onnx", "gradcam_yolo11n.json", "gradcam_yolo11n.npz", "detections_yolo11n.json", "onnx_tensor").await;
}

/// YOLO26n end-to-end: the row's score, which the graph's TopK gathered, differentiated back through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn yolo26n_end_to_end_per_box_maps_equal_pytorch_grad_cam_in_float64() {
    per_box_maps_equal("yolo26n_320.onnx", "gradcam_yolo26n.json", "gradcam_yolo26n.npz", "detections_yolo26n.json", "onnx_tensor").await;
}

/// The Open Inference Protocol on a detector: `num_detections`, `boxes`, `scores`, `classes` (padded to the most
/// any image has) equal the v1 answer's detections, the per-image map has the layer's grid, and an image without
/// detections gets zeros; a classifier's outputs are refused for a detector.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_inference_protocol_carries_the_detections() {
    use base64::Engine as _;
    let mut s = Server::start(yolo_config("yolov8n_320_dynbatch.onnx")).await;
    let meta: Value = s.client.get(s.url("/v2/models/yolo")).send().await.unwrap().json().await.unwrap();
    check_response("/v2/models/{model}", "get", 200, "application/json", &meta);
    let names: Vec<&str> = meta["outputs"].as_array().unwrap().iter().map(|o| o["name"].as_str().unwrap()).collect();
    assert_eq!(&names[..4], ["num_detections", "boxes", "scores", "classes"], "{meta}");
    let files = ["photos/chelsea.png", "photos/rocket_portrait.png"];
    let b64: Vec<String> = files.iter().map(|f| base64::engine::general_purpose::STANDARD.encode(std::fs::read(dir().join(f)).unwrap())).collect();
    let req = serde_json::json!({
        "inputs": [{ "name": "image", "datatype": "BYTES", "shape": [2], "data": b64 }],
        "parameters": { "methods": ["hirescam"] },
    });
    let res: Value = s.client.post(s.url("/v2/models/yolo/infer")).json(&req).send().await.unwrap().json().await.unwrap();
    check_response("/v2/models/{model}/infer", "post", 200, "application/json", &res);
    let out = |name: &str| res["outputs"].as_array().unwrap().iter().find(|o| o["name"] == name).unwrap_or_else(|| panic!("no {name} in {res}")).clone();
    let counts: Vec<i64> = out("num_detections")["data"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
    let most = *counts.iter().max().unwrap() as usize;
    assert_eq!(out("boxes")["shape"], serde_json::json!([2, most, 4]));
    assert_eq!(out("hirescam")["shape"], serde_json::json!([2, 40, 40]));
    for (i, f) in files.iter().enumerate() {
        let body: Value = s.client.post(s.url("/v1/models/yolo/predict")).header("content-type", "image/png").body(std::fs::read(dir().join(f)).unwrap()).send().await.unwrap().json().await.unwrap();
        let dets = body["detections"].as_array().unwrap();
        assert_eq!(counts[i] as usize, dets.len(), "{f}");
        for (k, d) in dets.iter().enumerate() {
            let b = &d["box"];
            let (x, y) = (b["x"].as_f64().unwrap(), b["y"].as_f64().unwrap());
            let want = [x, y, x + b["width"].as_f64().unwrap(), y + b["height"].as_f64().unwrap()];
            let got: Vec<f64> = (0..4).map(|c| out("boxes")["data"][(i * most + k) * 4 + c].as_f64().unwrap()).collect();
            for c in 0..4 {
                assert!((got[c] - want[c]).abs() < 1e-3, "{f} detection {k}: {got:?} vs {want:?}");
            }
            assert_eq!(out("classes")["data"][i * most + k], d["class_index"]);
            assert_eq!(out("scores")["data"][i * most + k].as_f64().map(|v| v as f32), d["score"].as_f64().map(|v| v as f32));
        }
        for k in dets.len()..most {
            assert_eq!(out("classes")["data"][i * most + k], -1, "padding");
        }
    }
    // No detections above 0.99: zero counts, a zero map.
    let req = serde_json::json!({
        "inputs": [{ "name": "image", "datatype": "BYTES", "shape": [1], "data": [b64[0]] }],
        "parameters": { "methods": ["hirescam"], "score_threshold": 0.99 },
    });
    let res: Value = s.client.post(s.url("/v2/models/yolo/infer")).json(&req).send().await.unwrap().json().await.unwrap();
    let out = |name: &str| res["outputs"].as_array().unwrap().iter().find(|o| o["name"] == name).unwrap().clone();
    assert_eq!(out("num_detections")["data"], serde_json::json!([0]), "{res}");
    assert!(out("hirescam")["data"].as_array().unwrap().iter().all(|v| v.as_f64() == Some(0.0)));
    // A classifier's output on a detector: 400.
    let req = serde_json::json!({ "inputs": [{ "name": "image", "datatype": "BYTES", "shape": [1], "data": [b64[0]] }], "outputs": [{ "name": "logits" }] });
    let r = s.client.post(s.url("/v2/models/yolo/infer")).json(&req).send().await.unwrap();
    assert_eq!(r.status(), 400);
    s.stop().await.unwrap();
}

/// A model said to be a detector whose output camserve cannot decode is refused at load, the error naming the
/// output's shape and the keys that describe it; a labels file of the wrong length too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_detector_layouts_are_refused_at_load() {
    let mut c = demo_config();
    c.models[0].task = Some(camserve::config::TaskName::Detection);
    let err = tokio::task::spawn_blocking(move || camserve::core::loading::load_models(&c).err().map(|e| format!("{e:#}"))).await.unwrap().expect("refused");
    assert!(err.contains("[6]") && err.contains("task") && err.contains("score_threshold"), "{err}");
    let mut c = yolo_config("yolov8n_320_dynbatch.onnx");
    c.models[0].labels = Some(root().join("models/demo.labels.txt"));
    let err = tokio::task::spawn_blocking(move || camserve::core::loading::load_models(&c).err().map(|e| format!("{e:#}"))).await.unwrap().expect("refused");
    assert!(err.contains("6 labels for 80 classes"), "{err}");
}

/// Picking detections: by label (its best detection), by box (the best overlap), `top_k` beyond the detections,
/// and the 422s that say how many detections there are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detections_are_picked_by_index_label_and_box() {
    let mut s = Server::start(yolo_config("yolov8n_320_dynbatch.onnx")).await;
    let png = std::fs::read(dir().join("photos/rocket.png")).unwrap();
    let post = |query: &str| {
        s.client.post(s.url(&format!("/v1/models/yolo/explain?outputs=mask&{query}"))).header("content-type", "image/png").body(png.clone()).send()
    };
    let all: Value = post("top_k=3").await.unwrap().json().await.unwrap();
    let dets = all["detections"].as_array().unwrap().clone();
    assert_eq!(all["explanations"].as_array().unwrap().iter().map(|e| e["target"]["detection"].as_u64().unwrap()).collect::<Vec<_>>(), [0, 1, 2]);
    // The best detection of the third one's class is the first with that label.
    let label = dets[2]["label"].as_str().unwrap();
    let first = dets.iter().position(|d| d["label"] == label).unwrap();
    let by_label: Value = post(&format!("target={label}")).await.unwrap().json().await.unwrap();
    assert_eq!(by_label["explanations"][0]["target"]["detection"], first, "{by_label}");
    // A box drawn on detection 4 picks it.
    let b = &dets[4]["box"];
    let query = format!("box={},{},{},{}", b["x"], b["y"], b["width"], b["height"]);
    let by_box: Value = post(&query).await.unwrap().json().await.unwrap();
    assert_eq!(by_box["explanations"][0]["target"]["detection"], 4, "{by_box}");
    // `top_k` beyond the detections explains those there are (a score threshold of 0.45 leaves 3 of 23).
    let few: Value = post("top_k=10&score_threshold=0.45").await.unwrap().json().await.unwrap();
    let n = few["detections"].as_array().unwrap().len();
    assert!((1..10).contains(&n), "{few}");
    assert_eq!(few["explanations"].as_array().unwrap().len(), n, "{few}");
    for (query, needle) in [("target=999", "23 detections"), ("target=no-such-label", "no detection of `no-such-label`"), ("box=5000,5000,5,5", "no detection overlaps")] {
        let r = post(query).await.unwrap();
        assert_eq!(r.status(), 422, "{query}");
        let p: Value = r.json().await.unwrap();
        assert!(p["detail"].as_str().unwrap().contains(needle), "{query}: {p}");
    }
    // Options that only make sense for a classifier's class targets or softmax are refused.
    for query in ["methods=finercam", "metrics=deletion"] {
        assert_eq!(post(query).await.unwrap().status(), 422, "{query}");
    }
    s.stop().await.unwrap();
}

/// `camserve inspect` says what task it recognised, from the file alone.
#[test]
fn inspect_prints_the_task() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_camserve")).arg("inspect").arg(dir().join("yolov8n_320.onnx")).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("task: detection (format ultralytics: 80 classes named in the file, 2100 anchors"), "{text}");
    assert!(text.contains("default method hirescam at /model.15/cv2/act/Mul_output_0"), "{text}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_camserve")).arg("inspect").arg(dir().join("yolo26n_320.onnx")).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("task: detection (format ultralytics_end2end: 80 classes named in the file, 300 rows selected in the graph, no NMS"), "{text}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_camserve")).arg("inspect").arg(root().join("models/demo.onnx")).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("task: classification (6 classes)"));
}
