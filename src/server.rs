//! The server around the router: the listener and its connection loop (header-read timeout, head limits),
//! loading the models in the background (readyz 503 until they are warm), SIGTERM/Ctrl-C, and the drain.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;

use crate::api::{app, metrics_handle, AppState};
use crate::config::Config;
use crate::core::pipeline::Service;
use crate::core::loading::{load_models, service_limits};

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
        jobs: Arc::new(crate::core::jobs::Jobs::new(crate::core::jobs::JobLimits {
            timeout: Duration::from_millis(config.jobs.timeout_ms),
            max_running: config.jobs.max_running,
            max_kept: config.jobs.max_kept,
            ttl: Duration::from_millis(config.jobs.ttl_ms),
        })),
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
