//! A multi-label classifier (torchvision's MobileNetV3-small with 6 classes and its Sigmoid inside the model) against
//! the PyTorch model and pytorch-grad-cam's `ClassifierOutputTarget`, on committed fixtures
//! (tests/fixtures/multilabel, made by make_multilabel_fixtures.py: seeded random weights, BatchNorm calibrated on the
//! 7 photos, the last layer conditioned so that 2 to 4 classes score at least 0.5 on every photo).
//!
//! Criteria, fixed before the first measurement:
//! - the scores, through OIP from the fixture's input tensor, are ONNX Runtime's within 1e-6; the default targets of
//!   an explain request are the classes scoring at least 0.5, best first, as the fixture lists them;
//! - each default target's Grad-CAM and HiResCAM (pytorch-grad-cam's map after its ReLU, at the layer's grid) at two
//!   layers, and its input gradient (saliency), within 1e-4 of pytorch-grad-cam and torch.autograd on the float64
//!   model (max |a - b| / max |b|): the gradient of the class's sigmoid score, which the model outputs.

#[path = "support/detections.rs"]
#[allow(dead_code)]
mod detections;
#[path = "support/fixture.rs"]
mod fixture;
#[path = "support/server.rs"]
mod server;

use ndarray::ArrayD;
use ndarray_npy::NpzReader;
use serde_json::Value;
use detections::rel;
use fixture::{floats, oip_output, Fixture};
use server::*;

fn dir() -> std::path::PathBuf {
    Fixture::new("multilabel").0
}

fn config() -> camserve::config::Config {
    let mut c = demo_config();
    let mut m = camserve::config::ModelConfig::new("multilabel", dir().join("multilabel_224.onnx"));
    m.labels = Some(dir().join("labels.txt"));
    c.models = vec![m];
    c
}

fn fixture() -> Value {
    Fixture::new("multilabel").json("gradcam.json")
}

fn tensor_request(k: usize, parameters: Value, outputs: &[&str]) -> Value {
    fixture::tensor_request(&mut Fixture::new("multilabel").npz("inputs.npz"), &k.to_string(), "input", parameters, outputs)
}

/// The model's final Sigmoid makes it a multi-label classifier with no configuration; its scores are the model's,
/// and an explain request without targets explains every class scoring at least 0.5.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scores_and_default_targets() {
    let mut s = Server::start(config()).await;
    let spec = fixture();
    let m: Value = s.client.get(s.url("/v1/models/multilabel")).send().await.unwrap().json().await.unwrap();
    check_response("/v1/models/{model}", "get", 200, "application/json", &m);
    assert_eq!((m["task"].as_str(), m["multilabel"]["sigmoid_in_graph"].as_bool(), m["multilabel"]["score_threshold"].as_f64()), (Some("multilabel"), Some(true), Some(0.5)), "{m}");
    for photo in spec["photos"].as_array().unwrap() {
        let k = photo["index"].as_u64().unwrap() as usize;
        let res: Value = s.client.post(s.url("/v2/models/multilabel/infer")).json(&tensor_request(k, serde_json::json!({}), &["probabilities"])).send().await.unwrap().json().await.unwrap();
        let got = floats(oip_output(&res, "probabilities"));
        let want: Vec<f64> = photo["scores_onnx"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        assert!(got.iter().zip(&want).all(|(a, b)| (a - b).abs() <= 1e-6), "photo {k}: {got:?} vs {want:?}");
        // The photo through /v1: every class at or above 0.5 explained, best first, with its sigmoid score.
        let png = std::fs::read(root().join(photo["image"].as_str().unwrap())).unwrap();
        let body: Value = s.client.post(s.url("/v1/models/multilabel/explain?methods=gradcam")).header("content-type", "image/png").body(png.clone()).send().await.unwrap().json().await.unwrap();
        check_response("/v1/models/{model}/explain", "post", 200, "application/json", &body);
        let targets: Vec<u64> = body["explanations"].as_array().unwrap().iter().map(|e| e["target"]["index"].as_u64().unwrap()).collect();
        let want: Vec<u64> = photo["default_targets"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        assert_eq!(targets, want, "photo {k}: {body}");
        let top = &body["predictions"][0];
        assert!((top["score"].as_f64().unwrap() - photo["scores_onnx"][want[0] as usize].as_f64().unwrap()).abs() < 1e-3, "{top}");
        // A higher threshold keeps fewer classes; above every score, none.
        let body: Value = s.client.post(s.url("/v1/models/multilabel/explain?methods=gradcam&score_threshold=0.9999")).header("content-type", "image/png").body(png).send().await.unwrap().json().await.unwrap();
        assert_eq!(body["explanations"].as_array().map(Vec::len), Some(0), "{body}");
    }
    // Options that have no meaning here.
    let png = std::fs::read(root().join(spec["photos"][0]["image"].as_str().unwrap())).unwrap();
    for (query, needle) in [
        ("?metrics=deletion", "independent sigmoid scores"),
        ("?methods=drise", "D-RISE"),
        ("?target=1&score_threshold=0.3", "chooses a multi-label classifier's default targets"),
        ("?score_threshold=2", "between 0 and 1"),
        ("?region=0,0,5,5", "applies to detectors"),
    ] {
        let res = s.client.post(s.url(&format!("/v1/models/multilabel/explain{query}"))).header("content-type", "image/png").body(png.clone()).send().await.unwrap();
        assert_eq!(res.status(), 422, "{query}");
        let p: Value = res.json().await.unwrap();
        assert!(p["detail"].as_str().unwrap().contains(needle), "{query}: {p}");
    }
    s.stop().await.unwrap();
}

/// Each default target's maps and input gradient against pytorch-grad-cam and autograd on the float64 model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maps_equal_pytorch_grad_cam_in_float64() {
    let mut s = Server::start(config()).await;
    let spec = fixture();
    let mut z = NpzReader::new(std::fs::File::open(dir().join("gradcam.npz")).unwrap()).unwrap();
    let (mut rows, mut failed) = (Vec::new(), Vec::new());
    for photo in spec["photos"].as_array().unwrap() {
        let k = photo["index"].as_u64().unwrap() as usize;
        for t in photo["targets"].as_array().unwrap() {
            let class = t["class"].as_u64().unwrap();
            for m in t["maps"].as_array().unwrap() {
                let method = if m["method"] == "GradCAM" { "gradcam" } else { "hirescam" };
                let layer = m["onnx_tensor"].as_str().unwrap();
                let req = tensor_request(k, serde_json::json!({ "methods": [method], "target": class, "layer": layer }), &[method]);
                let res: Value = s.client.post(s.url("/v2/models/multilabel/infer")).json(&req).send().await.unwrap().json().await.unwrap();
                let want: ArrayD<f64> = z.by_name(&format!("{}.npy", m["key"].as_str().unwrap())).unwrap();
                let want: Vec<f64> = want.iter().copied().collect();
                assert!(want.iter().any(|v| *v != 0.0), "photo {k} class {class} {}: an all-zero reference", m["key"]);
                let err = rel(&floats(oip_output(&res, method)), &want);
                rows.push(format!("photo {k} class {class} {method} at {}: {err:.2e}", m["layer"].as_str().unwrap()));
                if err > 1e-4 {
                    failed.push(rows.last().unwrap().clone());
                }
            }
            let want: ArrayD<f32> = z.by_name(&format!("{}.npy", t["input_grad"].as_str().unwrap())).unwrap();
            let req = tensor_request(k, serde_json::json!({ "methods": ["saliency"], "target": class }), &["saliency"]);
            let res: Value = s.client.post(s.url("/v2/models/multilabel/infer")).json(&req).send().await.unwrap().json().await.unwrap();
            let err = rel(&floats(oip_output(&res, "saliency")), &want.iter().map(|v| *v as f64).collect::<Vec<_>>());
            rows.push(format!("photo {k} class {class} saliency (input gradient): {err:.2e}"));
            if err > 1e-4 {
                failed.push(rows.last().unwrap().clone());
            }
        }
    }
    eprintln!("{}", rows.join("\n"));
    assert!(failed.is_empty(), "above 1e-4:\n{}\n\nall:\n{}", failed.join("\n"), rows.join("\n"));
    assert!(rows.len() >= 20 * 5, "only {} comparisons", rows.len());
    s.stop().await.unwrap();
}

#[test]
fn inspect_recognises_a_multi_label_head() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_camserve")).arg("inspect").arg(dir().join("multilabel_224.onnx")).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("task: multilabel (6 classes, each scored by the model's own final Sigmoid; default targets: every class scoring >= 0.5)"), "{text}");
}
