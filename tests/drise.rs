//! D-RISE against Microsoft's vision-explanation-methods 0.1.1, run as it is on the YOLOv8n fixture
//! (tests/fixtures/drise, made by make_drise_fixture.py: 200 masks from its own generator, its per-mask weights and
//! its saliency for the two best detections of photos/rocket.png's letterboxed input), then D-RISE through the API.
//!
//! Criteria, fixed before the first measurement:
//! - the masks, rebuilt by camserve's `mask_from` from the reference's cells and crop offsets: equal, all 200;
//! - the targets found by camserve's decoding on the unmasked input: the reference's anchors, classes within, boxes
//!   and class vectors within 1e-5;
//! - each mask's weight, from camserve's decoding (`detection::yolo_raw`, conf 0.25 as the reference's masked
//!   images) and `drise::weight` on ONNX Runtime's output of the masked input: within 1e-5 of the reference's for at
//!   least 196 of the 200 masks of each target (a masked score within rounding of the threshold may flip);
//! - camserve's fusion of the reference's masks and weights, min-max normalised as the reference: within 1e-5.

mod common;

#[path = "support/server.rs"]
mod server;

use camserve::detection::{self, Thresholds};
use camserve::methods::drise::{self, Proposal};
use ndarray::{Array2, Array4, ArrayD, Axis};
use ndarray_npy::NpzReader;
use serde_json::Value;

fn dir() -> std::path::PathBuf {
    server::root().join("tests/fixtures")
}

fn npz(path: &str) -> NpzReader<std::fs::File> {
    NpzReader::new(std::fs::File::open(dir().join(path)).unwrap()).unwrap()
}

fn array<T: ndarray_npy::ReadableElement>(z: &mut NpzReader<std::fs::File>, key: &str) -> ArrayD<T> {
    z.by_name(&format!("{key}.npy")).unwrap_or_else(|e| panic!("{key}: {e}"))
}

/// The raw YOLO output's detections with their class vectors, as camserve's detector finds them.
fn proposals(out: &[f32], t: Thresholds) -> Vec<(usize, Proposal)> {
    let (nc, anchors) = (80, 2100);
    detection::yolo_raw(out, nc, anchors, t)
        .into_iter()
        .map(|f| (f.anchor, Proposal { xyxy: f.xyxy, classes: (0..nc).map(|c| out[(4 + c) * anchors + f.anchor]).collect() }))
        .collect()
}

fn min_max(a: &Array2<f32>) -> Array2<f32> {
    let (lo, hi) = a.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| (l.min(v), h.max(v)));
    a.mapv(|v| (v - lo) / (hi - lo))
}

#[test]
fn drise_equals_vision_explanation_methods_on_its_own_masks() {
    let mut z = npz("drise/drise.npz");
    let masks: ArrayD<u8> = array(&mut z, "masks");
    let grids: ArrayD<u8> = array(&mut z, "grids");
    let crops: ArrayD<i64> = array(&mut z, "crops");
    let n = masks.shape()[0];
    assert_eq!(n, 200);
    // The masks.
    let mut ours = Vec::with_capacity(n);
    for k in 0..n {
        let cells: Vec<u8> = grids.index_axis(Axis(0), k).iter().copied().collect();
        let m = drise::mask_from(&cells, 16, (crops[[k, 0]] as usize, crops[[k, 1]] as usize), 320, 320);
        let want = masks.index_axis(Axis(0), k).mapv(|v| v as f32).into_dimensionality::<ndarray::Ix2>().unwrap();
        assert_eq!(m, want, "mask {k}");
        ours.push(m);
    }
    // The targets, from the unmasked input.
    let input: ArrayD<f32> = array(&mut npz("detection/letterbox.npz"), "3");
    let input = input.into_dimensionality::<ndarray::Ix4>().unwrap();
    let env = camserve::backend::runtime::environment(None).expect("ONNX Runtime library (run scripts/fetch-ort.sh)");
    let mut session = ort::session::Session::builder(env)
        .unwrap()
        .with_intra_threads(2)
        .unwrap_or_else(|e| e.recover())
        .commit_from_file(dir().join("detection/yolov8n_320_dynbatch.onnx"))
        .unwrap();
    let mut forward = |x: Array4<f32>| -> Vec<Vec<f32>> {
        let out = common::run(&mut session, vec![("images", x.into_dyn())], &["output0"]);
        out[0].outer_iter().map(|r| r.iter().copied().collect()).collect()
    };
    let t = Thresholds::default();
    let found = proposals(&forward(input.clone())[0], t);
    let anchors: ArrayD<i64> = array(&mut z, "target_anchors");
    let boxes: ArrayD<f32> = array(&mut z, "target_boxes");
    let classes: ArrayD<f32> = array(&mut z, "target_class_scores");
    let mut targets = Vec::new();
    for a in 0..2 {
        let (anchor, p) = &found[a];
        assert_eq!(*anchor as i64, anchors[a], "target {a}: anchor");
        for (k, v) in p.xyxy.iter().enumerate() {
            assert!((v - boxes[[a, k]]).abs() <= 1e-5 * 320.0, "target {a}: box {:?}", p.xyxy);
        }
        for (c, v) in p.classes.iter().enumerate() {
            assert!((v - classes[[a, c]]).abs() <= 1e-5, "target {a}: class {c} score {v} vs {}", classes[[a, c]]);
        }
        targets.push(p.clone());
    }
    // The weights, on ONNX Runtime's outputs of the masked inputs (batches of 8).
    let want_w: ArrayD<f32> = array(&mut z, "weights_conf025");
    let mut got_w = vec![vec![0f32; n]; 2];
    for start in (0..n).step_by(8) {
        let end = (start + 8).min(n);
        let mut batch = Array4::<f32>::zeros((end - start, 3, 320, 320));
        for (k, m) in ours[start..end].iter().enumerate() {
            let masked = &input.index_axis(Axis(0), 0) * &m.view().insert_axis(Axis(0));
            batch.index_axis_mut(Axis(0), k).assign(&masked);
        }
        for (k, out) in forward(batch).into_iter().enumerate() {
            let found: Vec<Proposal> = proposals(&out, t).into_iter().map(|(_, p)| p).collect();
            for a in 0..2 {
                got_w[a][start + k] = drise::weight(&targets[a], &found);
            }
        }
    }
    for a in 0..2 {
        let off: Vec<(usize, f32, f32)> = (0..n).filter(|&k| (got_w[a][k] - want_w[[a, k]]).abs() > 1e-5).map(|k| (k, got_w[a][k], want_w[[a, k]])).collect();
        println!("target {a}: {} of {n} weights within 1e-5 of the reference; off: {off:?}", n - off.len());
        assert!(off.len() <= 4, "target {a}: {} weights differ from the reference by more than 1e-5: {off:?}", off.len());
    }
    // The fusion of the reference's weights on its masks; and, reported, of camserve's own weights.
    let want_s: ArrayD<f32> = array(&mut z, "saliency_conf025");
    for a in 0..2 {
        let want = want_s.index_axis(Axis(0), a).into_dimensionality::<ndarray::Ix2>().unwrap().to_owned();
        let fuse = |w: &dyn Fn(usize) -> f32| {
            let mut f = drise::Fusion::new(320, 320);
            for (k, m) in ours.iter().enumerate() {
                f.add(m, w(k));
            }
            min_max(&f.finish())
        };
        let diff = |s: &Array2<f32>| s.iter().zip(want.iter()).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        let theirs = diff(&fuse(&|k| want_w[[a, k]]));
        let own = diff(&fuse(&|k| got_w[a][k]));
        println!("target {a}: fusion of the reference's weights {theirs:.2e}; of camserve's weights {own:.2e} (max abs, min-max normalised)");
        assert!(theirs <= 1e-5, "target {a}: fusion differs from the reference's by {theirs:.3e}");
    }
}

/// Through the API on the bundled detector: D-RISE is seeded (the same seed gives the same map, another seed another
/// one, and the answer returns the seed used), its map peaks inside the explained box on a held-out scene, and a
/// classifier refuses it with a 422.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drise_through_the_api_on_the_bundled_detector() {
    use server::*;
    let mut c = demo_config();
    c.models.push(camserve::config::ModelConfig::new("shapes", root().join("models/shapes_detector.onnx")));
    let mut s = Server::start(c).await;
    let scene = std::fs::read(root().join("tests/data/scenes/009.jpg")).unwrap();
    let post = |query: String, body: Vec<u8>| s.client.post(s.url(&query)).header("content-type", "image/jpeg").body(body).send();
    let mut raws = Vec::new();
    for seed in [7, 7, 8] {
        let r = post(format!("/v1/models/shapes/explain?methods=drise&masks=300&seed={seed}&top_k=2&size=original&outputs=raw"), scene.clone()).await.unwrap();
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap();
        assert_eq!(status, 200, "{body}");
        check_response("/v1/models/{model}/explain", "post", 200, "application/json", &body);
        let e = body["explanations"].as_array().unwrap();
        assert_eq!(e.len(), 2, "{body}");
        for x in e {
            assert_eq!(x["method"], "drise");
            assert_eq!(x["seed"], seed, "{x}");
            let d = &body["detections"][x["target"]["detection"].as_u64().unwrap() as usize]["box"];
            let (px, py) = (x["peak"]["x"].as_f64().unwrap() + 0.5, x["peak"]["y"].as_f64().unwrap() + 0.5);
            let (bx, by, bw, bh) = (d["x"].as_f64().unwrap(), d["y"].as_f64().unwrap(), d["width"].as_f64().unwrap(), d["height"].as_f64().unwrap());
            assert!((px - (bx + bw / 2.0)).abs() <= 0.625 * bw && (py - (by + bh / 2.0)).abs() <= 0.625 * bh, "D-RISE's peak ({px}, {py}) outside its box {d}");
        }
        raws.push(e[0]["raw"]["data"].as_str().unwrap().to_string());
    }
    assert_eq!(raws[0], raws[1], "the same seed gives the same map");
    assert_ne!(raws[0], raws[2], "another seed, another map");
    let r = post("/v1/models/demo/explain?methods=drise".into(), std::fs::read(root().join("tests/data/shapes/000.jpg")).unwrap()).await.unwrap();
    assert_eq!(r.status(), 422);
    let p: Value = r.json().await.unwrap();
    assert!(p["detail"].as_str().unwrap().contains("detection"), "{p}");
    s.stop().await.unwrap();
}
