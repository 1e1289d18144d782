//! What the request pipeline returns: one typed, protocol-free [`Answer`]. The task's results are Rust values,
//! each explanation's map is an array, pictures are PNG bytes, timings are numbers. No serde, no base64: every
//! protocol (`api::v1`, `api::oip`, `api::kserve`, the CLI's `explain`) is an encoder of this value, and nothing is
//! decoded that the core encoded.
//!
//! Adding an output kind: a field here, filled in `explanations.rs`, plus each encoder's lines.

use crate::backend::engine::Device;
use crate::maths::maps::{BBox, Point};
use crate::methods::metrics::Score;
use crate::methods::{Method, Returned};

/// A request's answer.
#[derive(Debug, Clone)]
pub struct Answer {
    pub model: String,
    pub device: Device,
    /// The uploaded image's size.
    pub image: ImageSize,
    /// What the model says about the image, as its task decodes it.
    pub result: TaskResult,
    /// `None` for a predict request.
    pub explanations: Option<Vec<Explanation>>,
    pub timings: Timings,
}

impl Answer {
    /// The classification result, for a classifier.
    pub fn classification(&self) -> Option<&Classification> {
        match &self.result {
            TaskResult::Classification(c) => Some(c),
            TaskResult::Detection(_) | TaskResult::Segmentation(_) | TaskResult::Embedding(_) => None,
        }
    }

    /// The explanation of `method` (the first, when several targets were explained).
    pub fn explanation(&self, method: Method) -> Option<&Explanation> {
        self.explanations.as_ref()?.iter().find(|e| e.method == method)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageSize {
    pub width: u32,
    pub height: u32,
}

/// A task's result (core/task.rs decodes it from the model's outputs).
#[derive(Debug, Clone)]
pub enum TaskResult {
    Classification(Classification),
    /// A detector's detections, best first.
    Detection(Vec<Detection>),
    /// A segmenter's predicted label map.
    Segmentation(Segmentation),
    /// An embedder's vector, and its similarity to the reference when the request gave one.
    Embedding(Embedding),
}

/// An embedder's result for one image (the query).
#[derive(Debug, Clone, PartialEq)]
pub struct Embedding {
    /// The image's embedding, as the model outputs it.
    pub vector: Vec<f32>,
    /// Whether the answer carries the vector itself (predict, or `outputs=embedding`); its length is always there.
    pub send_vector: bool,
    /// The cosine similarity to the reference (the reference image's embedding, the mean direction of several, or
    /// the client's vector), when there is one.
    pub similarity: Option<f64>,
    /// Each reference image: its size and its own similarity to the query.
    pub references: Vec<ReferenceImage>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReferenceImage {
    pub size: ImageSize,
    pub similarity: f64,
}

/// A segmenter's result for one image.
#[derive(Debug, Clone, PartialEq)]
pub struct Segmentation {
    /// The classes of the predicted label map, largest first, with the fraction of the output's pixels each covers.
    pub classes: Vec<SegmentClass>,
    /// The predicted label map on the output's grid `[h, w]`, row-major: each pixel's class.
    pub grid: [usize; 2],
    pub label_map: Vec<u16>,
    /// The label map at the upload's size (nearest output pixel), as a palette PNG whose pixel values are the class
    /// indices (16-bit grey above 256 classes).
    pub mask_png: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SegmentClass {
    pub index: usize,
    pub label: Option<String>,
    pub fraction: f64,
}

/// One detection.
#[derive(Debug, Clone, PartialEq)]
pub struct Detection {
    /// Its rank among the image's detections (0 is the best): what `target` names.
    pub index: usize,
    pub class_index: usize,
    pub label: Option<String>,
    pub score: f32,
    /// `x0, y0, x1, y1` in the upload's pixels.
    pub xyxy: [f32; 4],
}

/// A classifier's result for one image.
#[derive(Debug, Clone)]
pub struct Classification {
    /// Every class's logit (the pre-softmax scores when a final Softmax was removed).
    pub logits: Vec<f32>,
    /// Their softmax, computed once per request.
    pub probabilities: Vec<f32>,
    /// The best classes, best first: max(5, top_k) of them.
    pub top: Vec<Prediction>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    pub index: usize,
    pub label: Option<String>,
    pub score: f32,
    pub logit: f32,
}

/// What an explanation explains.
#[derive(Debug, Clone, PartialEq)]
pub enum ExplainedTarget {
    /// A class, with its label and softmax score.
    Class { index: usize, label: Option<String>, score: f32 },
    /// A detection (its index in the answer's `detections`), with its label and score.
    Detection { index: usize, label: Option<String>, score: f32 },
    /// A segment: a class's logits summed over `pixels` output pixels, those predicted as the class (within
    /// `region`, `x, y, width, height` in upload pixels, when given; the whole region when none of them is).
    Segment { index: usize, label: Option<String>, pixels: usize, region: Option<[f64; 4]>, predicted: bool },
    /// An embedder's image and its cosine similarity to what it is compared with: the query (`reference: None`)
    /// against the reference, or reference image `reference` against the query.
    Similarity { reference: Option<usize>, similarity: f64 },
}

/// One (target, method) explanation.
#[derive(Debug, Clone)]
pub struct Explanation {
    pub method: Method,
    /// The layer it read (the CAM methods).
    pub layer: Option<String>,
    pub target: ExplainedTarget,
    /// The outputs asked for: the colour-mapped heatmap (or gradient image), the overlay, the grey mask, as PNG
    /// files.
    pub heatmap_png: Option<Vec<u8>>,
    pub overlay_png: Option<Vec<u8>>,
    pub mask_png: Option<Vec<u8>>,
    /// The raw map (`outputs=raw`), docs/DESIGN.md §5.
    pub raw: Option<RawArray>,
    pub peak: Point,
    pub bbox: Option<BBox>,
    /// The faithfulness metrics asked for, in request order; curves only with `outputs=curves`.
    pub scores: Vec<Score>,
    /// What the method returned besides its map (SmoothGrad's and D-RISE's seed, Score-CAM's channels).
    pub returned: Returned,
}

/// A float32 array, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct RawArray {
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// Where the request's time went, in milliseconds (rounded to 0.01).
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Timings {
    pub queue: f64,
    pub decode: f64,
    pub inference: f64,
    pub explain: f64,
    /// The faithfulness metrics' forward passes.
    pub metrics: f64,
    pub render: f64,
    pub total: f64,
}
