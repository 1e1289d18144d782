//! HTTP API v1 (docs/DESIGN.md §5): routes, request parsing, problem+json errors, API keys, CORS, metrics.
//!
//! `app()` builds the router from an [`AppState`] (tests drive it in-process or bind 127.0.0.1:0);
//! `serve()` loads the configured models, warms them and serves until SIGTERM, then drains.

pub mod error;
pub mod oip;
mod routes;
pub mod upload;

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue, Method as HttpMethod};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::batcher::{self, BatcherConfig};
use crate::config::{self, Config};
use crate::engine::{EngineOptions, ModelRunner, ModelSpec, PlanKey};
use crate::onnx::rewrite::ExplainPlan;
use crate::onnx::rules::ReluRule;
use crate::options::OptionLimits;
use crate::preprocess::DecodeLimits;
use crate::service::{ModelHandle, Service, ServiceLimits};
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
        .route("/v1/models/{model}", get(routes::get_model).post(oip::kserve_v1))
        .route("/v1/models/{model}/predict", post(routes::predict))
        .route("/v1/models/{model}/explain", post(routes::explain))
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
        .route_layer(middleware::from_fn_with_state(state.clone(), oip::require_api_key));
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
            ops.route(path, route.route_layer(middleware::from_fn_with_state(state.clone(), oip::require_api_key)))
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
                .allow_methods([HttpMethod::GET, HttpMethod::POST, HttpMethod::OPTIONS])
                .allow_headers([header::CONTENT_TYPE, header::AUTHORIZATION, "x-api-key".parse().expect("static header name. This is a bug.")])
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
    match res.extensions().get::<crate::service::Timings>() {
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

/// With API keys configured, /v1 needs `Authorization: Bearer <key>` or `X-API-Key: <key>` (constant time).
async fn require_api_key(State(state): State<AppState>, req: Request, next: Next) -> Result<Response, ApiError> {
    if key_accepted(&state, req.headers()) { Ok(next.run(req).await) } else { Err(ApiError::unauthorized()) }
}

/// True when no keys are configured, or the request presents one of them (compared in constant time).
pub(crate) fn key_accepted(state: &AppState, headers: &axum::http::HeaderMap) -> bool {
    if state.api_keys.0.is_empty() {
        return true;
    }
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))
        .map(str::trim);
    presented.is_some_and(|p| {
        use subtle::ConstantTimeEq;
        state.api_keys.0.iter().fold(false, |acc, k| acc | bool::from(k.as_bytes().ct_eq(p.as_bytes())))
    })
}

/// Loads, warms and queues every configured model (blocking; call from a blocking thread).
pub fn load_models(config: &Config) -> anyhow::Result<BTreeMap<String, ModelHandle>> {
    let options = EngineOptions {
        device: config.runtime.device,
        intra_threads: config.runtime.threads,
        ort_library: config.runtime.ort_library.clone(),
        cuda_device: config.runtime.cuda_device,
        cpu_arena: config.runtime.cpu_arena,
    };
    let batching = BatcherConfig {
        max_batch: config.batching.max_batch,
        max_wait: Duration::from_millis(config.batching.max_wait_ms),
        queue_capacity: config.batching.queue_capacity,
    };
    let mut models = BTreeMap::new();
    for m in &config.models {
        let started = Instant::now();
        let labels = match &m.labels {
            Some(p) => {
                let p = config::resolve(p);
                Some(config::read_labels(&p).map_err(|e| anyhow::anyhow!("model `{}`: labels {}: {e}", m.name, p.display()))?)
            }
            None => None,
        };
        let spec = ModelSpec {
            name: m.name.clone(),
            path: config::resolve(&m.path),
            labels,
            mean: m.mean,
            std: m.std,
            default_layer: m.default_layer.clone(),
            input_size: m.input_size.map(|[h, w]| (h, w)),
            layout: m.layout,
            pixels: crate::preprocess::PixelFormat {
                channel_order: m.channel_order,
                scale: m.scale,
                resize: m.resize,
                resize_shorter_side: m.resize_shorter_side,
            },
        };
        let mut runner = ModelRunner::load(&spec, &options).map_err(|e| anyhow::anyhow!("model `{}` ({}): {e}", m.name, spec.path.display()))?;
        let info = runner.info();
        // Warm the graphs the default request uses: predict, and Grad-CAM + guided Grad-CAM.
        let mut keys = vec![PlanKey::Predict];
        if info.rules.contains(&ReluRule::Guided) {
            let plan = ExplainPlan::new(info.default_layer.clone(), [ReluRule::Guided]);
            keys.push(PlanKey::Explain(if info.kind == crate::engine::ModelKind::Plain { plan.with_target_selection() } else { plan }));
        }
        runner.warm_up(&keys).map_err(|e| anyhow::anyhow!("model `{}`: warm-up failed: {e}", m.name))?;
        tracing::info!(model = %m.name, device = %info.device, classes = info.num_classes, layer = %info.default_layer,
            seconds = started.elapsed().as_secs_f64(), "model loaded and warmed");
        let queue = batcher::spawn(runner, batching);
        let position = models.len();
        models.insert(m.name.clone(), ModelHandle { info, queue, position, max_batch: batching.max_batch });
    }
    Ok(models)
}

pub fn service_limits(config: &Config) -> ServiceLimits {
    ServiceLimits {
        decode: DecodeLimits { max_pixels: config.server.max_image_pixels, max_dimension: config.server.max_image_dimension },
        options: OptionLimits {
            max_top_k: config.server.max_top_k,
            max_targets: config.server.max_targets,
            max_methods: config.server.max_methods,
            scorecam_max_channels: config.server.scorecam_max_channels,
        },
        request_timeout: Duration::from_millis(config.server.request_timeout_ms),
        max_forward_passes: config.server.max_forward_passes,
    }
}

/// Binds, loads the models in the background (readyz 503 until they are warm), serves until SIGTERM or
/// Ctrl-C, then drains: readyz 503 at once, in-flight requests get `shutdown_grace_ms`.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(&config.server.bind).await?;
    tracing::info!(addr = %listener.local_addr()?, "listening");
    serve_on(listener, config, shutdown_signal()).await
}

pub async fn serve_on(
    listener: tokio::net::TcpListener,
    config: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let service = Arc::new(Service::new(service_limits(&config)));
    let state = AppState {
        service: service.clone(),
        metrics: metrics_handle(),
        api_keys: Arc::new(config.api_keys()?),
        open_endpoints: Arc::new(config.server.open_endpoints.clone()),
        body_limit: config.server.body_limit_bytes,
        body_timeout: Duration::from_millis(config.server.body_timeout_ms),
    };
    let router = app(state, &config.server.cors_origins);
    let grace = Duration::from_millis(config.server.shutdown_grace_ms);
    let drain_delay = Duration::from_millis(config.server.drain_delay_ms);
    let loader = {
        let service = service.clone();
        let config = config.clone();
        tokio::spawn(async move {
            let handle = tokio::runtime::Handle::current();
            let models = tokio::task::spawn_blocking(move || {
                let _guard = handle.enter();
                load_models(&config)
            })
            .await??;
            service.install(models);
            tracing::info!("ready");
            anyhow::Ok(())
        })
    };
    let draining = service.clone();
    let header_timeout = Duration::from_millis(config.server.header_timeout_ms);
    let server = serve_connections(listener, router, header_timeout, async move {
        shutdown.await;
        draining.start_draining();
        tracing::info!(delay_ms = drain_delay.as_millis() as u64, grace_ms = grace.as_millis() as u64, "draining: readyz is 503");
        tokio::time::sleep(drain_delay).await;
        tracing::info!("closing the listener; finishing in-flight requests");
    });
    let mut server = tokio::spawn(server);
    let mut loader = Some(loader);
    // After the signal and the drain delay, in-flight requests get `grace`; then the process exits regardless.
    let deadline = async {
        while !service.is_draining() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(drain_delay + grace).await;
    };
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            res = async { loader.as_mut().expect("guarded by the select condition. This is a bug.").await }, if loader.is_some() => {
                loader = None;
                // A model that fails to load stops the process with its error.
                res??;
            }
            res = &mut server => {
                res??;
                return Ok(());
            }
            _ = &mut deadline => {
                tracing::warn!("grace period over; exiting with requests in flight");
                return Ok(());
            }
        }
    }
}

/// At most this many request header lines (hyper's default, stated here so that it is ours).
pub const MAX_HEADERS: usize = 100;
/// The most bytes of a request head (request line and headers) before 431; also hyper's largest read buffer.
/// hyper compares its buffer with it between reads, so a head may pass it by part of one read before the 431.
/// Above the 65,534-byte URI limit, so that a long URI gets its own 414.
pub const MAX_HEAD_BYTES: usize = 96 * 1024;

/// What `axum::serve(..).with_graceful_shutdown(..)` does (HTTP/1.1 on each accepted connection until `signal`,
/// then no new connections and a wait for the open ones, which the caller bounds), plus a limit on reading a
/// request's headers: a client that opens connections and sends its headers slowly, or not at all, is cut off
/// after `header_timeout` (hyper's timer; it also closes keep-alive connections idle that long).
async fn serve_connections(
    listener: tokio::net::TcpListener,
    router: Router,
    header_timeout: Duration,
    signal: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let mut http = hyper::server::conn::http1::Builder::new();
    // Request-head limits (docs/SECURITY.md): at most MAX_HEADERS header lines and MAX_HEAD_BYTES for the request
    // line and headers together, else 431; hyper answers a URI over 65,534 bytes with 414.
    http.timer(TokioTimer::new()).header_read_timeout(header_timeout).max_headers(MAX_HEADERS).max_buf_size(MAX_HEAD_BYTES);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(signal);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning; the listener stays.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut signal => break,
        };
        let _ = stream.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
