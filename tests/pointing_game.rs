//! Explanation quality through the HTTP API, on held-out pictures of the bundled models (the pointing game): the
//! demo classifier's Grad-CAM peak inside the object's box for 200 pictures (tests/data/shapes), and the bundled
//! detector's per-detection maps inside their boxes on 60 scenes (tests/data/scenes).

#[path = "support/server.rs"]
mod server;

use serde_json::Value;
use server::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gradcam_points_at_the_object() {
    let mut s = Server::start(demo_config()).await;
    let boxes: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(root().join("tests/data/shapes/boxes.json")).unwrap()).unwrap();
    assert_eq!(boxes.len(), 200);
    let (mut hits, mut correct) = (0, 0);
    for b in &boxes {
        let file = b["file"].as_str().unwrap();
        let r = s.client.post(s.url("/v1/models/demo/explain?methods=gradcam&outputs=raw"))
            .header("content-type", "image/jpeg").body(image_bytes(file)).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let body: Value = r.json().await.unwrap();
        let e = &body["explanations"][0];
        let (x, y) = (e["peak"]["x"].as_i64().unwrap(), e["peak"]["y"].as_i64().unwrap());
        let bx: Vec<i64> = b["box"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
        if x >= bx[0] && x <= bx[2] && y >= bx[1] && y <= bx[3] {
            hits += 1;
        }
        if body["predictions"][0]["label"] == b["label"] {
            correct += 1;
        }
    }
    eprintln!("pointing game: {hits}/200 peaks inside the box; accuracy {correct}/200");
    assert!(hits >= 180, "pointing game: only {hits}/200 Grad-CAM peaks inside the object's box");
    s.stop().await.unwrap();
}

/// The bundled detector (models/shapes_detector.onnx, trained by models/train_detector.py) on its 60 held-out scenes
/// (tests/data/scenes, a seed unused in training): for each detection, the default explanation (HiResCAM at the
/// default layer, `size=original`) must peak inside the detection's box enlarged by 25 % (each side 1.25x about
/// its centre) for at least 90 % of the detections. The other methods' rates at the same layer (Grad-CAM, Grad-CAM++,
/// XGrad-CAM, LayerCAM, Eigen-CAM, saliency) are reported, not checked (docs/METHODS.md, "Detectors"). Criterion
/// fixed before the first measurement (issue 27).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detector_maps_point_at_their_boxes() {
    let mut c = demo_config();
    c.models = vec![camserve::config::ModelConfig::new("shapes", root().join("models/shapes_detector.onnx"))];
    let mut s = Server::start(c).await;
    let scenes: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(root().join("tests/data/scenes/boxes.json")).unwrap()).unwrap();
    assert_eq!(scenes.len(), 60);
    const METHODS: [&str; 7] = ["hirescam", "gradcam", "gradcam++", "xgradcam", "layercam", "eigencam", "saliency"];
    let (mut total, mut matched, mut objects) = (0, 0, 0);
    let mut hits = std::collections::BTreeMap::<String, usize>::new();
    for scene in &scenes {
        let file = scene["file"].as_str().unwrap();
        let bytes = std::fs::read(root().join("tests/data/scenes").join(file)).unwrap();
        let r = s.client.post(s.url(&format!("/v1/models/shapes/explain?methods={}&top_k=10&size=original&outputs=raw", METHODS.join(",").replace('+', "%2B"))))
            .header("content-type", "image/jpeg").body(bytes).send().await.unwrap();
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap();
        assert_eq!(status, 200, "{file}: {body}");
        let dets = body["detections"].as_array().unwrap();
        assert!(dets.len() <= 10, "{file}: {} detections, more than top_k", dets.len());
        let gt = scene["objects"].as_array().unwrap();
        objects += gt.len();
        // Detections that find an object of their class at IoU >= 0.5 (each object once): the detector's recall here.
        let mut used = vec![false; gt.len()];
        for d in dets {
            let b = &d["box"];
            let xyxy = [b["x"].as_f64().unwrap() as f32, b["y"].as_f64().unwrap() as f32, (b["x"].as_f64().unwrap() + b["width"].as_f64().unwrap()) as f32, (b["y"].as_f64().unwrap() + b["height"].as_f64().unwrap()) as f32];
            if let Some(k) = (0..gt.len()).find(|&k| {
                let g: Vec<f32> = gt[k]["box"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
                !used[k] && gt[k]["class_index"] == d["class_index"] && camserve::detection::iou(xyxy, [g[0], g[1], g[2], g[3]]) >= 0.5
            }) {
                used[k] = true;
                matched += 1;
            }
        }
        for e in body["explanations"].as_array().unwrap() {
            let d = &dets[e["target"]["detection"].as_u64().unwrap() as usize];
            let b = &d["box"];
            let (x, y, w, h) = (b["x"].as_f64().unwrap(), b["y"].as_f64().unwrap(), b["width"].as_f64().unwrap(), b["height"].as_f64().unwrap());
            let (px, py) = (e["peak"]["x"].as_f64().unwrap() + 0.5, e["peak"]["y"].as_f64().unwrap() + 0.5);
            let inside = (px - (x + w / 2.0)).abs() <= 0.625 * w && (py - (y + h / 2.0)).abs() <= 0.625 * h;
            let method = e["method"].as_str().unwrap();
            total += (method == "hirescam") as usize;
            *hits.entry(method.to_string()).or_default() += inside as usize;
        }
    }
    let hires = hits.get("hirescam").copied().unwrap_or(0);
    let rate = hires as f64 / total.max(1) as f64;
    let rates: Vec<String> = METHODS.iter().map(|m| format!("{m} {}/{total} ({:.1} %)", hits.get(*m).copied().unwrap_or(0), 100.0 * hits.get(*m).copied().unwrap_or(0) as f64 / total.max(1) as f64)).collect();
    eprintln!("detector pointing game: {}; {matched} of {objects} objects found (IoU >= 0.5, same class)", rates.join(", "));
    assert!(total >= 100, "only {total} detections on 60 scenes");
    assert!(rate >= 0.9, "pointing game: HiResCAM's peak inside its box (enlarged 25 %) for {hires}/{total} detections, under 90 %");
    s.stop().await.unwrap();
}
