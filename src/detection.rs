//! Object detections from a detector's outputs, as the exporter's own predictor finds them: for Ultralytics YOLO
//! exports, the raw head `[4 + nc, A]` (boxes `cx, cy, w, h` in input pixels, then the class scores after their
//! sigmoid) decoded, kept above the confidence threshold, then class-wise NMS and `max_detections`, as
//! Ultralytics' `non_max_suppression` does it (its float32 arithmetic included: boxes offset by class x 7680,
//! IoU on those offsets); and the end-to-end head `[Q, 6]` (YOLOv10, YOLO26), whose rows are already selected in
//! the graph, only thresholded. Pure functions of arrays; `core::task` applies them to a request's pass.

/// The thresholds of a detector (Ultralytics' `predict` defaults: conf 0.25, iou 0.7, 300 detections).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    pub score: f32,
    pub iou: f32,
    pub max_detections: usize,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds { score: 0.25, iou: 0.7, max_detections: 300 }
    }
}

/// One detection in the model's input pixels.
#[derive(Debug, Clone, PartialEq)]
pub struct Found {
    /// `x0, y0, x1, y1` in input pixels.
    pub xyxy: [f32; 4],
    pub class: usize,
    pub score: f32,
    /// The output row (anchor) it came from: its score is what an explanation differentiates.
    pub anchor: usize,
}

/// Ultralytics' `max_wh`: the class offset that keeps NMS class-wise.
const MAX_WH: f32 = 7680.0;
/// Ultralytics' `max_nms`: the most boxes NMS considers.
const MAX_NMS: usize = 30000;

/// The detections of a raw YOLO head `out` (`[4 + nc, A]`, row-major), best first.
pub fn yolo_raw(out: &[f32], nc: usize, anchors: usize, t: Thresholds) -> Vec<Found> {
    let at = |row: usize, a: usize| out[row * anchors + a];
    // Candidates: the best class above the threshold (`multi_label=False`), first index on ties as torch's max.
    let mut cands: Vec<Found> = Vec::new();
    for a in 0..anchors {
        let (mut best, mut class) = (f32::NEG_INFINITY, 0);
        for c in 0..nc {
            let v = at(4 + c, a);
            if v > best {
                best = v;
                class = c;
            }
        }
        if best > t.score {
            let (cx, cy, w, h) = (at(0, a), at(1, a), at(2, a), at(3, a));
            let xyxy = [cx - w / 2.0, cy - h / 2.0, cx + w / 2.0, cy + h / 2.0];
            cands.push(Found { xyxy, class, score: best, anchor: a });
        }
    }
    // By score, descending (stable: equal scores keep anchor order).
    cands.sort_by(|a, b| b.score.total_cmp(&a.score));
    cands.truncate(MAX_NMS);
    let shifted: Vec<[f32; 4]> = cands
        .iter()
        .map(|f| {
            let off = f.class as f32 * MAX_WH;
            [f.xyxy[0] + off, f.xyxy[1] + off, f.xyxy[2] + off, f.xyxy[3] + off]
        })
        .collect();
    let keep = nms(&shifted, t.iou);
    keep.into_iter().take(t.max_detections).map(|i| cands[i].clone()).collect()
}

/// The softmax of a DETR query's class logits (`K` values, the last "no object"), in float64 and rounded once, as
/// the probabilities transformers' post-processing computes from the same logits (to about 1e-7).
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let e: Vec<f64> = logits.iter().map(|&v| (v as f64 - max).exp()).collect();
    let sum: f64 = e.iter().sum();
    e.iter().map(|v| (v / sum) as f32).collect()
}

/// The detections of a DETR-family head `out` (`[Q, K + 4]`, row-major: each query's `K` class logits, the last
/// "no object", then its box `cx, cy, w, h` normalised to the input), as transformers'
/// `post_process_object_detection` finds them: the softmax over the `K` logits, the best real class (first index
/// on ties, as torch's max), kept when its probability is above the threshold (strictly), the box corners scaled
/// to the input's `width x height` pixels and not clipped. Best first (equal scores keep query order), at most
/// `max_detections`; no NMS (DETR is trained without duplicates), so `t.iou` has no effect.
pub fn detr(out: &[f32], k: usize, queries: usize, width: f32, height: f32, t: Thresholds) -> Vec<Found> {
    let stride = k + 4;
    let mut found: Vec<Found> = (0..queries)
        .filter_map(|q| {
            let row = out.get(q * stride..(q + 1) * stride)?;
            let p = softmax(&row[..k]);
            let (mut score, mut class) = (f32::NEG_INFINITY, 0);
            for (c, &v) in p[..k - 1].iter().enumerate() {
                if v > score {
                    score = v;
                    class = c;
                }
            }
            let [cx, cy, w, h] = [row[k], row[k + 1], row[k + 2], row[k + 3]];
            let xyxy = [(cx - 0.5 * w) * width, (cy - 0.5 * h) * height, (cx + 0.5 * w) * width, (cy + 0.5 * h) * height];
            (score > t.score && xyxy.iter().all(|v| v.is_finite())).then_some(Found { xyxy, class, score, anchor: q })
        })
        .collect();
    found.sort_by(|a, b| b.score.total_cmp(&a.score));
    found.truncate(t.max_detections);
    found
}

/// The logistic function, in f64 (as the detection's score and its seed need it).
pub fn sigmoid(x: f32) -> f32 {
    (1.0 / (1.0 + (-(x as f64)).exp())) as f32
}

/// The detections of a DETR variant that scores each class with a sigmoid (transformers' Conditional DETR, Deformable
/// DETR: `logits` [Q, K] with no "no object" class, joined with `pred_boxes` into `out` [Q, K + 4]), as their
/// `post_process_object_detection` finds them: the sigmoid of every logit, the `max_detections` (its `top_k`,
/// 100) best (query, class) pairs over all queries and classes, so a query may give several detections, kept when
/// the probability is above the threshold (strictly), boxes `cx, cy, w, h` scaled to the input's `width x height`
/// pixels and not clipped. Best first (equal scores in index order); no NMS, so `t.iou` has no effect.
pub fn detr_sigmoid(out: &[f32], k: usize, queries: usize, width: f32, height: f32, t: Thresholds) -> Vec<Found> {
    let stride = k + 4;
    let mut pairs: Vec<(f32, usize, usize)> = (0..queries)
        .filter_map(|q| out.get(q * stride..(q + 1) * stride).map(|row| (q, row)))
        .flat_map(|(q, row)| row[..k].iter().enumerate().map(move |(c, &v)| (sigmoid(v), q, c)))
        .collect();
    pairs.sort_by(|a, b| b.0.total_cmp(&a.0));
    pairs.truncate(t.max_detections);
    pairs
        .into_iter()
        .filter(|(score, _, _)| *score > t.score)
        .filter_map(|(score, q, class)| {
            let row = &out[q * stride..(q + 1) * stride];
            let [cx, cy, w, h] = [row[k], row[k + 1], row[k + 2], row[k + 3]];
            let xyxy = [(cx - 0.5 * w) * width, (cy - 0.5 * h) * height, (cx + 0.5 * w) * width, (cy + 0.5 * h) * height];
            xyxy.iter().all(|v| v.is_finite()).then_some(Found { xyxy, class, score, anchor: q })
        })
        .collect()
}

/// The detections of Ultralytics' RT-DETR head `out` (`[Q, 6]`, row-major: `cx, cy, w, h` normalised to the input,
/// score, class; rows already selected and ranked in the graph), as its `RTDETRPredictor.postprocess` keeps them:
/// the rows whose score is above the threshold, in order, at most `max_detections`, boxes scaled to the input's
/// `width x height` pixels and not clipped; no NMS, so `t.iou` has no effect. A class outside `0..nc` (or not
/// finite) drops the row.
pub fn rtdetr(out: &[f32], nc: usize, rows: usize, width: f32, height: f32, t: Thresholds) -> Vec<Found> {
    (0..rows)
        .filter_map(|r| {
            let row = out.get(r * 6..r * 6 + 6)?;
            let (score, class) = (row[4], row[5]);
            let [cx, cy, w, h] = [row[0], row[1], row[2], row[3]];
            let xyxy = [(cx - w / 2.0) * width, (cy - h / 2.0) * height, (cx + w / 2.0) * width, (cy + h / 2.0) * height];
            let ok = score > t.score && class.is_finite() && class >= 0.0 && (class as usize) < nc && xyxy.iter().all(|v| v.is_finite());
            ok.then_some(Found { xyxy, class: class as usize, score, anchor: r })
        })
        .take(t.max_detections)
        .collect()
}

/// The detections of an end-to-end YOLO head `out` (`[Q, 6]`, row-major: `x0, y0, x1, y1, score, class` in input
/// pixels, rows already ranked by the graph's own TopK), as Ultralytics' predict keeps them: the rows whose score
/// is above the threshold, in order, at most `max_detections`; no NMS (the head is trained without duplicates),
/// so `t.iou` has no effect. A class outside `0..nc` (or not finite) drops the row.
pub fn yolo_end2end(out: &[f32], nc: usize, rows: usize, t: Thresholds) -> Vec<Found> {
    (0..rows)
        .filter_map(|r| {
            let row = out.get(r * 6..r * 6 + 6)?;
            let (score, class) = (row[4], row[5]);
            let keep = score > t.score && class.is_finite() && class >= 0.0 && (class.round() as usize) < nc;
            if !keep {
                return None;
            }
            Some(Found { xyxy: [row[0], row[1], row[2], row[3]], class: class.round() as usize, score, anchor: r })
        })
        .take(t.max_detections)
        .collect()
}

/// torchvision's `nms` on boxes already sorted by score: the indices kept, in order. A box is dropped when its IoU
/// with a kept one is above `iou` (float32, areas without +1).
pub fn nms(boxes: &[[f32; 4]], iou: f32) -> Vec<usize> {
    let area = |b: &[f32; 4]| (b[2] - b[0]) * (b[3] - b[1]);
    let areas: Vec<f32> = boxes.iter().map(area).collect();
    let mut suppressed = vec![false; boxes.len()];
    let mut keep = Vec::new();
    for i in 0..boxes.len() {
        if suppressed[i] {
            continue;
        }
        keep.push(i);
        let bi = boxes[i];
        for j in i + 1..boxes.len() {
            if suppressed[j] {
                continue;
            }
            let bj = boxes[j];
            let w = (bi[2].min(bj[2]) - bi[0].max(bj[0])).max(0.0);
            let h = (bi[3].min(bj[3]) - bi[1].max(bj[1])).max(0.0);
            let inter = w * h;
            let ovr = inter / (areas[i] + areas[j] - inter);
            if ovr > iou {
                suppressed[j] = true;
            }
        }
    }
    keep
}

/// Intersection over union of two `x0, y0, x1, y1` boxes; 1 for two equal boxes even when they are empty (a box
/// clipped to the image's edge can have no area), 0 for distinct empty ones.
pub fn iou(a: [f32; 4], b: [f32; 4]) -> f32 {
    if a == b {
        return 1.0;
    }
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = w * h;
    let union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter;
    if union > 0.0 { inter / union } else { 0.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_wise_nms_keeps_overlapping_boxes_of_other_classes() {
        // Three anchors, two classes: anchors 0 and 1 overlap (IoU 0.81) in class 0, anchor 2 overlaps them in class 1.
        let (nc, a) = (2, 3);
        let mut out = vec![0f32; (4 + nc) * a];
        let set = |out: &mut Vec<f32>, anchor: usize, b: [f32; 4], s: [f32; 2]| {
            for (r, v) in b.iter().chain(s.iter()).enumerate() {
                out[r * a + anchor] = *v;
            }
        };
        set(&mut out, 0, [50.0, 50.0, 20.0, 20.0], [0.9, 0.1]);
        set(&mut out, 1, [51.0, 51.0, 20.0, 20.0], [0.8, 0.1]);
        set(&mut out, 2, [50.0, 50.0, 20.0, 20.0], [0.1, 0.7]);
        let found = yolo_raw(&out, nc, a, Thresholds::default());
        assert_eq!(found.iter().map(|f| (f.anchor, f.class)).collect::<Vec<_>>(), [(0, 0), (2, 1)]);
        assert_eq!(found[0].xyxy, [40.0, 40.0, 60.0, 60.0]);
        let low = yolo_raw(&out, nc, a, Thresholds { iou: 0.9, ..Thresholds::default() });
        assert_eq!(low.len(), 3, "IoU 0.81 is under 0.9: all three stay");
        let one = yolo_raw(&out, nc, a, Thresholds { max_detections: 1, ..Thresholds::default() });
        assert_eq!(one.len(), 1);
        assert!(yolo_raw(&out, nc, a, Thresholds { score: 0.95, ..Thresholds::default() }).is_empty());
    }

    #[test]
    fn end_to_end_rows_kept_in_order_above_the_threshold() {
        let out = [
            10.0, 10.0, 20.0, 20.0, 0.9, 1.0, // kept
            10.0, 10.0, 20.0, 20.0, 0.8, 1.0, // kept: no NMS, even for an identical box
            0.0, 0.0, 5.0, 5.0, 0.7, 7.0, // class 7 of 2: dropped
            0.0, 0.0, 5.0, 5.0, 0.25, 0.0, // not above 0.25
            0.0, 0.0, 5.0, 5.0, 0.6, 0.0, // kept (rows need not be sorted)
        ];
        let found = yolo_end2end(&out, 2, 5, Thresholds::default());
        assert_eq!(found.iter().map(|f| (f.anchor, f.class)).collect::<Vec<_>>(), [(0, 1), (1, 1), (4, 0)]);
        assert_eq!(found[0].xyxy, [10.0, 10.0, 20.0, 20.0]);
        assert_eq!(yolo_end2end(&out, 2, 5, Thresholds { max_detections: 2, ..Thresholds::default() }).len(), 2);
        assert_eq!(yolo_end2end(&out, 8, 5, Thresholds::default()).len(), 4);
    }

    #[test]
    fn iou_of_boxes() {
        assert_eq!(iou([0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 3.0, 3.0]), 1.0 / 7.0);
        assert_eq!(iou([0.0, 0.0, 1.0, 1.0], [2.0, 2.0, 3.0, 3.0]), 0.0);
    }
}
