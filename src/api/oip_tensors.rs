//! The Open Inference Protocol's tensors, both ways: the infer request's JSON and its inputs (JSON data or Triton's
//! binary tensor extension, `Inference-Header-Content-Length` and `binary_data_size`), and the output tensors'
//! JSON or binary form.

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::error::ApiError;
use super::oip::{bad, OipError, HEADER_LENGTH, IMAGE_INPUT};
use crate::backend::engine::ModelInfo;
use crate::core::pipeline::ImageInput;

#[derive(Deserialize)]
pub struct InferRequest {
    pub id: Option<String>,
    #[serde(default)]
    pub parameters: Map<String, Value>,
    pub inputs: Vec<InputTensor>,
    pub outputs: Option<Vec<RequestedOutput>>,
}

#[derive(Deserialize)]
pub struct InputTensor {
    pub name: String,
    pub shape: Vec<i64>,
    pub datatype: String,
    #[serde(default)]
    pub parameters: Map<String, Value>,
    pub data: Option<Value>,
}

#[derive(Deserialize)]
pub struct RequestedOutput {
    pub name: String,
    #[serde(default)]
    pub parameters: Map<String, Value>,
}

/// The body split into its JSON header and the binary tensors after it.
pub fn split_body<'a>(headers: &HeaderMap, body: &'a [u8]) -> Result<(&'a [u8], &'a [u8]), OipError> {
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
pub fn take<'a>(binary: &mut &'a [u8], size: usize, name: &str) -> Result<&'a [u8], OipError> {
    if size > binary.len() {
        return Err(bad(format!("input `{name}`: binary_data_size {size} runs past the end of the body")));
    }
    let (head, rest) = binary.split_at(size);
    *binary = rest;
    Ok(head)
}

pub fn binary_size(t: &InputTensor) -> Result<Option<usize>, OipError> {
    match t.parameters.get("binary_data_size") {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .map(|n| Some(n as usize))
            .ok_or_else(|| bad(format!("input `{}`: binary_data_size must be a byte count", t.name))),
    }
}

/// The leaves of a JSON tensor (nested arrays flattened in row-major order).
pub fn flatten<'a>(v: &'a Value, out: &mut Vec<&'a Value>) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| flatten(i, out)),
        other => out.push(other),
    }
}

/// Triton's serialised BYTES tensor: each element a 4-byte little-endian length, then its bytes.
pub fn parse_bytes_elements(mut raw: &[u8], name: &str) -> Result<Vec<Vec<u8>>, OipError> {
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

pub fn images_from_bytes(t: &InputTensor, binary: &mut &[u8]) -> Result<Vec<ImageInput>, OipError> {
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

pub fn images_from_fp32(t: &InputTensor, info: &ModelInfo, binary: &mut &[u8]) -> Result<Vec<ImageInput>, OipError> {
    let [c, h, w] = info.input_shape;
    let n = match t.shape.as_slice() {
        [n, sc, sh, sw] if *n >= 1 && [*sc, *sh, *sw] == [c as i64, h as i64, w as i64] => *n as usize,
        s => return Err(bad(format!("input `{}` must have shape [N, {c}, {h}, {w}], not {s:?}", t.name))),
    };
    let values = fp32_values(t, n * c * h * w, binary)?;
    let all = ndarray::Array4::from_shape_vec((n, c, h, w), values).map_err(|e| OipError(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())))?;
    Ok(all.outer_iter().map(|img| ImageInput::Tensor(img.to_owned())).collect())
}

/// An FP32 input's `count` values, from its JSON `data` or its binary data.
pub fn fp32_values(t: &InputTensor, count: usize, binary: &mut &[u8]) -> Result<Vec<f32>, OipError> {
    match (binary_size(t)?, &t.data) {
        (Some(size), None) => {
            let raw = take(binary, size, &t.name)?;
            if raw.len() != count * 4 {
                return Err(bad(format!("input `{}`: {} bytes of binary data for {count} FP32 values", t.name, raw.len())));
            }
            Ok(raw.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
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
                .collect()
        }
        (Some(_), Some(_)) => Err(bad(format!("input `{}` has both data and binary_data_size", t.name))),
        (None, None) => Err(bad(format!("input `{}` has no data", t.name))),
    }
}


/// One output tensor's data, before it is written as JSON or binary.
pub enum Data {
    Fp32(Vec<f32>),
    Int64(Vec<i64>),
    Bytes(Vec<Vec<u8>>),
    Strings(Vec<String>),
}

pub struct Tensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Data,
    pub binary: bool,
}

impl Tensor {
    pub fn datatype(&self) -> &'static str {
        match self.data {
            Data::Fp32(_) => "FP32",
            Data::Int64(_) => "INT64",
            Data::Bytes(_) | Data::Strings(_) => "BYTES",
        }
    }

    /// Its binary form: FP32 and INT64 little-endian; BYTES as 4-byte little-endian lengths and contents.
    pub fn to_binary(&self) -> Vec<u8> {
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
            Data::Int64(v) => v.iter().flat_map(|f| f.to_le_bytes()).collect(),
            Data::Bytes(v) => bytes_form(&mut v.iter().map(Vec::as_slice)),
            Data::Strings(v) => bytes_form(&mut v.iter().map(String::as_bytes)),
        }
    }

    /// Its JSON data: numbers, strings, and binary BYTES (PNG files) in base64.
    pub fn to_json(&self) -> Value {
        match &self.data {
            Data::Fp32(v) => json!(v),
            Data::Int64(v) => json!(v),
            Data::Bytes(v) => json!(v.iter().map(|b| base64::engine::general_purpose::STANDARD.encode(b)).collect::<Vec<_>>()),
            Data::Strings(v) => json!(v),
        }
    }
}

/// The answer: JSON, or (with any binary output) JSON then the binary tensors, its length in the header.
pub fn respond(header: Value, tensors: &[Tensor]) -> Response {
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
