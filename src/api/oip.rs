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

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::error::ApiError;
use super::wire::ExplainResponse;
use super::AppState;
use crate::backend::engine::{ranked, ModelInfo};
use crate::core::options::RawOptions;
use crate::core::pipeline::{Endpoint, ImageInput, ServiceError};
use crate::methods::{Kind, Method};

/// Triton's binary tensor extension: the length of the JSON part of a body that binary tensors follow.
pub const HEADER_LENGTH: &str = "inference-header-content-length";
/// The encoded-image input.
pub const IMAGE_INPUT: &str = "image";
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

fn bad(detail: impl Into<String>) -> OipError {
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

/// API keys on /v2 as on /v1, the refusal in the protocol's error form.
pub async fn require_api_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if super::key_accepted(&state, req.headers()) {
        next.run(req).await
    } else {
        OipError(ApiError::unauthorized()).into_response()
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
pub fn model_metadata_value(info: &ModelInfo) -> Value {
    let [c, h, w] = info.input_shape.map(|d| d as i64);
    let k = info.num_classes as i64;
    let methods = super::routes::methods_for(info);
    let mut outputs = vec![
        tensor_meta("logits", "FP32", &[-1, k]),
        tensor_meta("probabilities", "FP32", &[-1, k]),
        tensor_meta("top_k", "BYTES", &[-1, -1]),
    ];
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
        "inputs": [tensor_meta(IMAGE_INPUT, "BYTES", &[-1]), tensor_meta(&info.input_name, "FP32", &[-1, c, h, w])],
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
    Ok(Json(model_metadata_value(&state.service.model(&p.model)?.info)))
}

// ------------------------------------------------------------------------------------------ infer: request

#[derive(Deserialize)]
struct InferRequest {
    id: Option<String>,
    #[serde(default)]
    parameters: Map<String, Value>,
    inputs: Vec<InputTensor>,
    outputs: Option<Vec<RequestedOutput>>,
}

#[derive(Deserialize)]
struct InputTensor {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Map<String, Value>,
    data: Option<Value>,
}

#[derive(Deserialize)]
struct RequestedOutput {
    name: String,
    #[serde(default)]
    parameters: Map<String, Value>,
}

/// The body split into its JSON header and the binary tensors after it.
fn split_body<'a>(headers: &HeaderMap, body: &'a [u8]) -> Result<(&'a [u8], &'a [u8]), OipError> {
    let Some(v) = headers.get(HEADER_LENGTH) else { return Ok((body, &[])) };
    let n: usize = v
        .to_str()
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| bad(format!("{HEADER_LENGTH} must be a byte count")))?;
    if n > body.len() {
        return Err(bad(format!("{HEADER_LENGTH} is {n}, but the body has {} bytes", body.len())));
    }
    Ok(body.split_at(n))
}

/// Takes the next `size` bytes of the binary part.
fn take<'a>(binary: &mut &'a [u8], size: usize, name: &str) -> Result<&'a [u8], OipError> {
    if size > binary.len() {
        return Err(bad(format!("input `{name}`: binary_data_size {size} runs past the end of the body")));
    }
    let (head, rest) = binary.split_at(size);
    *binary = rest;
    Ok(head)
}

fn binary_size(t: &InputTensor) -> Result<Option<usize>, OipError> {
    match t.parameters.get("binary_data_size") {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .map(|n| Some(n as usize))
            .ok_or_else(|| bad(format!("input `{}`: binary_data_size must be a byte count", t.name))),
    }
}

/// The leaves of a JSON tensor (nested arrays flattened in row-major order).
fn flatten<'a>(v: &'a Value, out: &mut Vec<&'a Value>) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| flatten(i, out)),
        other => out.push(other),
    }
}

/// Triton's serialised BYTES tensor: each element a 4-byte little-endian length, then its bytes.
fn parse_bytes_elements(mut raw: &[u8], name: &str) -> Result<Vec<Vec<u8>>, OipError> {
    let mut out = Vec::new();
    while !raw.is_empty() {
        if raw.len() < 4 {
            return Err(bad(format!("input `{name}`: a BYTES element's 4-byte length is cut off")));
        }
        let len = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]) as usize;
        raw = &raw[4..];
        if len > raw.len() {
            return Err(bad(format!("input `{name}`: a BYTES element of {len} bytes runs past its tensor")));
        }
        out.push(raw[..len].to_vec());
        raw = &raw[len..];
    }
    Ok(out)
}

fn images_from_bytes(t: &InputTensor, binary: &mut &[u8]) -> Result<Vec<ImageInput>, OipError> {
    let n = match t.shape.as_slice() {
        [n] | [n, 1] if *n >= 1 => *n as usize,
        s => return Err(bad(format!("input `{IMAGE_INPUT}` must have shape [N] (or [N, 1]), not {s:?}"))),
    };
    let files: Vec<Vec<u8>> = match (binary_size(t)?, &t.data) {
        (Some(size), None) => parse_bytes_elements(take(binary, size, &t.name)?, &t.name)?,
        (None, Some(data)) => {
            let mut leaves = Vec::new();
            flatten(data, &mut leaves);
            leaves
                .into_iter()
                .map(|v| {
                    let s = v.as_str().ok_or_else(|| bad(format!("input `{IMAGE_INPUT}`: JSON data must be strings (base64 image files)")))?;
                    base64::engine::general_purpose::STANDARD
                        .decode(s.trim())
                        .map_err(|e| bad(format!("input `{IMAGE_INPUT}`: a JSON element is not base64 ({e}); send the image file base64-encoded, or as binary data")))
                })
                .collect::<Result<_, _>>()?
        }
        (Some(_), Some(_)) => return Err(bad(format!("input `{}` has both data and binary_data_size", t.name))),
        (None, None) => return Err(bad(format!("input `{}` has no data", t.name))),
    };
    if files.len() != n {
        return Err(bad(format!("input `{IMAGE_INPUT}` has shape {:?} but {} elements", t.shape, files.len())));
    }
    Ok(files.into_iter().map(|f| ImageInput::Encoded(f.into())).collect())
}

fn images_from_fp32(t: &InputTensor, info: &ModelInfo, binary: &mut &[u8]) -> Result<Vec<ImageInput>, OipError> {
    let [c, h, w] = info.input_shape;
    let n = match t.shape.as_slice() {
        [n, sc, sh, sw] if *n >= 1 && [*sc, *sh, *sw] == [c as i64, h as i64, w as i64] => *n as usize,
        s => return Err(bad(format!("input `{}` must have shape [N, {c}, {h}, {w}], not {s:?}", t.name))),
    };
    let count = n * c * h * w;
    let values: Vec<f32> = match (binary_size(t)?, &t.data) {
        (Some(size), None) => {
            let raw = take(binary, size, &t.name)?;
            if raw.len() != count * 4 {
                return Err(bad(format!("input `{}`: {} bytes of binary data for {count} FP32 values", t.name, raw.len())));
            }
            raw.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
        }
        (None, Some(data)) => {
            let mut leaves = Vec::new();
            flatten(data, &mut leaves);
            if leaves.len() != count {
                return Err(bad(format!("input `{}` has shape {:?} but {} values", t.name, t.shape, leaves.len())));
            }
            leaves
                .into_iter()
                .map(|v| v.as_f64().map(|f| f as f32).ok_or_else(|| bad(format!("input `{}`: FP32 data must be numbers", t.name))))
                .collect::<Result<_, _>>()?
        }
        (Some(_), Some(_)) => return Err(bad(format!("input `{}` has both data and binary_data_size", t.name))),
        (None, None) => return Err(bad(format!("input `{}` has no data", t.name))),
    };
    let all = ndarray::Array4::from_shape_vec((n, c, h, w), values).map_err(|e| OipError(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())))?;
    Ok(all.outer_iter().map(|img| ImageInput::Tensor(img.to_owned())).collect())
}

/// One requested output, resolved.
#[derive(Debug, Clone, PartialEq)]
enum Output {
    Logits { classification: Option<usize> },
    Probabilities { classification: Option<usize> },
    TopK,
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

/// One output tensor's data, before it is written as JSON or binary.
enum Data {
    Fp32(Vec<f32>),
    Bytes(Vec<Vec<u8>>),
    Strings(Vec<String>),
}

struct Tensor {
    name: String,
    shape: Vec<usize>,
    data: Data,
    binary: bool,
}

impl Tensor {
    fn datatype(&self) -> &'static str {
        match self.data {
            Data::Fp32(_) => "FP32",
            Data::Bytes(_) | Data::Strings(_) => "BYTES",
        }
    }

    /// Its binary form: FP32 little-endian; BYTES as 4-byte little-endian lengths and contents.
    fn to_binary(&self) -> Vec<u8> {
        let bytes_form = |items: &mut dyn Iterator<Item = &[u8]>| {
            let mut out = Vec::new();
            for b in items {
                out.extend_from_slice(&(b.len() as u32).to_le_bytes());
                out.extend_from_slice(b);
            }
            out
        };
        match &self.data {
            Data::Fp32(v) => v.iter().flat_map(|f| f.to_le_bytes()).collect(),
            Data::Bytes(v) => bytes_form(&mut v.iter().map(Vec::as_slice)),
            Data::Strings(v) => bytes_form(&mut v.iter().map(String::as_bytes)),
        }
    }

    /// Its JSON data: numbers, strings, and binary BYTES (PNG files) in base64.
    fn to_json(&self) -> Value {
        match &self.data {
            Data::Fp32(v) => json!(v),
            Data::Bytes(v) => json!(v.iter().map(|b| base64::engine::general_purpose::STANDARD.encode(b)).collect::<Vec<_>>()),
            Data::Strings(v) => json!(v),
        }
    }
}

fn softmax(logits: &[f32]) -> Vec<f32> {
    crate::core::pipeline::softmax(ndarray::ArrayView1::from(logits))
}

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

fn decode_b64(s: &str) -> Result<Vec<u8>, OipError> {
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|e| OipError(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("re-reading an output: {e}. This is a bug."))))
}

/// The explanation of `method` in one image's answer.
fn explanation(r: &ExplainResponse, m: Method) -> Result<&crate::api::wire::Explanation, OipError> {
    r.explanations.as_ref().and_then(|e| e.iter().find(|e| e.method == m)).ok_or_else(|| {
        OipError(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("the {m} explanation is missing. This is a bug.")))
    })
}

fn build_output(out: &Output, name: &str, info: &ModelInfo, answers: &[ExplainResponse], top_k: usize) -> Result<Tensor, OipError> {
    let n = answers.len();
    let k = info.num_classes;
    let tensor = |shape: Vec<usize>, data: Data| Tensor { name: name.to_string(), shape, data, binary: false };
    let class_output = |probs: bool, count: Option<usize>| {
        let rows: Vec<Vec<f32>> = answers.iter().map(|a| if probs { softmax(&a.logits) } else { a.logits.clone() }).collect();
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
            let strings: Vec<String> = answers.iter().flat_map(|a| classification(info, &softmax(&a.logits), top_k)).collect();
            tensor(vec![n, top_k.min(k)], Data::Strings(strings))
        }
        Output::Raw(m) => {
            let mut shape = None;
            let mut values = Vec::new();
            for a in answers {
                let raw = explanation(a, *m)?.raw.as_ref().ok_or_else(|| bad("raw map missing"))?;
                if shape.get_or_insert_with(|| raw.shape.clone()) != &raw.shape {
                    return Err(bad(format!("output `{name}`: the images' maps differ in shape; ask for them one image at a time")));
                }
                values.extend(decode_b64(&raw.data)?.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])));
            }
            let mut full = vec![n];
            full.extend(shape.unwrap_or_default());
            tensor(full, Data::Fp32(values))
        }
        Output::HeatmapPng(m) | Output::OverlayPng(m) => {
            let heat = matches!(out, Output::HeatmapPng(_));
            let pngs = answers
                .iter()
                .map(|a| {
                    let e = explanation(a, *m)?;
                    let b64 = if heat { e.heatmap_png.as_deref() } else { e.overlay_png.as_deref() };
                    decode_b64(b64.ok_or_else(|| bad("picture missing"))?)
                })
                .collect::<Result<Vec<_>, _>>()?;
            tensor(vec![n], Data::Bytes(pngs))
        }
    })
}

/// The answer: JSON, or (with any binary output) JSON then the binary tensors, its length in the header.
fn respond(header: Value, tensors: &[Tensor]) -> Response {
    let binary: Vec<&Tensor> = tensors.iter().filter(|t| t.binary).collect();
    if binary.is_empty() {
        return Json(header).into_response();
    }
    let json = serde_json::to_vec(&header).unwrap_or_default();
    let mut body = json.clone();
    for t in binary {
        body.extend(t.to_binary());
    }
    let mut res = Response::new(Body::from(body));
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    h.insert(HEADER_LENGTH, HeaderValue::from(json.len()));
    res
}

pub async fn infer(State(state): State<AppState>, Path(p): Path<ModelPath>, req: Request) -> Result<Response, OipError> {
    check_version(&p.model, p.version.as_deref())?;
    let model = p.model;
    let info = state.service.model(&model)?.info.clone();
    let headers = req.headers().clone();
    let body = read_body(req, state.body_limit, state.body_timeout).await?;
    let (head, mut binary) = split_body(&headers, &body)?;
    let request: InferRequest = serde_json::from_slice(head).map_err(|e| bad(format!("the inference request is not valid: {e}")))?;

    // Inputs: one tensor, the encoded images or the model's own input.
    let [input] = request.inputs.as_slice() else {
        return Err(bad(format!("expected one input, `{IMAGE_INPUT}` (BYTES) or `{}` (FP32); got {}", info.input_name, request.inputs.len())));
    };
    let images = match (input.name.as_str(), input.datatype.as_str()) {
        (IMAGE_INPUT, "BYTES") => images_from_bytes(input, &mut binary)?,
        (name, "FP32") if name == info.input_name => images_from_fp32(input, &info, &mut binary)?,
        (name, dt) => {
            return Err(bad(format!(
                "input `{name}` ({dt}) is not one of model `{model}`'s: `{IMAGE_INPUT}` (BYTES, encoded image files) or `{}` (FP32, [N, 3, H, W])",
                info.input_name
            )));
        }
    };
    if !binary.is_empty() {
        return Err(bad(format!("{} bytes of binary data after the inputs", binary.len())));
    }
    if images.len() > MAX_IMAGES {
        return Err(bad(format!("{} images in one request; at most {MAX_IMAGES} are accepted", images.len())));
    }
    let n = images.len();

    // Options: the /v1 options from the request parameters; outputs name the methods they need.
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
            raw.set_json(key, value).map_err(ServiceError::from)?;
        }
    }
    let requested: Vec<(Output, &RequestedOutput)> = match &request.outputs {
        Some(list) => list.iter().map(|o| parse_output(o).map(|p| (p, o))).collect::<Result<_, _>>()?,
        None => vec![],
    };
    // With `outputs`, the methods are those the outputs name (nothing else is computed); without, `methods`.
    let mut methods: Vec<String> = if request.outputs.is_some() { vec![] } else { raw.methods.clone().unwrap_or_default() };
    for (o, _) in &requested {
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
    let mut outputs: Vec<(Output, String, bool)> = if request.outputs.is_some() {
        requested.iter().map(|(o, r)| Ok((o.clone(), r.name.clone(), truthy(r.parameters.get("binary_data"), "binary_data")? || binary_all))).collect::<Result<_, OipError>>()?
    } else {
        let mut v = vec![
            (Output::Logits { classification: None }, "logits".to_string(), binary_all),
            (Output::Probabilities { classification: None }, "probabilities".to_string(), binary_all),
            (Output::TopK, "top_k".to_string(), binary_all),
        ];
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

    // `target`: one for every image, or one per image.
    let targets: Vec<Option<Value>> = match request.parameters.get("target") {
        None => vec![None; n],
        Some(Value::Array(list)) if list.len() == n && n > 1 => list.iter().cloned().map(Some).collect(),
        Some(Value::Array(list)) if list.len() > 1 => {
            return Err(bad(format!("target has {} classes for {n} images: give one class for all images, or one per image", list.len())));
        }
        Some(v) => vec![Some(v.clone()); n],
    };
    let most = state.service.limits.options.max_top_k.min(info.num_classes);
    let top_k = match request.parameters.get("top_k") {
        None => most.min(5),
        Some(v) => match v.as_u64() {
            Some(k) if k >= 1 && k as usize <= most => k as usize,
            _ => return Err(OipError(ServiceError::Unprocessable(format!("top_k must be between 1 and {most}, not {v}")).into())),
        },
    };

    let mut jobs = Vec::with_capacity(n);
    for (image, target) in images.into_iter().zip(targets) {
        let mut options = raw.clone();
        if let Some(t) = &target {
            options.set_json("target", t).map_err(ServiceError::from)?;
        }
        if let Some(specs) = &options.target
            && specs.len() > 1
        {
            return Err(bad("one target per image: give one class for all images, or a list with one per image"));
        }
        jobs.push((image, options));
    }
    let answers = answer_all(&state, &model, endpoint, jobs).await?;

    let tensors: Vec<Tensor> = outputs
        .iter()
        .map(|(o, name, binary)| build_output(o, name, &info, &answers, top_k).map(|t| Tensor { binary: *binary, ..t }))
        .collect::<Result<_, _>>()?;
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
    if let Some(id) = request.id {
        header["id"] = Value::String(id);
    }
    let mut res = respond(header, &tensors);
    if let Some(first) = answers.first() {
        res.extensions_mut().insert(first.timings_ms);
    }
    Ok(res)
}

/// The whole body within the size and time limits /v1 uses (413 and 408).
async fn read_body(req: Request, limit: usize, timeout: Duration) -> Result<axum::body::Bytes, OipError> {
    let body = tokio::time::timeout(timeout, super::upload::body_bytes(req.into_body(), limit)).await;
    Ok(body.map_err(|_| super::upload::body_timeout(timeout))??)
}

/// Each image's answer, in order: one job per image, all queued at once, so the model's batcher batches them.
async fn answer_all(state: &AppState, model: &str, endpoint: Endpoint, jobs: Vec<(ImageInput, RawOptions)>) -> Result<Vec<ExplainResponse>, OipError> {
    let tasks: Vec<_> = jobs
        .into_iter()
        .map(|(image, options)| {
            let (service, model) = (state.service.clone(), model.to_string());
            tokio::spawn(async move { service.handle_input(&model, endpoint, image, options).await })
        })
        .collect();
    let mut answers = Vec::with_capacity(tasks.len());
    for task in tasks {
        let answer = task.await.map_err(|e| OipError(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("an inference task failed: {e}"))))?;
        answers.push(answer?);
    }
    Ok(answers)
}

// ------------------------------------------------------------------------------------------ KServe v1 shim

/// `POST /v1/models/{m}:predict` and `:explain`, the shapes KServe's v1 protocol (its explainer slot) and
/// TorchServe's `:explain` alias use: `{"instances": [...], <options>}`, each instance `{"image": {"b64": ...}}`
/// (an encoded file) or a nested list `[C][H][W]` (a preprocessed tensor); the options are the /v1 ones, next to
/// `instances`. The answer is `{"predictions": [...]}` or `{"explanations": [...]}`, one /v1 answer per instance.
/// Errors in the same `{"error": "..."}` form.
pub async fn kserve_v1(State(state): State<AppState>, Path(target): Path<String>, req: Request) -> Result<Response, OipError> {
    let (model, endpoint) = match target.rsplit_once(':') {
        Some((m, "predict")) => (m.to_string(), Endpoint::Predict),
        Some((m, "explain")) => (m.to_string(), Endpoint::Explain),
        _ => {
            return Err(OipError(ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                format!("POST /v1/models/{target}: use /v1/models/{{model}}/explain, or the KServe forms /v1/models/{{model}}:predict and :explain"),
            )));
        }
    };
    let info = state.service.model(&model)?.info.clone();
    let body = read_body(req, state.body_limit, state.body_timeout).await?;
    let mut fields: Map<String, Value> = serde_json::from_slice(&body).map_err(|e| bad(format!("the body must be a JSON object with `instances`: {e}")))?;
    let Some(Value::Array(instances)) = fields.remove("instances") else {
        return Err(bad("the body must have `instances`, a list of images"));
    };
    if instances.is_empty() || instances.len() > MAX_IMAGES {
        return Err(bad(format!("{} instances; between 1 and {MAX_IMAGES} are accepted", instances.len())));
    }
    let mut raw = RawOptions::default();
    for (key, value) in &fields {
        raw.set_json(key, value).map_err(ServiceError::from)?;
    }
    let [c, h, w] = info.input_shape;
    let images = instances
        .iter()
        .enumerate()
        .map(|(i, inst)| match inst {
            Value::Object(o) => {
                let b64 = o.get("image").and_then(|v| v.get("b64")).and_then(Value::as_str).ok_or_else(|| {
                    bad(format!("instance {i}: expected {{\"image\": {{\"b64\": \"<base64 image file>\"}}}} or a [C][H][W] list"))
                })?;
                base64::engine::general_purpose::STANDARD
                    .decode(b64.trim())
                    .map(|f| ImageInput::Encoded(f.into()))
                    .map_err(|e| bad(format!("instance {i}: image.b64 is not base64 ({e})")))
            }
            Value::Array(_) => {
                let mut leaves = Vec::new();
                flatten(inst, &mut leaves);
                if leaves.len() != c * h * w {
                    return Err(bad(format!("instance {i}: {} values; model `{model}` takes [{c}][{h}][{w}]", leaves.len())));
                }
                let values = leaves
                    .into_iter()
                    .map(|v| v.as_f64().map(|f| f as f32).ok_or_else(|| bad(format!("instance {i}: a tensor holds numbers only"))))
                    .collect::<Result<Vec<f32>, _>>()?;
                ndarray::Array3::from_shape_vec((c, h, w), values)
                    .map(ImageInput::Tensor)
                    .map_err(|e| bad(format!("instance {i}: {e}")))
            }
            _ => Err(bad(format!("instance {i}: expected {{\"image\": {{\"b64\": ...}}}} or a [C][H][W] list"))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let answers = answer_all(&state, &model, endpoint, images.into_iter().map(|i| (i, raw.clone())).collect()).await?;
    let key = if endpoint == Endpoint::Predict { "predictions" } else { "explanations" };
    let timings = answers.first().map(|a| a.timings_ms);
    let mut res = Json(json!({ key: answers })).into_response();
    if let Some(t) = timings {
        res.extensions_mut().insert(t);
    }
    Ok(res)
}
