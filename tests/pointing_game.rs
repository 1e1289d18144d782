//! Explanation quality on the demo model, through the HTTP API: for 200 held-out pictures (tests/data/shapes,
//! written by models/train_demo.py with a seed unused in training), Grad-CAM's peak must fall inside the
//! object's box for at least 90% of them (the pointing game).

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
