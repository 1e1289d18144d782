//! The Open Inference Protocol ("v2": KServe, Triton and their clients) on the same models, API keys, limits,
//! batcher and metrics as /v1. README "Open Inference Protocol" and openapi.yaml describe it; in short:
//!
//! - inputs: either `image` (`BYTES`, shape `[N]`: encoded image files, decoded and preprocessed as /v1 does),
//!   or the model's own input tensor by name (`FP32`, `[N, C, H, W]`, already preprocessed);
//! - request `parameters`: the /v1 options (`methods`, `target`, `layer`, `colormap`, `alpha`, ...), validated the
//!   same way; `target` is one class for every image or a list of one class per image; `top_k` is the number of
//!   classes in the `top_k` output (default 5), each image's explanations are of its one target (default: its
//!   top class);
//! - outputs: `logits` and `probabilities` (`FP32 [N, K]`), `top_k` (`BYTES [N, k]`, `"<score>:<index>:<label>"`
//!   as Triton's classification extension writes them), per method `<method>` (its raw map, `FP32`) and
//!   `<method>_heatmap_png` / `<method>_overlay_png` (`BYTES [N]`). Only requested outputs are computed and sent
//!   (with `outputs`, the methods are the ones they name); with no `outputs`, the three class outputs and the raw
//!   map of each method in `methods`;
//! - Triton's binary tensor extension both ways (`Inference-Header-Content-Length`, `binary_data_size`,
//!   `binary_data`, `binary_data_output`), and its classification extension (`classification: k` on `logits` or
//!   `probabilities`). JSON tensors work too; a `BYTES` image in JSON is its file in base64.
//! - errors: `{"error": "..."}` with the status /v1 gives the same failure.
//!
//! Like every protocol, an encoder of the core's typed `Answer`: raw maps are written from their arrays and
//! pictures from their PNG bytes, nothing decoded back.

use std::time::Duration;

use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::oip_tensors::{fp32_values, images_from_bytes, images_from_fp32, respond, split_body, Data, InferRequest, InputTensor, RequestedOutput, Tensor};
use super::AppState;
use crate::backend::engine::{ranked, ModelInfo};
use crate::core::answer::{Answer, Classification, Detection, Embedding, Explanation, RawArray, Segmentation, TaskResult};
use crate::core::task::Task;
use crate::core::options::RawOptions;
use crate::core::pipeline::{Endpoint, ImageInput, Reference, MAX_REFERENCES};
use crate::error::ServiceError;
use crate::methods::{Kind, Method};

/// Triton's binary tensor extension: the length of the JSON part of a body that binary tensors follow.
pub const HEADER_LENGTH: &str = "inference-header-content-length";
/// The encoded-image input.
pub const IMAGE_INPUT: &str = "image";
/// An embedder's reference images: `BYTES [R]` encoded files, or `FP32 [R, C, H, W]` preprocessed tensors.
pub const REFERENCE_INPUT: &str = "reference";
/// An embedder's reference vector, `FP32 [D]` (or `[1, D]`).
pub const REFERENCE_VECTOR_INPUT: &str = "reference_vector";
/// The most images one infer request may carry (each is one row of the model's batcher).
pub const MAX_IMAGES: usize = 64;
/// The only model version: camserve serves one file per model name.
pub const VERSION: &str = "1";
/// Request-level parameters that belong to the protocol, not to the /v1 options.
const PROTOCOL_PARAMETERS: [&str; 1] = ["binary_data_output"];

/// An error in the protocol's form, `{"error": "..."}`, with /v1's status (and `Retry-After`) for the failure.
#[derive(Debug)]
pub struct OipError(pub ApiError);

impl From<ApiError> for OipError {
    fn from(e: ApiError) -> Self {
        OipError(e)
    }
}

impl From<ServiceError> for OipError {
    fn from(e: ServiceError) -> Self {
        OipError(e.into())
    }
}

pub(super) fn bad(detail: impl Into<String>) -> OipError {
    OipError(ApiError::bad_request(detail))
}

impl IntoResponse for OipError {
    fn into_response(self) -> Response {
        let e = self.0;
        if e.status.is_server_error() {
            tracing::error!(status = e.status.as_u16(), kind = e.kind, detail = %e.detail, "request failed");
        }
        metrics::counter!("camserve_errors_total", "kind" => e.kind).increment(1);
        let mut res = (e.status, Json(json!({ "error": e.detail }))).into_response();
        if let Some(s) = e.retry_after {
            res.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        res
    }
}

// ------------------------------------------------------------------------------------------ health, metadata

pub async fn server_metadata() -> Json<Value> {
    Json(json!({
        "name": "camserve",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["binary_tensor_data", "classification", "parameters"],
    }))
}

pub async fn live() -> Json<Value> {
    Json(json!({ "live": true }))
}

pub async fn ready(State(state): State<AppState>) -> Response {
    if state.service.is_ready() {
        Json(json!({ "ready": true })).into_response()
    } else {
        let mut res = (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "ready": false }))).into_response();
        res.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(if state.service.is_draining() { 1u64 } else { 5 }));
        res
    }
}

fn check_version(model: &str, version: Option<&str>) -> Result<(), OipError> {
    match version {
        None | Some(VERSION) => Ok(()),
        Some(v) => Err(OipError(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown-model",
            format!("model `{model}` has no version `{v}` (camserve serves version {VERSION} of each model)"),
        ))),
    }
}

/// `/v2/models/{m}` and `/v2/models/{m}/versions/{v}`: the path's model and version.
#[derive(Deserialize)]
pub struct ModelPath {
    model: String,
    version: Option<String>,
}

pub async fn model_ready(State(state): State<AppState>, Path(p): Path<ModelPath>) -> Result<Json<Value>, OipError> {
    check_version(&p.model, p.version.as_deref())?;
    state.service.model(&p.model)?;
    Ok(Json(json!({ "name": p.model, "ready": state.service.is_ready() })))
}

fn tensor_meta(name: &str, datatype: &str, shape: &[i64]) -> Value {
    json!({ "name": name, "datatype": datatype, "shape": shape })
}

/// The model's inputs and outputs. Map sizes that depend on the request (the layer) are -1.
pub fn model_metadata_value(info: &ModelInfo, task: &Task) -> Value {
    let [c, h, w] = info.input_shape.map(|d| d as i64);
    let k = info.num_classes as i64;
    let methods: Vec<Method> = super::routes::methods_for(info).into_iter().filter(|&m| task.refuses(m).is_none()).collect();
    let mut outputs = match task {
        Task::Classification | Task::MultiLabel(_) => vec![
            tensor_meta("logits", "FP32", &[-1, k]),
            tensor_meta("probabilities", "FP32", &[-1, k]),
            tensor_meta("top_k", "BYTES", &[-1, -1]),
        ],
        Task::Detection(_) => vec![
            tensor_meta("num_detections", "INT64", &[-1]),
            tensor_meta("boxes", "FP32", &[-1, -1, 4]),
            tensor_meta("scores", "FP32", &[-1, -1]),
            tensor_meta("classes", "INT64", &[-1, -1]),
        ],
        Task::Segmentation(seg) => vec![
            tensor_meta("label_map", "INT64", &[-1, seg.grid[0] as i64, seg.grid[1] as i64]),
            tensor_meta("mask_png", "BYTES", &[-1]),
        ],
        Task::Embedding(e) => vec![tensor_meta("embedding", "FP32", &[-1, e.dim as i64]), tensor_meta("similarity", "FP32", &[-1])],
    };
    let mut inputs = vec![tensor_meta(IMAGE_INPUT, "BYTES", &[-1]), tensor_meta(&info.input_name, "FP32", &[-1, c, h, w])];
    if let Task::Embedding(e) = task {
        inputs.push(tensor_meta(REFERENCE_INPUT, "BYTES", &[-1]));
        inputs.push(tensor_meta(REFERENCE_VECTOR_INPUT, "FP32", &[e.dim as i64]));
    }
    for m in &methods {
        let shape: &[i64] = if m.kind == Kind::Gradient { &[-1, c, h, w] } else { &[-1, -1, -1] };
        outputs.push(tensor_meta(m.as_str(), "FP32", shape));
        outputs.push(tensor_meta(&format!("{m}_heatmap_png"), "BYTES", &[-1]));
        outputs.push(tensor_meta(&format!("{m}_overlay_png"), "BYTES", &[-1]));
    }
    json!({
        "name": info.name,
        "versions": [VERSION],
        "platform": "camserve",
        "inputs": inputs,
        "outputs": outputs,
        "parameters": {
            "device": info.device.to_string(),
            "methods": methods.iter().map(|m| m.as_str()).collect::<Vec<_>>(),
            "default_layer": info.default_layer,
        },
    })
}

pub async fn model_metadata(State(state): State<AppState>, Path(p): Path<ModelPath>) -> Result<Json<Value>, OipError> {
    check_version(&p.model, p.version.as_deref())?;
    let handle = state.service.model(&p.model)?;
    Ok(Json(model_metadata_value(&handle.info, &handle.task)))
}


#[derive(Debug, Clone, PartialEq)]
enum Output {
    Logits { classification: Option<usize> },
    Probabilities { classification: Option<usize> },
    TopK,
    /// A detector's: `[N]` how many detections each image has; `[N, D, 4]` their boxes (`x0, y0, x1, y1` in the
    /// upload's pixels), `[N, D]` scores and class indices, best first, D the most any image has (the rest of a
    /// row is zeros, class -1).
    NumDetections,
    Boxes,
    Scores,
    Classes,
    /// A segmenter's: `[N, h, w]` the predicted label map on the output grid; `[N]` it at the upload's size as a
    /// palette PNG whose pixel values are the class indices.
    LabelMap,
    MaskPng,
    /// An embedder's: `[N, D]` each image's embedding; `[N]` its cosine similarity to the reference.
    Embedding,
    Similarity,
    Raw(Method),
    HeatmapPng(Method),
    OverlayPng(Method),
}

fn parse_output(o: &RequestedOutput) -> Result<Output, OipError> {
    let classification = match o.parameters.get("classification") {
        None => None,
        Some(v) => Some(v.as_u64().filter(|&k| k >= 1).ok_or_else(|| bad(format!("output `{}`: classification must be a count of classes", o.name)))? as usize),
    };
    let method = |s: &str| Method::parse(s).ok_or_else(|| bad(format!("unknown output `{}`: GET /v2/models/{{model}} lists the outputs", o.name)));
    let out = match o.name.as_str() {
        "logits" => Output::Logits { classification },
        "probabilities" => Output::Probabilities { classification },
        "top_k" => Output::TopK,
        "num_detections" => Output::NumDetections,
        "boxes" => Output::Boxes,
        "scores" => Output::Scores,
        "classes" => Output::Classes,
        "label_map" => Output::LabelMap,
        "mask_png" => Output::MaskPng,
        "embedding" => Output::Embedding,
        "similarity" => Output::Similarity,
        name => match (name.strip_suffix("_heatmap_png"), name.strip_suffix("_overlay_png")) {
            (Some(m), _) => Output::HeatmapPng(method(m)?),
            (_, Some(m)) => Output::OverlayPng(method(m)?),
            _ => Output::Raw(method(name)?),
        },
    };
    if classification.is_some() && !matches!(out, Output::Logits { .. } | Output::Probabilities { .. }) {
        return Err(bad(format!("output `{}`: classification applies to `logits` and `probabilities` only", o.name)));
    }
    Ok(out)
}

fn truthy(v: Option<&Value>, what: &str) -> Result<bool, OipError> {
    match v {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(bad(format!("{what} must be true or false"))),
    }
}


// ------------------------------------------------------------------------------------------ infer: response

/// Triton's classification strings for the `k` largest `values`: `"<value>:<index>"`, `":<label>"` appended when
/// the model has labels.
fn classification(info: &ModelInfo, values: &[f32], k: usize) -> Vec<String> {
    ranked(values.iter().copied())
        .into_iter()
        .take(k.min(values.len()))
        .map(|i| match info.label(i) {
            Some(l) => format!("{:.6}:{i}:{l}", values[i]),
            None => format!("{:.6}:{i}", values[i]),
        })
        .collect()
}

fn internal(detail: String) -> OipError {
    OipError(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", detail))
}

/// The explanation of `method` in one image's answer.
fn explanation(a: &Answer, m: Method) -> Result<&Explanation, OipError> {
    a.explanation(m).ok_or_else(|| internal(format!("the {m} explanation is missing. This is a bug.")))
}

fn build_output(out: &Output, name: &str, info: &ModelInfo, answers: &[Answer], top_k: usize) -> Result<Tensor, OipError> {
    let n = answers.len();
    let k = info.num_classes;
    let tensor = |shape: Vec<usize>, data: Data| Tensor { name: name.to_string(), shape, data, binary: false };
    // `plan` refuses a classifier's outputs for a detector and a detector's for a classifier.
    let classes: Vec<&Classification> = answers.iter().filter_map(|a| a.classification()).collect();
    if classes.len() != n && matches!(out, Output::Logits { .. } | Output::Probabilities { .. } | Output::TopK) {
        return Err(internal("a classifier's result is missing. This is a bug.".into()));
    }
    let detections: Vec<&[Detection]> = answers
        .iter()
        .filter_map(|a| match &a.result {
            TaskResult::Detection(d) => Some(d.as_slice()),
            TaskResult::Classification(_) | TaskResult::Segmentation(_) | TaskResult::Embedding(_) => None,
        })
        .collect();
    let embeddings: Vec<&Embedding> = answers
        .iter()
        .filter_map(|a| match &a.result {
            TaskResult::Embedding(e) => Some(e),
            _ => None,
        })
        .collect();
    if embeddings.len() != n && matches!(out, Output::Embedding | Output::Similarity) {
        return Err(internal("an embedder's result is missing. This is a bug.".into()));
    }
    let segmentations: Vec<&Segmentation> = answers
        .iter()
        .filter_map(|a| match &a.result {
            TaskResult::Segmentation(s) => Some(s),
            _ => None,
        })
        .collect();
    if segmentations.len() != n && matches!(out, Output::LabelMap | Output::MaskPng) {
        return Err(internal("a segmenter's result is missing. This is a bug.".into()));
    }
    if detections.len() != n && matches!(out, Output::NumDetections | Output::Boxes | Output::Scores | Output::Classes) {
        return Err(internal("a detector's result is missing. This is a bug.".into()));
    }
    let most = detections.iter().map(|d| d.len()).max().unwrap_or(0);
    let padded = |width: usize, fill: &dyn Fn(&Detection) -> Vec<f32>, pad: f32| -> Vec<f32> {
        detections.iter().flat_map(|d| (0..most).flat_map(move |i| d.get(i).map_or(vec![pad; width], fill))).collect()
    };
    let class_output = |probs: bool, count: Option<usize>| {
        let rows: Vec<&[f32]> = classes.iter().map(|c| if probs { c.probabilities.as_slice() } else { c.logits.as_slice() }).collect();
        match count {
            Some(c) => {
                let strings: Vec<String> = rows.iter().flat_map(|r| classification(info, r, c)).collect();
                tensor(vec![n, c.min(k)], Data::Strings(strings))
            }
            None => tensor(vec![n, k], Data::Fp32(rows.concat())),
        }
    };
    Ok(match out {
        Output::Logits { classification } => class_output(false, *classification),
        Output::Probabilities { classification } => class_output(true, *classification),
        Output::TopK => {
            let strings: Vec<String> = classes.iter().flat_map(|c| classification(info, &c.probabilities, top_k)).collect();
            tensor(vec![n, top_k.min(k)], Data::Strings(strings))
        }
        Output::NumDetections => tensor(vec![n], Data::Int64(detections.iter().map(|d| d.len() as i64).collect())),
        Output::Boxes => tensor(vec![n, most, 4], Data::Fp32(padded(4, &|d| d.xyxy.to_vec(), 0.0))),
        Output::Scores => tensor(vec![n, most], Data::Fp32(padded(1, &|d| vec![d.score], 0.0))),
        Output::Classes => tensor(vec![n, most], Data::Int64(padded(1, &|d| vec![d.class_index as f32], -1.0).into_iter().map(|c| c as i64).collect())),
        Output::LabelMap => {
            let [h, w] = segmentations.first().map_or([0, 0], |s| s.grid);
            tensor(vec![n, h, w], Data::Int64(segmentations.iter().flat_map(|s| s.label_map.iter().map(|&l| l as i64)).collect()))
        }
        Output::MaskPng => tensor(vec![n], Data::Bytes(segmentations.iter().map(|s| s.mask_png.clone()).collect())),
        Output::Embedding => {
            let d = embeddings.first().map_or(0, |e| e.vector.len());
            tensor(vec![n, d], Data::Fp32(embeddings.iter().flat_map(|e| e.vector.iter().copied()).collect()))
        }
        Output::Similarity => {
            let values: Option<Vec<f32>> = embeddings.iter().map(|e| e.similarity.map(|s| s as f32)).collect();
            let values = values.ok_or_else(|| bad("output `similarity` needs a reference: the input `reference` (images) or `reference_vector`"))?;
            tensor(vec![n], Data::Fp32(values))
        }
        Output::Raw(m) => {
            // A detector's image without detections has no explanation: its map is zeros of the others' shape.
            let maps: Vec<Option<&RawArray>> = answers
                .iter()
                .map(|a| match (a.explanation(*m), &a.result) {
                    (Some(e), _) => e.raw.as_ref().map(Some).ok_or_else(|| internal(format!("the {m} raw map is missing. This is a bug."))),
                    (None, TaskResult::Detection(d)) if d.is_empty() => Ok(None),
                    (None, _) => Err(internal(format!("the {m} explanation is missing. This is a bug."))),
                })
                .collect::<Result<_, _>>()?;
            let mut shape: Option<&Vec<usize>> = None;
            for r in maps.iter().flatten() {
                if *shape.get_or_insert(&r.shape) != &r.shape {
                    return Err(bad(format!("output `{name}`: the images' maps differ in shape; ask for them one image at a time")));
                }
            }
            let size: usize = shape.map_or(0, |s| s.iter().product());
            let values: Vec<f32> = maps.iter().flat_map(|r| r.map_or_else(|| vec![0.0; size], |r| r.values.clone())).collect();
            let mut full = vec![n];
            full.extend(shape.cloned().unwrap_or_else(|| vec![0]));
            tensor(full, Data::Fp32(values))
        }
        Output::HeatmapPng(m) | Output::OverlayPng(m) => {
            let heat = matches!(out, Output::HeatmapPng(_));
            let pngs = answers
                .iter()
                .map(|a| {
                    // A detector's image without detections gets an empty picture.
                    if let TaskResult::Detection(d) = &a.result
                        && d.is_empty()
                    {
                        return Ok(vec![]);
                    }
                    let e = explanation(a, *m)?;
                    let png = if heat { e.heatmap_png.as_ref() } else { e.overlay_png.as_ref() };
                    png.cloned().ok_or_else(|| internal(format!("the {m} picture is missing. This is a bug.")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            tensor(vec![n], Data::Bytes(pngs))
        }
    })
}

// ------------------------------------------------------------------------------------------ infer

/// What an infer request asks of each image: the /v1 options its parameters and outputs make, the outputs to send
/// (name, binary or not), and the `top_k` output's size.
struct InferPlan {
    endpoint: Endpoint,
    options: RawOptions,
    outputs: Vec<(Output, String, bool)>,
    top_k: usize,
}

pub async fn infer(State(state): State<AppState>, Path(p): Path<ModelPath>, req: Request) -> Result<Response, OipError> {
    check_version(&p.model, p.version.as_deref())?;
    let model = p.model;
    let handle = state.service.model(&model)?;
    let info = handle.info.clone();
    let headers = req.headers().clone();
    let body = read_body(req, state.body_limit, state.body_timeout).await?;
    let (head, mut binary) = split_body(&headers, &body)?;
    let request: InferRequest = serde_json::from_slice(head).map_err(|e| bad(format!("the inference request is not valid: {e}")))?;
    let inputs = read_inputs(&request, &info, &handle.task, &mut binary)?;
    let mut plan = plan(&request, &info, &handle.task, state.service.limits.options.max_top_k)?;
    if let Some(v) = inputs.vector {
        plan.options.reference_vector = Some(v.into_iter().map(f64::from).collect());
    }
    let mut jobs = per_image(&request, inputs.images, &plan.options)?;
    if !inputs.references.is_empty() {
        for job in &mut jobs {
            job.1 = inputs.references.clone();
        }
    }
    let answers = answer_all(&state, &model, plan.endpoint, jobs).await?;

    let tensors: Vec<Tensor> = plan
        .outputs
        .iter()
        .map(|(o, name, binary)| build_output(o, name, &info, &answers, plan.top_k).map(|t| Tensor { binary: *binary, ..t }))
        .collect::<Result<_, _>>()?;
    let mut res = respond(response_header(&request, &model, &info, &tensors), &tensors);
    if let Some(first) = answers.first() {
        res.extensions_mut().insert(first.timings);
    }
    Ok(res)
}

/// What an infer request's inputs bring: the images, and an embedder's references.
struct Inputs {
    images: Vec<ImageInput>,
    references: Vec<Reference>,
    vector: Option<Vec<f32>>,
}

/// The request's inputs, in order (binary data follows them in that order): one of the encoded images or the
/// model's own input tensor, at most [`MAX_IMAGES`] images; for an embedder, also `reference` (images, compared
/// with every image of the request) or `reference_vector`.
fn read_inputs(request: &InferRequest, info: &ModelInfo, task: &Task, binary: &mut &[u8]) -> Result<Inputs, OipError> {
    let expected = || {
        let refs = if matches!(task, Task::Embedding(_)) { format!(", plus `{REFERENCE_INPUT}` (BYTES or FP32) or `{REFERENCE_VECTOR_INPUT}` (FP32)") } else { String::new() };
        format!("`{IMAGE_INPUT}` (BYTES, encoded image files) or `{}` (FP32, [N, 3, H, W]){refs}", info.input_name)
    };
    let images_of = |input: &InputTensor, binary: &mut &[u8]| match input.datatype.as_str() {
        "BYTES" => images_from_bytes(input, binary),
        "FP32" => images_from_fp32(input, info, binary),
        dt => Err(bad(format!("input `{}` ({dt}) is not one of model `{}`'s: {}", input.name, info.name, expected()))),
    };
    let embedder = matches!(task, Task::Embedding(_));
    if request.inputs.len() != 1 && !(embedder && request.inputs.len() == 2) {
        return Err(bad(format!("expected {}: {}; got {}", if embedder { "one or two inputs" } else { "one input" }, expected(), request.inputs.len())));
    }
    let (mut images, mut references, mut vector) = (None, None, None);
    for input in &request.inputs {
        match (input.name.as_str(), input.datatype.as_str()) {
            (IMAGE_INPUT, "BYTES") if images.is_none() => images = Some(images_from_bytes(input, binary)?),
            (name, "FP32") if name == info.input_name && images.is_none() => images = Some(images_from_fp32(input, info, binary)?),
            (REFERENCE_INPUT, _) if embedder && references.is_none() => references = Some(images_of(input, binary)?),
            (REFERENCE_VECTOR_INPUT, "FP32") if embedder && vector.is_none() => {
                let Task::Embedding(e) = task else { unreachable!("checked above") };
                let d = match input.shape.as_slice() {
                    [d] | [1, d] if *d >= 1 => *d as usize,
                    s => return Err(bad(format!("input `{REFERENCE_VECTOR_INPUT}` must have shape [{}] or [1, {}], not {s:?}", e.dim, e.dim))),
                };
                vector = Some(fp32_values(input, d, binary)?);
            }
            (name, dt) => {
                return Err(bad(format!("input `{name}` ({dt}) is not one of model `{}`'s, or is given twice: {}", info.name, expected())));
            }
        }
    }
    let images = images.ok_or_else(|| bad(format!("no image input: expected {}", expected())))?;
    if !binary.is_empty() {
        return Err(bad(format!("{} bytes of binary data after the inputs", binary.len())));
    }
    if images.len() > MAX_IMAGES {
        return Err(bad(format!("{} images in one request; at most {MAX_IMAGES} are accepted", images.len())));
    }
    let references = references.unwrap_or_default();
    if references.len() > MAX_REFERENCES {
        return Err(bad(format!("{} reference images; at most {MAX_REFERENCES} are accepted", references.len())));
    }
    let references = references.into_iter().enumerate().map(|(i, image)| Reference { name: format!("input `{REFERENCE_INPUT}`[{i}]"), image }).collect();
    Ok(Inputs { images, references, vector })
}

/// The options from the request parameters, and the outputs: with `outputs`, the methods are those the outputs
/// name (nothing else is computed); without, `methods`, and the three class outputs plus each method's raw map.
fn plan(request: &InferRequest, info: &ModelInfo, task: &Task, max_top_k: usize) -> Result<InferPlan, OipError> {
    let binary_all = truthy(request.parameters.get("binary_data_output"), "binary_data_output")?;
    let mut raw = RawOptions::default();
    for (key, value) in &request.parameters {
        // `target` is per image here, and `top_k` sizes the `top_k` output (in /v1 it asks for the top k classes'
        // explanations, which have no place in an [N, ...] tensor): both are read below.
        if key == "metrics" {
            // Scores per explanation have no place among the infer outputs: refused rather than computed and dropped.
            return Err(ServiceError::Unprocessable("the `metrics` parameter is not offered by v2 infer; ask /v1/models/{model}/explain or :explain for them".into()).into());
        }
        if !PROTOCOL_PARAMETERS.contains(&key.as_str()) && key != "target" && key != "top_k" {
            raw.set_json(key, value)?;
        }
    }
    let requested: Vec<(Output, &RequestedOutput)> = match &request.outputs {
        Some(list) => list.iter().map(|o| parse_output(o).map(|p| (p, o))).collect::<Result<_, _>>()?,
        None => vec![],
    };
    for (o, r) in &requested {
        let serves = match o {
            Output::Boxes | Output::Scores | Output::Classes | Output::NumDetections => matches!(task, Task::Detection(_)),
            Output::Logits { .. } | Output::Probabilities { .. } | Output::TopK => matches!(task, Task::Classification | Task::MultiLabel(_)),
            Output::LabelMap | Output::MaskPng => matches!(task, Task::Segmentation(_)),
            Output::Embedding | Output::Similarity => matches!(task, Task::Embedding(_)),
            Output::Raw(_) | Output::HeatmapPng(_) | Output::OverlayPng(_) => true,
        };
        if !serves {
            return Err(bad(format!("output `{}` does not exist for a model whose task is {}: GET /v2/models/{}, `outputs`, lists them", r.name, task.as_str(), info.name)));
        }
    }
    let methods = output_methods(request, &raw, &requested)?;
    let mut outputs: Vec<(Output, String, bool)> = if request.outputs.is_some() {
        requested.iter().map(|(o, r)| Ok((o.clone(), r.name.clone(), truthy(r.parameters.get("binary_data"), "binary_data")? || binary_all))).collect::<Result<_, OipError>>()?
    } else {
        let defaults = match task {
            Task::Detection(_) => vec![(Output::NumDetections, "num_detections"), (Output::Boxes, "boxes"), (Output::Scores, "scores"), (Output::Classes, "classes")],
            Task::Segmentation(_) => vec![(Output::LabelMap, "label_map")],
            Task::Embedding(_) => vec![(Output::Embedding, "embedding")],
            Task::Classification | Task::MultiLabel(_) => {
                vec![(Output::Logits { classification: None }, "logits"), (Output::Probabilities { classification: None }, "probabilities"), (Output::TopK, "top_k")]
            }
        };
        let mut v: Vec<(Output, String, bool)> = defaults.into_iter().map(|(o, n)| (o, n.to_string(), binary_all)).collect();
        for m in methods.iter().filter_map(|m| Method::parse(m)) {
            v.push((Output::Raw(m), m.as_str().to_string(), binary_all));
        }
        v
    };
    outputs.dedup_by(|a, b| a.1 == b.1);
    let mut wanted = vec!["raw"];
    if outputs.iter().any(|o| matches!(o.0, Output::HeatmapPng(_))) {
        wanted.push("heatmap");
    }
    if outputs.iter().any(|o| matches!(o.0, Output::OverlayPng(_))) {
        wanted.push("overlay");
    }
    raw.outputs = Some(wanted.iter().map(|s| s.to_string()).collect());
    let endpoint = if methods.is_empty() { Endpoint::Predict } else { Endpoint::Explain };
    raw.methods = (!methods.is_empty()).then_some(methods);
    let most = max_top_k.min(info.num_classes);
    let top_k = match request.parameters.get("top_k") {
        None => most.min(5),
        Some(v) => match v.as_u64() {
            Some(k) if k >= 1 && k as usize <= most => k as usize,
            _ => return Err(OipError(ServiceError::Unprocessable(format!("top_k must be between 1 and {most}, not {v}")).into())),
        },
    };
    Ok(InferPlan { endpoint, options: raw, outputs, top_k })
}

/// The methods to compute: with `outputs`, those the outputs name (a method in `methods` that no output asks for
/// is refused); without, `methods`.
fn output_methods(request: &InferRequest, raw: &RawOptions, requested: &[(Output, &RequestedOutput)]) -> Result<Vec<String>, OipError> {
    let mut methods: Vec<String> = if request.outputs.is_some() { vec![] } else { raw.methods.clone().unwrap_or_default() };
    for (o, _) in requested {
        if let Output::Raw(m) | Output::HeatmapPng(m) | Output::OverlayPng(m) = o
            && !methods.iter().any(|x| Method::parse(x) == Some(*m))
        {
            methods.push(m.as_str().to_string());
        }
    }
    if request.outputs.is_some()
        && let Some(asked) = &raw.methods
        && let Some(m) = asked.iter().filter_map(|a| Method::parse(a)).find(|m| !methods.iter().any(|x| Method::parse(x) == Some(*m)))
    {
        return Err(bad(format!("method `{m}` is in `methods` but no output asks for it: request `{m}`, `{m}_heatmap_png` or `{m}_overlay_png`")));
    }
    Ok(methods)
}

/// Each image with its options: `target` is one class for every image, or a list of one class per image.
fn per_image(request: &InferRequest, images: Vec<ImageInput>, raw: &RawOptions) -> Result<Vec<Job>, OipError> {
    let n = images.len();
    let targets: Vec<Option<Value>> = match request.parameters.get("target") {
        None => vec![None; n],
        Some(Value::Array(list)) if list.len() == n && n > 1 => list.iter().cloned().map(Some).collect(),
        Some(Value::Array(list)) if list.len() > 1 => {
            return Err(bad(format!("target has {} classes for {n} images: give one class for all images, or one per image", list.len())));
        }
        Some(v) => vec![Some(v.clone()); n],
    };
    let mut jobs = Vec::with_capacity(n);
    for (image, target) in images.into_iter().zip(targets) {
        let mut options = raw.clone();
        if let Some(t) = &target {
            options.set_json("target", t)?;
        }
        if let Some(specs) = &options.target
            && specs.len() > 1
        {
            return Err(bad("one target per image: give one class for all images, or a list with one per image"));
        }
        jobs.push((image, vec![], options));
    }
    Ok(jobs)
}

/// The JSON header of the answer: the outputs' metadata, and their data unless they go binary.
fn response_header(request: &InferRequest, model: &str, info: &ModelInfo, tensors: &[Tensor]) -> Value {
    let outputs_json: Vec<Value> = tensors
        .iter()
        .map(|t| {
            let mut v = json!({ "name": t.name, "datatype": t.datatype(), "shape": t.shape });
            if t.binary {
                v["parameters"] = json!({ "binary_data_size": t.to_binary().len() });
            } else {
                v["data"] = t.to_json();
            }
            v
        })
        .collect();
    let mut header = json!({
        "model_name": model,
        "model_version": VERSION,
        "parameters": { "device": info.device.to_string() },
        "outputs": outputs_json,
    });
    if let Some(id) = &request.id {
        header["id"] = Value::String(id.clone());
    }
    header
}

/// The whole body within the size and time limits /v1 uses (413 and 408).
pub(super) async fn read_body(req: Request, limit: usize, timeout: Duration) -> Result<axum::body::Bytes, OipError> {
    let body = tokio::time::timeout(timeout, super::upload::body_bytes(req.into_body(), limit)).await;
    Ok(body.map_err(|_| super::upload::body_timeout(timeout))??)
}

/// One image's request: the image, an embedder's reference images, the options.
pub(super) type Job = (ImageInput, Vec<Reference>, RawOptions);

/// Each image's answer, in order: one job per image, all queued at once, so the model's batcher batches them.
pub(super) async fn answer_all(state: &AppState, model: &str, endpoint: Endpoint, jobs: Vec<Job>) -> Result<Vec<Answer>, OipError> {
    let tasks: Vec<_> = jobs
        .into_iter()
        .map(|(image, references, options)| {
            let (service, model) = (state.service.clone(), model.to_string());
            tokio::spawn(async move { service.handle_input(&model, endpoint, image, references, options).await })
        })
        .collect();
    let mut answers = Vec::with_capacity(tasks.len());
    for task in tasks {
        let answer = task.await.map_err(|e| internal(format!("an inference task failed: {e}")))?;
        answers.push(answer?);
    }
    Ok(answers)
}
