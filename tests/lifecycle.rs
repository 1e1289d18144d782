//! Readiness, request ids and graceful shutdown.

#[path = "support/server.rs"]
mod server;

use std::time::{Duration, Instant};

use server::*;

#[tokio::test]
async fn request_ids_are_kept_or_made() {
    let mut s = Server::start(demo_config()).await;
    let r = s.client.get(s.url("/healthz")).header("x-request-id", "abc-123").send().await.unwrap();
    assert_eq!(r.headers()["x-request-id"], "abc-123");
    let a = s.client.get(s.url("/healthz")).send().await.unwrap().headers()["x-request-id"].to_str().unwrap().to_string();
    let b = s.client.get(s.url("/healthz")).send().await.unwrap().headers()["x-request-id"].to_str().unwrap().to_string();
    assert!(!a.is_empty() && a != b);
    // A header that is not a sane id is replaced.
    let r = s.client.get(s.url("/healthz")).header("x-request-id", "has space").send().await.unwrap();
    assert_ne!(r.headers()["x-request-id"], "has space");
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_then_exits() {
    let mut config = demo_config();
    config.batching.max_wait_ms = 600; // keeps the request queued while the shutdown starts
    config.batching.max_batch = 64;
    config.server.drain_delay_ms = 300;
    config.server.shutdown_grace_ms = 10_000;
    let mut s = Server::start(config).await;
    let client = s.client.clone();
    let url = s.url("/v1/models/demo/explain?methods=gradcam&outputs=raw");
    let in_flight = tokio::spawn(async move {
        client.post(url).header("content-type", "image/jpeg").body(image_bytes("010.jpg")).send().await.map(|r| r.status().as_u16())
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let started = Instant::now();
    s.signal_stop();
    tokio::time::sleep(Duration::from_millis(50)).await;
    // During the drain delay the server still answers, and readyz says 503.
    let fresh = reqwest::Client::new();
    let r = fresh.get(s.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    assert_eq!(r.headers()["retry-after"], "1", "docs/OPERATIONS.md promises Retry-After on the draining 503");
    assert_eq!(fresh.get(s.url("/healthz")).send().await.unwrap().status(), 200);
    assert_eq!(in_flight.await.unwrap().unwrap(), 200, "the queued request finished");
    s.stop().await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(5), "exited promptly after draining");
    // The listener is closed now.
    assert!(fresh.get(s.url("/healthz")).send().await.is_err());
}
