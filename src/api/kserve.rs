//! KServe's v1 protocol on the same models: `POST /v1/models/{m}:predict` and `:explain` (its explainer slot, and
//! TorchServe's `:explain` alias). An encoder of the core's typed answers: one API v1 answer per instance.

use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use serde_json::{json, Map, Value};

use super::error::ApiError;
use super::oip::{answer_all, bad, read_body, OipError, MAX_IMAGES};
use super::oip_tensors::flatten;
use super::{v1, AppState};
use crate::core::options::RawOptions;
use crate::core::pipeline::{Endpoint, ImageInput, Reference};

/// `POST /v1/models/{m}:predict` and `:explain`, the shapes KServe's v1 protocol (its explainer slot) and
/// TorchServe's `:explain` alias use: `{"instances": [...], <options>}`, each instance `{"image": {"b64": ...}}`
/// (an encoded file; for an embedder, with `"reference": {"b64": ...}` or a list of them) or a nested list
/// `[C][H][W]` (a preprocessed tensor); the options are the /v1 ones, next to
/// `instances`. The answer is `{"predictions": [...]}` or `{"explanations": [...]}`, one /v1 answer per instance.
/// Errors in the same `{"error": "..."}` form.
pub async fn infer(State(state): State<AppState>, Path(target): Path<String>, req: Request) -> Result<Response, OipError> {
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
        raw.set_json(key, value)?;
    }
    let [c, h, w] = info.input_shape;
    let encoded = |v: &Value, what: &str| -> Result<ImageInput, OipError> {
        let b64 = v.get("b64").and_then(Value::as_str).ok_or_else(|| bad(format!("{what}: expected {{\"b64\": \"<base64 image file>\"}}")))?;
        base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .map(|f| ImageInput::Encoded(f.into()))
            .map_err(|e| bad(format!("{what}.b64 is not base64 ({e})")))
    };
    let jobs = instances
        .iter()
        .enumerate()
        .map(|(i, inst)| match inst {
            Value::Object(o) => {
                let image = o.get("image").ok_or_else(|| {
                    bad(format!("instance {i}: expected {{\"image\": {{\"b64\": \"<base64 image file>\"}}}} or a [C][H][W] list"))
                })?;
                let image = encoded(image, &format!("instance {i}: image"))?;
                // An embedder's reference images: `reference`, one {"b64"} or a list of them.
                let references: Vec<Reference> = match o.get("reference") {
                    None => vec![],
                    Some(Value::Array(list)) => list
                        .iter()
                        .enumerate()
                        .map(|(j, r)| {
                            let name = format!("instance {i}: reference[{j}]");
                            encoded(r, &name).map(|image| Reference { name, image })
                        })
                        .collect::<Result<_, _>>()?,
                    Some(r) => {
                        let name = format!("instance {i}: reference");
                        vec![Reference { image: encoded(r, &name)?, name }]
                    }
                };
                Ok((image, references, raw.clone()))
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
                    .map(|t| (ImageInput::Tensor(t), vec![], raw.clone()))
                    .map_err(|e| bad(format!("instance {i}: {e}")))
            }
            _ => Err(bad(format!("instance {i}: expected {{\"image\": {{\"b64\": ...}}}} or a [C][H][W] list"))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let answers = answer_all(&state, &model, endpoint, jobs).await?;
    let key = if endpoint == Endpoint::Predict { "predictions" } else { "explanations" };
    let timings = answers.first().map(|a| a.timings);
    let encoded: Vec<v1::Response<'_>> = answers.iter().map(v1::encode).collect();
    let mut res = Json(json!({ key: encoded })).into_response();
    if let Some(t) = timings {
        res.extensions_mut().insert(t);
    }
    Ok(res)
}
