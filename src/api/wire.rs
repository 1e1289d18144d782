//! The JSON the API answers with (docs/DESIGN.md §5, openapi.yaml): what the pipeline returns and the routes
//! serialise.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::backend::engine::Device;
use crate::explain::maps;
use crate::methods::Method;

#[derive(Debug, Serialize)]
pub struct ExplainResponse {
    pub model: String,
    pub device: Device,
    pub image: ImageSize,
    pub predictions: Vec<Prediction>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub explanations: Option<Vec<Explanation>>,
    pub timings_ms: Timings,
    /// Every class's logit, for the Open Inference Protocol's `logits` and `probabilities` outputs (the v1 JSON
    /// answer carries the top classes only).
    #[serde(skip)]
    pub logits: Vec<f32>,
}

#[derive(Debug, Serialize, Clone, Copy)]
pub struct ImageSize {
    pub width: u32,
    pub height: u32,
}

#[derive(Debug, Serialize, Clone)]
pub struct Prediction {
    pub index: usize,
    pub label: Option<String>,
    pub score: f32,
    pub logit: f32,
}

#[derive(Debug, Serialize, Clone)]
pub struct TargetInfo {
    pub index: usize,
    pub label: Option<String>,
    pub score: f32,
}

#[derive(Debug, Serialize)]
pub struct Explanation {
    pub method: Method,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layer: Option<String>,
    pub target: TargetInfo,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heatmap_png: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub overlay_png: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mask_png: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw: Option<RawArray>,
    pub peak: maps::Point,
    pub bbox: Option<maps::BBox>,
    /// The faithfulness metrics asked for (`metrics=`), by name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics: Option<BTreeMap<&'static str, f64>>,
    /// The deletion and insertion curves (`outputs=curves`): the target's softmax score at each step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub curves: Option<BTreeMap<&'static str, Vec<f64>>>,
    /// SmoothGrad's noise seed: send it back as `seed` to reproduce the map.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Score-CAM's channels, when fewer than the layer's (`channels`, `server.scorecam_max_channels`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channels: Option<usize>,
}

#[derive(Debug, Serialize)]
pub struct RawArray {
    pub shape: Vec<usize>,
    pub dtype: &'static str,
    /// Little-endian float32 values, base64.
    pub data: String,
}

#[derive(Debug, Serialize, Default, Clone, Copy)]
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
