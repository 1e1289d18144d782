//! API v1's JSON (docs/DESIGN.md §5, openapi.yaml): the encoder of the core's [`Answer`]. PNG files and raw arrays
//! become base64 here, and nowhere else.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::Serialize;

use crate::backend::engine::Device;
use crate::core::answer::{Answer, Detection, Embedding, ExplainedTarget, Explanation, ImageSize, Prediction, RawArray, Segmentation, TaskResult, Timings};
use crate::maths::maps;
use crate::methods::Method;

/// The answer to `/v1/models/{model}/predict` and `/explain` (and one KServe v1 instance).
#[derive(Debug, Serialize)]
pub struct Response<'a> {
    pub model: &'a str,
    pub device: Device,
    pub image: Size,
    /// A classifier's best classes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub predictions: Option<Vec<PredictionJson<'a>>>,
    /// A detector's detections, best first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detections: Option<Vec<DetectionJson<'a>>>,
    /// A segmenter's label map.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub segmentation: Option<SegmentationJson<'a>>,
    /// An embedder's vector (its length always; the values on predict and with `outputs=embedding`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub embedding: Option<EmbeddingJson>,
    /// An embedder's cosine similarity to the reference.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub similarity: Option<f64>,
    /// An embedder's reference images: each one's size and similarity to the image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub references: Option<Vec<ReferenceJson>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub explanations: Option<Vec<ExplanationJson<'a>>>,
    pub timings_ms: TimingsJson,
}

#[derive(Debug, Serialize)]
pub struct Size {
    pub width: u32,
    pub height: u32,
}

#[derive(Debug, Serialize)]
pub struct PredictionJson<'a> {
    pub index: usize,
    pub label: Option<&'a str>,
    pub score: f32,
    pub logit: f32,
}

#[derive(Debug, Serialize)]
pub struct DetectionJson<'a> {
    pub index: usize,
    pub label: Option<&'a str>,
    pub class_index: usize,
    pub score: f32,
    #[serde(rename = "box")]
    pub bbox: BoxJson,
}

#[derive(Debug, Serialize)]
pub struct SegmentationJson<'a> {
    /// The classes of the predicted label map, largest first.
    pub classes: Vec<SegmentClassJson<'a>>,
    /// The label map at the upload's size: a palette PNG whose pixel values are the class indices, base64.
    pub mask_png: String,
    /// The model's output grid, `[height, width]`, on which the fractions are counted.
    pub grid: [usize; 2],
}

#[derive(Debug, Serialize)]
pub struct EmbeddingJson {
    pub dim: usize,
    /// Its L2 norm.
    pub norm: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dtype: Option<&'static str>,
    /// Little-endian float32 values, base64.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ReferenceJson {
    pub index: usize,
    pub image: Size,
    pub similarity: f64,
}

#[derive(Debug, Serialize)]
pub struct SegmentClassJson<'a> {
    pub index: usize,
    pub label: Option<&'a str>,
    /// The fraction of the output's pixels predicted as this class.
    pub fraction: f64,
}

/// A box in upload pixels.
#[derive(Debug, Serialize)]
pub struct BoxJson {
    pub x: f32,
    pub y: f32,
    pub width: f32,
    pub height: f32,
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum TargetJson<'a> {
    Class { index: usize, label: Option<&'a str>, score: f32 },
    Detection { detection: usize, label: Option<&'a str>, score: f32 },
    /// A class's logits summed over `pixels` output pixels: those predicted as the class (within `region`), or the
    /// whole region when none of them is (`predicted` false).
    Segment {
        index: usize,
        label: Option<&'a str>,
        pixels: usize,
        #[serde(skip_serializing_if = "Option::is_none")]
        region: Option<BoxJson>,
        predicted: bool,
    },
    /// An embedder's image (`query`, or reference image `reference`) and its similarity to what it is compared
    /// with.
    Similarity {
        image: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        reference: Option<usize>,
        similarity: f64,
    },
}

#[derive(Debug, Serialize)]
pub struct ExplanationJson<'a> {
    pub method: Method,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layer: Option<&'a str>,
    pub target: TargetJson<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heatmap_png: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub overlay_png: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mask_png: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw: Option<RawJson>,
    pub peak: maps::Point,
    pub bbox: Option<maps::BBox>,
    /// The faithfulness metrics asked for (`metrics=`), by name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics: Option<BTreeMap<&'static str, f64>>,
    /// The deletion and insertion curves (`outputs=curves`): the target's softmax score at each step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub curves: Option<BTreeMap<&'static str, &'a [f64]>>,
    /// SmoothGrad's noise seed: send it back as `seed` to reproduce the map.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Score-CAM's channels.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channels: Option<usize>,
}

#[derive(Debug, Serialize)]
pub struct RawJson {
    pub shape: Vec<usize>,
    pub dtype: &'static str,
    /// Little-endian float32 values, base64.
    pub data: String,
}

#[derive(Debug, Serialize)]
pub struct TimingsJson {
    pub queue: f64,
    pub decode: f64,
    pub inference: f64,
    pub explain: f64,
    /// The faithfulness metrics' forward passes.
    pub metrics: f64,
    pub render: f64,
    pub total: f64,
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn size(s: ImageSize) -> Size {
    Size { width: s.width, height: s.height }
}

fn prediction(p: &Prediction) -> PredictionJson<'_> {
    PredictionJson { index: p.index, label: p.label.as_deref(), score: p.score, logit: p.logit }
}

fn target(t: &ExplainedTarget) -> TargetJson<'_> {
    match t {
        ExplainedTarget::Class { index, label, score } => TargetJson::Class { index: *index, label: label.as_deref(), score: *score },
        ExplainedTarget::Detection { index, label, score } => TargetJson::Detection { detection: *index, label: label.as_deref(), score: *score },
        ExplainedTarget::Segment { index, label, pixels, region, predicted } => TargetJson::Segment {
            index: *index,
            label: label.as_deref(),
            pixels: *pixels,
            region: region.map(|[x, y, w, h]| BoxJson { x: x as f32, y: y as f32, width: w as f32, height: h as f32 }),
            predicted: *predicted,
        },
        ExplainedTarget::Similarity { reference, similarity } => {
            TargetJson::Similarity { image: if reference.is_some() { "reference" } else { "query" }, reference: *reference, similarity: *similarity }
        }
    }
}

fn detection(d: &Detection) -> DetectionJson<'_> {
    let [x0, y0, x1, y1] = d.xyxy;
    DetectionJson {
        index: d.index,
        label: d.label.as_deref(),
        class_index: d.class_index,
        score: d.score,
        bbox: BoxJson { x: x0, y: y0, width: x1 - x0, height: y1 - y0 },
    }
}

fn segmentation_json(s: &Segmentation) -> SegmentationJson<'_> {
    SegmentationJson {
        classes: s.classes.iter().map(|c| SegmentClassJson { index: c.index, label: c.label.as_deref(), fraction: c.fraction }).collect(),
        mask_png: b64(&s.mask_png),
        grid: s.grid,
    }
}

fn le_f32(values: &[f32]) -> String {
    let mut bytes = Vec::with_capacity(values.len() * 4);
    for v in values {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    b64(&bytes)
}

fn raw(r: &RawArray) -> RawJson {
    RawJson { shape: r.shape.clone(), dtype: "float32", data: le_f32(&r.values) }
}

fn embedding(e: &Embedding) -> EmbeddingJson {
    EmbeddingJson {
        dim: e.vector.len(),
        norm: e.vector.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt(),
        dtype: e.send_vector.then_some("float32"),
        data: e.send_vector.then(|| le_f32(&e.vector)),
    }
}

fn explanation(e: &Explanation) -> ExplanationJson<'_> {
    let metrics = (!e.scores.is_empty()).then(|| e.scores.iter().map(|s| (s.metric.as_str(), s.value)).collect());
    let curves = e
        .scores
        .iter()
        .any(|s| s.curve.is_some())
        .then(|| e.scores.iter().filter_map(|s| Some((s.metric.as_str(), s.curve.as_deref()?))).collect());
    ExplanationJson {
        method: e.method,
        layer: e.layer.as_deref(),
        target: target(&e.target),
        heatmap_png: e.heatmap_png.as_deref().map(b64),
        overlay_png: e.overlay_png.as_deref().map(b64),
        mask_png: e.mask_png.as_deref().map(b64),
        raw: e.raw.as_ref().map(raw),
        peak: e.peak,
        bbox: e.bbox,
        metrics,
        curves,
        seed: e.returned.seed,
        channels: e.returned.channels,
    }
}

pub fn timings(t: &Timings) -> TimingsJson {
    TimingsJson { queue: t.queue, decode: t.decode, inference: t.inference, explain: t.explain, metrics: t.metrics, render: t.render, total: t.total }
}

/// The v1 JSON of an answer.
pub fn encode(a: &Answer) -> Response<'_> {
    let (mut predictions, mut detections, mut segmentation, mut embedded) = (None, None, None, None);
    match &a.result {
        TaskResult::Classification(c) => predictions = Some(c.top.iter().map(prediction).collect()),
        TaskResult::Detection(d) => detections = Some(d.iter().map(detection).collect()),
        TaskResult::Segmentation(s) => segmentation = Some(segmentation_json(s)),
        TaskResult::Embedding(e) => embedded = Some(e),
    }
    Response {
        model: &a.model,
        device: a.device,
        image: size(a.image),
        predictions,
        detections,
        segmentation,
        embedding: embedded.map(embedding),
        similarity: embedded.and_then(|e| e.similarity),
        references: embedded.filter(|e| !e.references.is_empty()).map(|e| {
            e.references.iter().enumerate().map(|(index, r)| ReferenceJson { index, image: size(r.size), similarity: r.similarity }).collect()
        }),
        explanations: a.explanations.as_ref().map(|list| list.iter().map(explanation).collect()),
        timings_ms: timings(&a.timings),
    }
}
