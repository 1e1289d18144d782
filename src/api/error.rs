//! Errors as RFC 9457 problem details (`application/problem+json`).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::error::ServiceError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub detail: String,
    pub retry_after: Option<u64>,
}

#[derive(Serialize)]
struct Problem<'a> {
    r#type: String,
    title: &'a str,
    status: u16,
    detail: &'a str,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, detail: impl Into<String>) -> Self {
        ApiError { status, kind, detail: detail.into(), retry_after: None }
    }

    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad-request", detail)
    }

    pub fn unsupported_media_type(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported-media-type", detail)
    }

    pub fn too_large(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "too-large", detail)
    }

    pub fn unauthorized() -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", "a valid API key is required (Authorization: Bearer <key> or X-API-Key)")
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not-found", detail)
    }
}

/// Defence in depth: a handler that panics (a bug; request data must never make one) answers 500 problem+json,
/// logged with its message, and the connection and the server carry on.
pub fn catch_panics() -> tower_http::catch_panic::CatchPanicLayer<fn(Box<dyn std::any::Any + Send>) -> Response> {
    fn on_panic(payload: Box<dyn std::any::Any + Send>) -> Response {
        tracing::error!("request handler panicked: {}", crate::error::panic_message(&*payload));
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "the server failed while handling this request").into_response()
    }
    tower_http::catch_panic::CatchPanicLayer::custom(on_panic as fn(Box<dyn std::any::Any + Send>) -> Response)
}

/// The one mapping of the serving half's errors to statuses (problem+json and OIP's error form both use it).
impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        ApiError::from(&e)
    }
}

impl ApiError {
    /// The problem+json body, as a value (a failed job's `error`).
    pub fn problem(&self) -> serde_json::Value {
        serde_json::json!({
            "type": format!("urn:camserve:problem:{}", self.kind),
            "title": self.status.canonical_reason().unwrap_or("Error"),
            "status": self.status.as_u16(),
            "detail": self.detail,
        })
    }
}

impl From<&ServiceError> for ApiError {
    fn from(e: &ServiceError) -> Self {
        let detail = e.to_string();
        let (status, kind) = match e {
            ServiceError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad-request"),
            ServiceError::UnknownModel(_) => (StatusCode::NOT_FOUND, "unknown-model"),
            ServiceError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too-large"),
            ServiceError::Unprocessable(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid-option"),
            ServiceError::QueueFull(_) => (StatusCode::TOO_MANY_REQUESTS, "queue-full"),
            ServiceError::Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
            ServiceError::NotReady(_) => (StatusCode::SERVICE_UNAVAILABLE, "not-ready"),
            ServiceError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        let mut err = ApiError::new(status, kind, detail);
        if status == StatusCode::TOO_MANY_REQUESTS {
            err.retry_after = Some(1);
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            err.retry_after = Some(5);
        }
        err
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(status = self.status.as_u16(), kind = self.kind, detail = %self.detail, "request failed");
        }
        metrics::counter!("camserve_errors_total", "kind" => self.kind).increment(1);
        let body = Problem {
            r#type: format!("urn:camserve:problem:{}", self.kind),
            title: self.status.canonical_reason().unwrap_or("Error"),
            status: self.status.as_u16(),
            detail: &self.detail,
        };
        let mut res = (self.status, axum::Json(body)).into_response();
        res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        if let Some(s) = self.retry_after {
            res.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        res
    }
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use axum::routing::get;
    use tower::ServiceExt;

    use super::*;

    async fn boom() -> &'static str {
        panic!("boom")
    }

    #[tokio::test]
    async fn a_panicking_handler_answers_500_problem_json() {
        let app = axum::Router::new()
            .route("/boom", get(boom))
            .route("/fine", get(|| async { "fine" }))
            .layer(catch_panics());
        let res = app.clone().oneshot(Request::get("/boom").body(Body::empty()).unwrap()).await.unwrap();
        assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(res.headers()[header::CONTENT_TYPE], "application/problem+json");
        let body = axum::body::to_bytes(res.into_body(), 1 << 16).await.unwrap();
        let problem: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(problem["status"], 500);
        assert!(problem["type"].as_str().unwrap().ends_with("internal"), "{problem}");
        let res = app.oneshot(Request::get("/fine").body(Body::empty()).unwrap()).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }
}
