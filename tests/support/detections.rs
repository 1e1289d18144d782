//! What the detector tests (tests/detr.rs, tests/rtdetr.rs) compare with: a box from JSON, the "equal"
//! for detections, and the relative error of maps.

use serde_json::Value;

/// `[x0, y0, x1, y1]` from a JSON array.
pub fn xyxy(v: &Value) -> [f32; 4] {
    let a: Vec<f32> = v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
    [a[0], a[1], a[2], a[3]]
}

/// The "equal": the same classes in the same order, each box at IoU >= 0.99, scores within 1e-4.
pub fn same_detections(what: &str, got: &[(usize, [f32; 4], f32)], want: &[(usize, [f32; 4], f32)]) {
    assert_eq!(got.len(), want.len(), "{what}: {} detections, the reference predictor found {}:\n{got:?}\n{want:?}", got.len(), want.len());
    for (k, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.0, w.0, "{what} detection {k}: class");
        assert!((g.2 - w.2).abs() <= 1e-4, "{what} detection {k}: score {} vs {}", g.2, w.2);
        let iou = camserve::detection::iou(g.1, w.1);
        assert!(iou >= 0.99, "{what} detection {k}: IoU {iou} ({:?} vs {:?})", g.1, w.1);
    }
}

/// max |a - b| / max |b|.
pub fn rel(a: &[f64], b: &[f64]) -> f64 {
    let scale = b.iter().map(|v| v.abs()).fold(0.0, f64::max).max(1e-30);
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max) / scale
}
