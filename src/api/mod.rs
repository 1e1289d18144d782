//! The HTTP API (docs/DESIGN.md §5): the router, the request forms (upload.rs), problem+json errors (error.rs),
//! API keys, CORS and the request metrics. Each protocol is an encoder of the core's typed answer, one file each:
//! API v1 (v1.rs), the Open Inference Protocol (oip.rs, its tensors in oip_tensors.rs), KServe v1 (kserve.rs).
//!
//! `app()` builds the router from an [`AppState`]; tests drive it with `oneshot` against a stand-in backend
//! (tests/api.rs) or bind 127.0.0.1:0 with real models. The listener, signals and drain are `crate::server`,
//! model loading `crate::core::loading`.

pub mod error;
pub mod jobs;
pub mod kserve;
pub mod oip;
mod oip_tensors;
mod routes;
pub mod upload;
pub mod v1;

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue, Method as HttpMethod};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::core::pipeline::Service;
use error::ApiError;

#[derive(Clone)]
pub struct AppState {
    pub service: Arc<Service>,
    pub metrics: PrometheusHandle,
    pub api_keys: Arc<crate::config::ApiKeys>,
    /// Operational routes open without a key: "healthz", "readyz", "metrics".
    pub open_endpoints: Arc<Vec<String>>,
    pub body_limit: usize,
    /// How long the body may take to arrive (408 after).
    pub body_timeout: Duration,
    /// The asynchronous jobs (`Prefer: respond-async`).
    pub jobs: Arc<crate::core::jobs::Jobs>,
}

/// The process-wide Prometheus recorder (installed on first use).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0])
                .expect("static buckets. This is a bug.")
                .build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics may be empty");
            }
            handle
        })
        .clone()
}

pub fn app(state: AppState, cors_origins: &[String]) -> Router {
    let v1 = Router::new()
        .route("/v1/models", get(routes::list_models))
        // A POST here is KServe's v1 `{model}:predict` / `{model}:explain` (oip.rs).
        .route("/v1/models/{model}", get(routes::get_model).post(kserve::infer))
        .route("/v1/models/{model}/predict", post(routes::predict))
        .route("/v1/models/{model}/explain", post(routes::explain))
        .route("/v1/jobs/{id}", get(jobs::get_job).delete(jobs::cancel_job))
        .route("/v1/jobs/{id}/events", get(jobs::job_events))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_api_key));
    // The Open Inference Protocol (oip.rs): health and metadata, and infer, behind the same keys as /v1.
    let v2 = Router::new()
        .route("/v2", get(oip::server_metadata))
        .route("/v2/models/{model}", get(oip::model_metadata))
        .route("/v2/models/{model}/versions/{version}", get(oip::model_metadata))
        .route("/v2/models/{model}/ready", get(oip::model_ready))
        .route("/v2/models/{model}/versions/{version}/ready", get(oip::model_ready))
        .route("/v2/models/{model}/infer", post(oip::infer))
        .route("/v2/models/{model}/versions/{version}/infer", post(oip::infer))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_api_key));
    // Operational routes are open unless configured otherwise; the protocol's health routes follow healthz and
    // readyz (a refusal in its error form).
    let mut ops = Router::new();
    for (name, route) in [
        ("healthz", get(routes::healthz)),
        ("readyz", get(routes::readyz)),
        ("metrics", get(routes::metrics)),
    ] {
        let path = format!("/{name}");
        ops = if state.open_endpoints.iter().any(|e| e == name) {
            ops.route(&path, route)
        } else {
            ops.route(&path, route.route_layer(middleware::from_fn_with_state(state.clone(), require_api_key)))
        };
    }
    for (name, path, route) in [("healthz", "/v2/health/live", get(oip::live)), ("readyz", "/v2/health/ready", get(oip::ready))] {
        ops = if state.open_endpoints.iter().any(|e| e == name) {
            ops.route(path, route)
        } else {
            ops.route(path, route.route_layer(middleware::from_fn_with_state(state.clone(), require_api_key)))
        };
    }
    let mut router = Router::new()
        .route("/", get(routes::page))
        .route("/examples/{name}", get(routes::example))
        .route("/openapi.yaml", get(routes::openapi))
        .merge(ops)
        .merge(v1)
        .merge(v2)
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        // The body limit is enforced while reading (413 problem+json); the default 2 MB limit would cut it.
        .layer(axum::extract::DefaultBodyLimit::max(state.body_limit))
        .layer(error::catch_panics())
        .layer(middleware::from_fn(record_request))
        .with_state(state);
    if !cors_origins.is_empty() {
        let origins = if cors_origins.iter().any(|o| o == "*") {
            AllowOrigin::any()
        } else {
            AllowOrigin::list(cors_origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
        };
        router = router.layer(
            CorsLayer::new()
                .allow_origin(origins)
                .allow_methods([HttpMethod::GET, HttpMethod::POST, HttpMethod::DELETE, HttpMethod::OPTIONS])
                .allow_headers([header::CONTENT_TYPE, header::AUTHORIZATION, "x-api-key".parse().expect("static header name. This is a bug."), "prefer".parse().expect("static header name. This is a bug.")])
                .expose_headers([header::LOCATION, "preference-applied".parse().expect("static header name. This is a bug.")])
                .max_age(Duration::from_secs(3600)),
        );
    }
    router
}

/// The request's `x-request-id` (kept if the client sent a sane one, else made here), echoed in the response;
/// requests by route and status and their duration as metrics; one log line per request with the timings.
async fn record_request(mut req: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_string()).unwrap_or_else(|| "unmatched".into());
    let method = req.method().to_string();
    // The metrics label takes the standard methods only: a client inventing methods (`FOO /`) must not mint series.
    let method_label = metric_method(req.method());
    let path = req.uri().path().to_string();
    let request_id = req
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(new_request_id);
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        req.headers_mut().insert(REQUEST_ID, v);
    }
    let mut res = next.run(req).await;
    let status = res.status().as_u16();
    let elapsed = started.elapsed();
    metrics::counter!("camserve_http_requests_total", "route" => route.clone(), "method" => method_label, "status" => status.to_string()).increment(1);
    metrics::histogram!("camserve_http_request_duration_seconds", "route" => route).record(elapsed.as_secs_f64());
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        res.headers_mut().insert(REQUEST_ID, v);
    }
    let ms = elapsed.as_secs_f64() * 1000.0;
    match res.extensions().get::<crate::core::answer::Timings>() {
        Some(t) => tracing::info!(request_id, method, path, status, ms, queue_ms = t.queue, decode_ms = t.decode,
            inference_ms = t.inference, explain_ms = t.explain, render_ms = t.render, "request"),
        None => tracing::info!(request_id, method, path, status, ms, "request"),
    }
    res
}

const REQUEST_ID: &str = "x-request-id";

/// The `method` label of the request metrics: one of the nine standard methods, or `other`.
fn metric_method(m: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

/// A process-unique id: start time and a counter, hex.
fn new_request_id() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    static START: OnceLock<u64> = OnceLock::new();
    let start = *START.get_or_init(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
    });
    format!("{start:016x}-{:08x}", NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
}

/// The one API-key check: with keys configured, a route behind it needs `Authorization: Bearer <key>` or
/// `X-API-Key: <key>` (compared in constant time). The refusal is 401 in the protocol's own error form: OIP's
/// `{"error"}` under /v2, problem+json elsewhere.
async fn require_api_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if key_accepted(&state, req.headers()) {
        return next.run(req).await;
    }
    if req.uri().path().starts_with("/v2") { oip::OipError(ApiError::unauthorized()).into_response() } else { ApiError::unauthorized().into_response() }
}

/// The API key a request presents: `Authorization: Bearer <key>`, else `X-API-Key`.
fn presented_key(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))
        .map(str::trim)
}

/// True when no keys are configured, or the request presents one of them (compared in constant time).
fn key_accepted(state: &AppState, headers: &axum::http::HeaderMap) -> bool {
    if state.api_keys.0.is_empty() {
        return true;
    }
    presented_key(headers).is_some_and(|p| {
        use subtle::ConstantTimeEq;
        state.api_keys.0.iter().fold(false, |acc, k| acc | bool::from(k.as_bytes().ct_eq(p.as_bytes())))
    })
}
