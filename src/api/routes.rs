//! Route handlers: short, reading like the API description.

use axum::extract::{Path, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use super::error::ApiError;
use super::{upload, v1, AppState};
use crate::backend::engine::{Device, ModelInfo, ModelKind};
use crate::core::pipeline::{Endpoint, ModelHandle};
use crate::core::task::Task;
use crate::methods::metrics::Metric;
use crate::methods::Method;

const OPENAPI: &str = include_str!("../../openapi.yaml");
const PAGE: &str = include_str!("page.html");

pub async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

pub async fn readyz(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    // Both 503s carry Retry-After (docs/OPERATIONS.md): a prober or client that honours it comes back after the
    // drain delay's order of magnitude instead of hammering.
    let unavailable = |kind, detail| ApiError { retry_after: Some(1), ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, kind, detail) };
    if state.service.is_draining() {
        return Err(unavailable("draining", "the server is shutting down"));
    }
    if !state.service.is_ready() {
        return Err(unavailable("not-ready", "the models are still loading"));
    }
    Ok(Json(serde_json::json!({"status": "ready"})))
}

pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    if let Ok(models) = state.service.models() {
        for (name, m) in models {
            metrics::gauge!("camserve_queue_depth_rows", "model" => name.clone()).set(m.queue.depth() as f64);
        }
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render())
}

pub async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/yaml")], OPENAPI)
}

pub async fn page() -> Html<&'static str> {
    Html(PAGE)
}

/// Example pictures for the demo page, embedded in the binary.
const EXAMPLES: [(&str, &[u8]); 4] = [
    ("chelsea.jpg", include_bytes!("../../assets/photos/chelsea.jpg")),
    ("coffee.jpg", include_bytes!("../../assets/photos/coffee.jpg")),
    ("astronaut.jpg", include_bytes!("../../assets/photos/astronaut.jpg")),
    ("shapes.jpg", include_bytes!("../../assets/photos/shapes.jpg")),
];

pub async fn example(Path(name): Path<String>) -> Result<impl IntoResponse, ApiError> {
    let (_, bytes) = EXAMPLES.iter().find(|(n, _)| *n == name).ok_or_else(|| ApiError::not_found(format!("no example `{name}`")))?;
    Ok(([(header::CONTENT_TYPE, "image/jpeg"), (header::CACHE_CONTROL, "public, max-age=86400")], *bytes))
}

pub async fn not_found(req: Request) -> ApiError {
    ApiError::not_found(format!("no route for {} {}", req.method(), req.uri().path()))
}

/// A known path with the wrong method: 405 problem+json (axum adds the `Allow` header).
pub async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        format!("{} is not allowed on {} (see the Allow header)", req.method(), req.uri().path()),
    )
}

#[derive(Serialize)]
pub struct LayerView {
    name: String,
    /// `[C, h, w]` on the spatial grid.
    shape: [i64; 3],
    /// How the tensor maps to the grid: `nchw`, `nhwc` or `tokens`.
    layout: &'static str,
    /// Leading tokens not on the grid (class, distillation, register tokens); token layers only.
    #[serde(skip_serializing_if = "Option::is_none")]
    prefix_tokens: Option<usize>,
    /// The PyTorch module that produced it, where the exporter recorded it; usable as the `layer` option.
    #[serde(skip_serializing_if = "Option::is_none")]
    module: Option<String>,
}

#[derive(Serialize)]
pub struct DetectionView {
    format: &'static str,
    classes: usize,
    score_threshold: f32,
    iou_threshold: f32,
    max_detections: usize,
}

#[derive(Serialize)]
pub struct SegmentationView {
    classes: usize,
    /// The output's grid `[height, width]`.
    grid: [usize; 2],
    /// The class that is never a default target, if the labels name one.
    background: Option<usize>,
    /// Class names, when a labels file gives them (the page's legend).
    labels: Option<Vec<String>>,
}

#[derive(Serialize)]
pub struct EmbeddingView {
    dim: usize,
    normalised: bool,
    max_references: usize,
}

#[derive(Debug, Serialize)]
pub struct MultiLabelView {
    /// The sigmoid score a class needs to be explained by default.
    score_threshold: f32,
    /// Whether the model ends in its Sigmoid (explanations then differentiate the scores; otherwise the logits).
    sigmoid_in_graph: bool,
}

#[derive(Serialize)]
pub struct ModelView {
    name: String,
    /// What the model's outputs are: `classification`, `detection` or `segmentation` (core/task.rs).
    task: &'static str,
    /// A detector's output format, class count and thresholds.
    #[serde(skip_serializing_if = "Option::is_none")]
    detection: Option<DetectionView>,
    /// A segmenter's classes and output grid.
    #[serde(skip_serializing_if = "Option::is_none")]
    segmentation: Option<SegmentationView>,
    /// A multi-label classifier's default threshold and where its sigmoid is.
    #[serde(skip_serializing_if = "Option::is_none")]
    multilabel: Option<MultiLabelView>,
    /// An embedder's vector length, whether the model normalises it, and how many reference images a request
    /// may give.
    #[serde(skip_serializing_if = "Option::is_none")]
    embedding: Option<EmbeddingView>,
    kind: ModelKind,
    device: Device,
    /// `[C, H, W]`
    input_shape: [usize; 3],
    classes: usize,
    labels: bool,
    default_layer: String,
    layers: Vec<LayerView>,
    methods: Vec<Method>,
    /// What a request without `methods` gets for this model's task (Grad-CAM and guided Grad-CAM for a
    /// classifier, HiResCAM for a detector).
    default_methods: Vec<Method>,
    /// Why each method the model does not offer is not available at the default layer.
    unavailable: std::collections::BTreeMap<&'static str, String>,
    /// Each offered method's cost in forward-equivalents for one target at the default layer and options
    /// (what `server.max_forward_passes` limits; docs/METHODS.md).
    costs: std::collections::BTreeMap<&'static str, u64>,
    /// Each offered method's estimated seconds for one target at the default layer and options, at the model's speed
    /// as measured (since warm-up) on this server; a method is missing until its kind of pass has been measured.
    estimates: std::collections::BTreeMap<&'static str, f64>,
    /// What each metric adds per explanation.
    metric_costs: std::collections::BTreeMap<&'static str, u64>,
    /// The image input's layout in the model file (`nchw` or `nhwc`); camserve feeds NCHW either way.
    input_layout: crate::onnx::rewrite::InputLayout,
    /// What the logits and the explanations are computed on: `logits`, or `pre-softmax` when the model ended
    /// in a Softmax or LogSoftmax that camserve removed.
    scores: &'static str,
    /// How an upload is brought to the input size; the page crops its own copy of the picture the same way.
    resize: crate::preprocess::ResizePolicy,
    #[serde(skip_serializing_if = "Option::is_none")]
    resize_shorter_side: Option<u32>,
    /// The most rows one run of the model takes: 1 for a file whose batch is fixed at 1 (each batch then runs
    /// one row at a time), else the batcher's `max_batch`.
    max_batch: usize,
}

fn model_view(handle: &ModelHandle, limits: crate::core::options::OptionLimits) -> ModelView {
    let info = &*handle.info;
    let methods: Vec<Method> = methods_for(info).into_iter().filter(|&m| handle.task.refuses(m).is_none()).collect();
    let defaults = crate::core::options::default_params(info, &info.default_layer, limits);
    ModelView {
        unavailable: Method::ALL.iter().filter_map(|&m| Some((m.as_str(), handle.task.refuses(m).or_else(|| m.refusal(info, Some(&info.default_layer)).map(|r| r.reason().to_string()))?))).collect(),
        default_methods: handle.task.default_methods(),
        costs: methods.iter().filter_map(|&m| Some((m.as_str(), crate::methods::default_cost(m, info, &defaults)?))).collect(),
        estimates: methods
            .iter()
            .filter_map(|&m| Some((m.as_str(), (crate::methods::default_seconds(m, info, handle.queue.times(), &defaults)? * 1e4).round() / 1e4)))
            .collect(),
        metric_costs: Metric::ALL.iter().map(|&m| (m.as_str(), m.cost(info))).collect(),
        name: info.name.clone(),
        task: handle.task.as_str(),
        segmentation: match &handle.task {
            Task::Segmentation(s) => Some(SegmentationView { classes: s.classes, grid: s.grid, background: s.background, labels: s.labels.clone() }),
            _ => None,
        },
        multilabel: match &handle.task {
            Task::MultiLabel(m) => Some(MultiLabelView { score_threshold: m.threshold, sigmoid_in_graph: m.sigmoid_in_graph }),
            _ => None,
        },
        embedding: match &handle.task {
            Task::Embedding(e) => Some(EmbeddingView { dim: e.dim, normalised: e.normalised, max_references: crate::core::pipeline::MAX_REFERENCES }),
            _ => None,
        },
        detection: match &handle.task {
            Task::Classification | Task::Segmentation(_) | Task::MultiLabel(_) | Task::Embedding(_) => None,
            Task::Detection(d) => Some(DetectionView {
                format: d.format.as_str(),
                classes: d.format.classes(),
                score_threshold: d.thresholds.score,
                iou_threshold: d.thresholds.iou,
                max_detections: d.thresholds.max_detections,
            }),
        },
        kind: info.kind,
        device: info.device,
        input_shape: info.input_shape,
        classes: match &handle.task {
            Task::Classification | Task::MultiLabel(_) => info.num_classes,
            Task::Detection(d) => d.format.classes(),
            Task::Segmentation(s) => s.classes,
            Task::Embedding(_) => 0,
        },
        labels: info.labels.is_some(),
        default_layer: info.default_layer.clone(),
        layers: info
            .layers
            .iter()
            .map(|l| LayerView {
                name: l.name.clone(),
                shape: [l.dims[1], l.dims[2], l.dims[3]],
                layout: l.layout.as_str(),
                prefix_tokens: match l.layout {
                    crate::onnx::rewrite::LayerLayout::Tokens { prefix } => Some(prefix),
                    _ => None,
                },
                module: l.module.clone(),
            })
            .collect(),
        input_layout: info.input_layout,
        resize: info.pixels.resize,
        resize_shorter_side: (info.pixels.resize == crate::preprocess::ResizePolicy::ShorterSideThenCenterCrop)
            .then(|| info.pixels.shorter_side(info.input_shape[2] as u32, info.input_shape[1] as u32)),
        scores: if info.stripped_output_op.is_some() { "pre-softmax" } else { "logits" },
        max_batch: if info.batch_fixed { 1 } else { handle.max_batch },
        methods,
    }
}

/// The methods a model offers at its default layer: those whose registry entry finds its input-gradient rules,
/// attention blocks and own condition there (`Method::unavailable`).
pub fn methods_for(info: &ModelInfo) -> Vec<Method> {
    Method::ALL.into_iter().filter(|m| m.refusal(info, Some(&info.default_layer)).is_none()).collect()
}

pub async fn list_models(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let mut handles: Vec<_> = state.service.models()?.values().collect();
    handles.sort_by_key(|m| m.position);
    let limits = state.service.limits.options;
    let models: Vec<ModelView> = handles.into_iter().map(|m| model_view(m, limits)).collect();
    // Every method camserve has, from the registry, with its kind, how its heatmap shows and whether a request
    // without `methods` gets it; each model lists the ones it offers.
    let methods: Vec<_> = Method::ALL
        .iter()
        .map(|m| serde_json::json!({ "name": m, "kind": m.kind.as_str(), "heatmap": m.heatmap.as_str(), "default": Method::DEFAULT.contains(m) }))
        .collect();
    Ok(Json(serde_json::json!({ "models": models, "methods": methods })))
}

pub async fn get_model(State(state): State<AppState>, Path(model): Path<String>) -> Result<Json<ModelView>, ApiError> {
    Ok(Json(model_view(state.service.model(&model)?, state.service.limits.options)))
}

async fn run(state: AppState, model: String, endpoint: Endpoint, req: Request) -> Result<Response, ApiError> {
    // Unknown model or not ready: answer before reading the body.
    state.service.model(&model)?;
    let up = tokio::time::timeout(state.body_timeout, upload::parse(req, state.body_limit))
        .await
        .map_err(|_| upload::body_timeout(state.body_timeout))??;
    let answer = state.service.handle_input(&model, endpoint, crate::core::pipeline::ImageInput::Encoded(up.image), up.references, up.options).await?;
    let mut res = Json(v1::encode(&answer)).into_response();
    // For the request log line.
    res.extensions_mut().insert(answer.timings);
    Ok(res)
}

pub async fn predict(State(state): State<AppState>, Path(model): Path<String>, req: Request) -> Result<Response, ApiError> {
    if super::jobs::wants_async(&req)? {
        return Err(ApiError::bad_request("asynchronous jobs (`async=true`, `Prefer: respond-async`) are for explain requests; a prediction is one forward pass"));
    }
    run(state, model, Endpoint::Predict, req).await
}

pub async fn explain(State(state): State<AppState>, Path(model): Path<String>, req: Request) -> Result<Response, ApiError> {
    if super::jobs::wants_async(&req)? {
        state.service.model(&model)?;
        return super::jobs::submit(state, model, req).await;
    }
    run(state, model, Endpoint::Explain, req).await
}

