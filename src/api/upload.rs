//! The three request forms of docs/DESIGN.md §5: multipart (file part `image`, options as text parts or one JSON part
//! `options`), JSON (`{"image": "<base64>", ...options}`), and a raw `image/*` body. Options may also come in
//! the query string with every form; options in the body win.

use axum::body::Body;
use axum::extract::{FromRequest, Multipart, Request};
use axum::http::header;
use base64::Engine as _;
use bytes::Bytes;

use super::error::ApiError;
use crate::core::options::RawOptions;
use crate::core::pipeline::{ImageInput, Reference, MAX_REFERENCES};

pub struct Upload {
    pub image: Bytes,
    /// An embedder's reference images: multipart parts `reference`, or JSON `reference_image` (a base64 string or
    /// a list of them).
    pub references: Vec<Reference>,
    pub options: RawOptions,
}

/// The most parts a multipart body may have: the image and each option once fit eight times over; repeated text
/// parts (`-F methods=a -F methods=b`) stay possible.
pub const MAX_PARTS: usize = 32;

/// A base64 string (a data URL's too, as browsers produce them) as bytes; the error names `what`.
fn base64_image(s: &str, what: &str) -> Result<Bytes, ApiError> {
    let s = s.split_once(";base64,").map(|(_, b)| b).unwrap_or(s);
    let decoded = base64::engine::general_purpose::STANDARD.decode(s.trim()).map_err(|e| ApiError::bad_request(format!("{what} is not valid base64: {e}")))?;
    if decoded.is_empty() {
        return Err(ApiError::bad_request(format!("{what} is empty")));
    }
    Ok(Bytes::from(decoded))
}

fn reference(name: String, bytes: Bytes, count: usize) -> Result<Reference, ApiError> {
    if count >= MAX_REFERENCES {
        return Err(ApiError::bad_request(format!("more than {MAX_REFERENCES} reference images")));
    }
    if bytes.is_empty() {
        return Err(ApiError::bad_request(format!("reference image {name} is empty")));
    }
    Ok(Reference { name, image: ImageInput::Encoded(bytes) })
}

/// A JSON string member's text (borrowed when it has no escapes), or `None` for any other JSON value.
fn json_string(raw: &serde_json::value::RawValue) -> Option<std::borrow::Cow<'_, str>> {
    match serde_json::from_str::<&str>(raw.get()) {
        Ok(s) => Some(s.into()),
        Err(_) => serde_json::from_str::<String>(raw.get()).ok().map(Into::into),
    }
}

fn query_options(query: Option<&str>) -> Result<RawOptions, ApiError> {
    let mut o = RawOptions::default();
    if let Some(q) = query {
        let pairs: Vec<(String, String)> =
            serde_urlencoded::from_str(q).map_err(|e| ApiError::bad_request(format!("malformed query string: {e}")))?;
        for (k, v) in pairs {
            // `async=true` asks for a job (api::jobs), not an option of the request.
            if k == "async" {
                continue;
            }
            o.set_text(&k, &v).map_err(ApiError::from)?;
        }
    }
    Ok(o)
}

/// 408 for a body that did not arrive within `timeout` (`server.body_timeout_ms`).
pub fn body_timeout(timeout: std::time::Duration) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::REQUEST_TIMEOUT,
        "body-timeout",
        format!("the request body did not arrive within {} ms", timeout.as_millis()),
    )
}

/// The whole body, 413 past `limit`.
pub async fn body_bytes(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        if std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>()) || e.to_string().contains("length limit") {
            ApiError::too_large(format!("the request body is larger than {limit} bytes"))
        } else {
            ApiError::bad_request(format!("cannot read the request body: {e}"))
        }
    })
}

pub async fn parse(req: Request, body_limit: usize) -> Result<Upload, ApiError> {
    let mut options = query_options(req.uri().query())?;
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.split(';').next().unwrap_or("").trim().to_ascii_lowercase())
        .unwrap_or_default();
    let (image, references) = match content_type.as_str() {
        "multipart/form-data" => {
            let mut mp = Multipart::from_request(req, &()).await.map_err(|e| ApiError::bad_request(e.body_text()))?;
            let mut image = None;
            let mut references = Vec::new();
            let mut body_opts = RawOptions::default();
            let mut json_opts = None;
            let mut parts = 0;
            loop {
                let field = match mp.next_field().await {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(e) if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE => {
                        return Err(ApiError::too_large(format!("the request body is larger than {body_limit} bytes")));
                    }
                    Err(e) => return Err(ApiError::bad_request(format!("malformed multipart body: {}", e.body_text()))),
                };
                parts += 1;
                if parts > MAX_PARTS {
                    return Err(ApiError::bad_request(format!("the multipart body has more than {MAX_PARTS} parts")));
                }
                let name = field.name().unwrap_or("").to_string();
                let data = field.bytes().await.map_err(|e| {
                    if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                        ApiError::too_large(format!("the request body is larger than {body_limit} bytes"))
                    } else {
                        ApiError::bad_request(format!("malformed multipart body: {}", e.body_text()))
                    }
                })?;
                if !matches!(name.as_str(), "image" | "file" | "reference") {
                    crate::core::options::check_option_size(&name, data.len()).map_err(ApiError::from)?;
                }
                match name.as_str() {
                    "image" | "file" => {
                        if image.replace(data).is_some() {
                            return Err(ApiError::bad_request("more than one `image` part"));
                        }
                    }
                    "reference" => {
                        let n = references.len();
                        references.push(reference(format!("part `reference` {}", n + 1), data, n)?);
                    }
                    "options" => json_opts = Some(RawOptions::from_json_object(&data).map_err(ApiError::from)?),
                    other => {
                        let text = std::str::from_utf8(&data).map_err(|_| ApiError::bad_request(format!("part `{other}` is not UTF-8 text")))?;
                        body_opts.set_text(other, text).map_err(ApiError::from)?;
                    }
                }
            }
            options.merge(body_opts);
            if let Some(j) = json_opts {
                options.merge(j);
            }
            (image.ok_or_else(|| ApiError::bad_request("the multipart body has no `image` part"))?, references)
        }
        "application/json" => {
            let bytes = body_bytes(req.into_body(), body_limit).await?;
            let members = crate::core::options::json_members(&bytes).map_err(|e| ApiError::bad_request(format!("the JSON body {e}")))?;
            let mut body_opts = RawOptions::default();
            let mut image = None;
            let mut references = Vec::new();
            for (k, v) in members {
                if k == "image" {
                    let s = json_string(v).ok_or_else(|| ApiError::bad_request("`image` must be a base64 string"))?;
                    // Accept data URLs as browsers produce them.
                    let s = s.split_once(";base64,").map(|(_, b)| b).unwrap_or(&s);
                    let decoded = base64::engine::general_purpose::STANDARD
                        .decode(s.trim())
                        .map_err(|e| ApiError::bad_request(format!("`image` is not valid base64: {e}")))?;
                    image = Some(Bytes::from(decoded));
                } else if k == "reference_image" || k == "reference_images" {
                    let list: Vec<String> = match json_string(v) {
                        Some(one) => vec![one.into_owned()],
                        None => serde_json::from_str(v.get()).map_err(|_| ApiError::bad_request(format!("`{k}` must be a base64 string or a list of them")))?,
                    };
                    for (i, s) in list.iter().enumerate() {
                        let name = if list.len() == 1 { format!("`{k}`") } else { format!("`{k}`[{i}]") };
                        let bytes = base64_image(s, &name)?;
                        let n = references.len();
                        references.push(reference(name, bytes, n)?);
                    }
                } else {
                    body_opts.set_json_text(&k, v).map_err(ApiError::from)?;
                }
            }
            options.merge(body_opts);
            (image.ok_or_else(|| ApiError::bad_request("the JSON body has no `image` member"))?, references)
        }
        ct if ct.starts_with("image/") || ct == "application/octet-stream" => (body_bytes(req.into_body(), body_limit).await?, vec![]),
        "" => return Err(ApiError::unsupported_media_type("no Content-Type; send multipart/form-data, application/json or image/*")),
        other => {
            return Err(ApiError::unsupported_media_type(format!(
                "Content-Type `{other}` is not supported; send multipart/form-data, application/json or image/*"
            )));
        }
    };
    if image.is_empty() {
        return Err(ApiError::bad_request("the image is empty"));
    }
    Ok(Upload { image, references, options })
}
