//! Readiness, request ids and graceful shutdown: in process, and the real binary under a real SIGTERM.

#[path = "support/server.rs"]
mod server;
#[path = "support/process.rs"]
mod process;

use std::time::{Duration, Instant};

use process::Process;
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
async fn shutdown_signal_drains_in_flight_requests_then_exits() {
    // In process, the shutdown future standing in for the signal; the real binary and a real SIGTERM are below.
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

/// A real SIGTERM to the real binary, mid-request: readyz turns 503 at once (with Retry-After), the queued
/// request still completes, and the process exits 0 well within the grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_sigterm_mid_request_drains_and_exits_zero() {
    let mut p = Process::start("drain_delay_ms = 300\nshutdown_grace_ms = 10000").await;
    let url = format!("{}/v1/models/demo/explain?methods=gradcam&outputs=raw", p.base);
    let in_flight = tokio::spawn(async move {
        reqwest::Client::new().post(url).header("content-type", "image/jpeg").body(image_bytes("010.jpg")).send().await.map(|r| r.status().as_u16())
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let signalled = Instant::now();
    p.sigterm();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let r = reqwest::get(format!("{}/readyz", p.base)).await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    assert_eq!(in_flight.await.unwrap().unwrap(), 200, "the request in flight at SIGTERM completed");
    let (status, exited) = p.wait(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0), "exit status after SIGTERM");
    assert!(exited - signalled < Duration::from_secs(5), "exited {:?} after SIGTERM", exited - signalled);
}

/// The grace period runs out: a client that stalls mid-body (the body timeout is 30 s) does not hold the
/// process; it exits 0 after drain delay + grace and the stalled connection is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grace_period_running_out_ends_the_process() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut p = Process::start("drain_delay_ms = 100\nshutdown_grace_ms = 700\nbody_timeout_ms = 30000").await;
    let addr = p.base.trim_start_matches("http://").to_string();
    let mut stalled = tokio::net::TcpStream::connect(&addr).await.unwrap();
    stalled
        .write_all(b"POST /v1/models/demo/explain HTTP/1.1\r\nhost: x\r\ncontent-type: image/jpeg\r\ncontent-length: 100000\r\n\r\n\xff\xd8")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let signalled = Instant::now();
    p.sigterm();
    let (status, exited) = p.wait(Duration::from_secs(10)).await;
    let took = exited - signalled;
    assert_eq!(status.code(), Some(0), "exit status when the grace period runs out");
    assert!(took >= Duration::from_millis(750), "exited after {took:?}, before drain delay + grace");
    assert!(took < Duration::from_secs(5), "exited after {took:?}: the stalled upload held the process");
    let mut buf = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(2), stalled.read_to_end(&mut buf)).await;
    assert!(matches!(n, Ok(Ok(_)) | Ok(Err(_))), "the stalled connection is closed with the process");
}

/// The CPU build of ONNX Runtime (`scripts/fetch-ort.sh`), which has no CUDA provider: what every machine without
/// CUDA sees, whatever else the checkout holds (`.ort-gpu/` would be found first).
fn cpu_only_ort() -> String {
    let lib = root().join(".ort/libonnxruntime.so");
    assert!(lib.is_file(), "{} is missing: run scripts/fetch-ort.sh", lib.display());
    lib.display().to_string()
}

/// `device = "cuda"` where CUDA cannot start: the process refuses to start, says why and what to do, exit 1,
/// no panic. (The CUDA image's no-GPU cases, with the real CUDA stack: scripts/container-test.sh.)
#[test]
fn device_cuda_without_cuda_refuses_to_start() {
    let models = root().join("models");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_camserve"))
        .args(["serve", "--device", "cuda", "--bind", "127.0.0.1:0", "--model"])
        .arg(format!("demo={}", models.join("demo.onnx").display()))
        .env("ORT_DYLIB_PATH", cpu_only_ort())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "exit status; stderr:\n{stderr}");
    let error = stderr.lines().find(|l| l.starts_with("error:")).unwrap_or_else(|| panic!("no error line:\n{stderr}"));
    assert!(error.contains("device cuda: CUDA is unavailable ("), "{error}");
    assert!(error.contains("set runtime.device to auto or cpu"), "{error}");
    assert!(!stderr.to_lowercase().contains("panic"), "{stderr}");
}

/// `device = "auto"` where CUDA cannot start: the server runs on the CPU, logs why, and says so in /v1/models.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_auto_without_cuda_runs_on_cpu_and_says_why() {
    let ort = cpu_only_ort();
    let p = Process::start_with("", "info", &["--device", "auto"], &[("ORT_DYLIB_PATH", ort.as_str())]).await;
    let models: serde_json::Value = reqwest::get(format!("{}/v1/models", p.base)).await.unwrap().json().await.unwrap();
    assert_eq!(models["models"][0]["device"], "cpu", "{models}");
    let log = p.log_text();
    let line = log.lines().find(|l| l.contains("device auto: CUDA unavailable, running on cpu")).unwrap_or_else(|| panic!("{log}"));
    // The reason, as ONNX Runtime gives it for its CPU build.
    assert!(line.contains("CUDA execution provider is not enabled in this build"), "the fallback names its reason: {line}");
}
