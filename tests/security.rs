//! What a request can reach (docs/SECURITY.md): path traversal, request-head limits, the size of multipart and
//! JSON bodies' structure, API keys in logs, the metrics' label cardinality, CORS preflight with and without keys.
//! Raw TCP where an HTTP client would normalise the request (`..` in paths, oversized heads).

#[path = "support/server.rs"]
mod server;
#[path = "support/process.rs"]
mod process;

use std::sync::{Arc, Mutex};

use reqwest::multipart::{Form, Part};
use serde_json::Value;
use server::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends `head` (request line and headers, without the final blank line) as written, and returns the status and
/// the whole response text.
async fn raw(s: &Server, head: &str) -> (u16, String) {
    let mut conn = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let req = format!("{head}\r\nhost: test\r\nconnection: close\r\n\r\n");
    // A server may answer and close before reading all of an oversized head; a failed write is then expected.
    let _ = conn.write_all(req.as_bytes()).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), conn.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("no status line for {:.80}: {text:?}", head));
    (status, text)
}

#[tokio::test]
async fn no_path_reaches_the_filesystem() {
    let s = Server::start(demo_config()).await;
    let (st, _) = raw(&s, "GET /examples/chelsea.jpg HTTP/1.1").await;
    assert_eq!(st, 200, "the control: a bundled example is served");
    let paths = [
        "/examples/../Cargo.toml",
        "/examples/..%2fCargo.toml",
        "/examples/%2e%2e%2fCargo.toml",
        "/examples/%2E%2E%2FCargo.toml",
        "/examples/%252e%252e%252fCargo.toml",
        "/examples/..%252fCargo.toml",
        "/examples/..%5cCargo.toml",
        "/examples/..\\Cargo.toml",
        "/examples/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/examples/../../../../../../etc/passwd",
        "/examples/%2fetc%2fpasswd",
        "/examples//etc/passwd",
        "/examples/chelsea.jpg%00.txt",
        "/examples/chelsea.jpg/../../Cargo.toml",
        "/examples/..%c0%afCargo.toml",
        "/%2e%2e/Cargo.toml",
        "/openapi.yaml/../Cargo.toml",
        "/../../../../etc/passwd",
        "/static/../../Cargo.toml",
        "/models/demo.onnx",
        "/v1/models/..%2f..%2fCargo.toml",
        "/v1/models/%2e%2e%2f%2e%2e%2fmodels%2fdemo/explain",
    ];
    for p in paths {
        let (st, text) = raw(&s, &format!("GET {p} HTTP/1.1")).await;
        assert!(st == 404 || st == 400 || st == 405, "{p}: status {st}");
        // Cargo.toml, /etc/passwd and an ONNX file's producer name: none may come back.
        assert!(!text.contains("[package]") && !text.contains("root:") && !text.contains("pytorch"), "{p}: leaked a file: {text:.300}");
        if st == 404 {
            assert!(text.contains("application/problem+json"), "{p}: {text:.300}");
        }
    }
    // Model names come from the configuration only: a traversal-shaped name is an unknown model.
    let (st, text) = raw(&s, "POST /v1/models/..%2f..%2fmodels%2fdemo.onnx/explain HTTP/1.1\r\ncontent-length: 0").await;
    assert_eq!(st, 404, "{text}");
    assert!(text.contains("unknown-model") || text.contains("no model"), "{text}");
}

#[tokio::test]
async fn request_head_limits() {
    let s = Server::start(demo_config()).await;
    // A URI over hyper's 65,534-byte limit: 414.
    let (st, _) = raw(&s, &format!("GET /healthz?{} HTTP/1.1", "a".repeat(70_000))).await;
    assert_eq!(st, 414);
    // One more header line than MAX_HEADERS: 431.
    let many: String = (0..camserve::server::MAX_HEADERS + 1).map(|i| format!("x-h{i}: v\r\n")).collect();
    let (st, _) = raw(&s, &format!("GET /healthz HTTP/1.1\r\n{}", many.trim_end())).await;
    assert_eq!(st, 431);
    // A head over MAX_HEAD_BYTES (one long header): 431. hyper compares its buffer with the limit between reads,
    // so a head can pass the limit by part of one read; 128 KiB is refused.
    let (st, _) = raw(&s, &format!("GET /healthz HTTP/1.1\r\nx-big: {}", "b".repeat(128 * 1024))).await;
    assert_eq!(st, 431);
    // Just inside the limits is served.
    let fits: String = (0..camserve::server::MAX_HEADERS - 3).map(|i| format!("x-h{i}: v\r\n")).collect();
    let (st, _) = raw(&s, &format!("GET /healthz HTTP/1.1\r\n{}", fits.trim_end())).await;
    assert_eq!(st, 200);
    let (st, _) = raw(&s, &format!("GET /healthz?{} HTTP/1.1", "a".repeat(60_000))).await;
    assert_eq!(st, 200);
    // And the server goes on serving.
    assert_eq!(s.client.get(s.url("/healthz")).send().await.unwrap().status(), 200);
}

async fn problem(r: reqwest::Response) -> (u16, String) {
    let st = r.status().as_u16();
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let v: Value = r.json().await.unwrap();
    (st, v["detail"].as_str().unwrap_or_default().to_string())
}

#[tokio::test]
async fn multipart_parts_and_json_members_are_bounded() {
    use camserve::api::upload::MAX_PARTS;
    use camserve::core::options::{MAX_JSON_MEMBERS, MAX_OPTION_BYTES};
    let s = Server::start(demo_config()).await;
    let url = s.url("/v1/models/demo/explain?outputs=raw");
    let jpg = image_bytes("010.jpg");
    let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &jpg);
    // At the limit: the image and MAX_PARTS - 1 repeated text parts are accepted.
    let mut form = Form::new().part("image", Part::bytes(jpg.clone()));
    for _ in 0..MAX_PARTS - 1 {
        form = form.text("top_k", "1");
    }
    assert_eq!(s.client.post(&url).multipart(form).send().await.unwrap().status(), 200);
    // One more part: 400 naming the limit.
    let mut form = Form::new().part("image", Part::bytes(jpg.clone()));
    for _ in 0..MAX_PARTS {
        form = form.text("top_k", "1");
    }
    let (st, detail) = problem(s.client.post(&url).multipart(form).send().await.unwrap()).await;
    assert_eq!((st, detail.contains(&format!("more than {MAX_PARTS} parts"))), (400, true), "{detail}");
    // 100,000 empty parts (2 MB) are refused at the first one over the limit.
    let body = format!("{}--b--\r\n", "--b\r\ncontent-disposition: form-data; name=\"top_k\"\r\n\r\n1\r\n".repeat(100_000));
    let r = s.client.post(&url).header("content-type", "multipart/form-data; boundary=b").body(body).send().await.unwrap();
    assert_eq!(problem(r).await.0, 400);
    // A text part over MAX_OPTION_BYTES: 400.
    let form = Form::new().part("image", Part::bytes(jpg.clone())).text("methods", "gradcam,".repeat(MAX_OPTION_BYTES / 8 + 1));
    let (st, detail) = problem(s.client.post(&url).multipart(form).send().await.unwrap()).await;
    assert_eq!((st, detail.contains(&format!("at most {MAX_OPTION_BYTES}"))), (400, true), "{detail}");

    // JSON: the image and MAX_JSON_MEMBERS - 1 repeated members are accepted; one more is refused.
    let members = |n: usize| (0..n).map(|_| "\"top_k\": 1".to_string()).collect::<Vec<_>>().join(", ");
    let ok = format!("{{\"image\": \"{b64}\", {}}}", members(MAX_JSON_MEMBERS - 1));
    let r = s.client.post(&url).header("content-type", "application/json").body(ok).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let over = format!("{{\"image\": \"{b64}\", {}}}", members(MAX_JSON_MEMBERS));
    let (st, detail) = problem(s.client.post(&url).header("content-type", "application/json").body(over).send().await.unwrap()).await;
    assert_eq!((st, detail.contains(&format!("more than {MAX_JSON_MEMBERS} members"))), (400, true), "{detail}");
    // A million distinct keys (14 MB) are refused without being built into a map.
    let million: String = (0..1_000_000).map(|i| format!("\"k{i}\":0,")).collect();
    let body = format!("{{{}\"image\": \"\"}}", million);
    let (st, detail) = problem(s.client.post(&url).header("content-type", "application/json").body(body).send().await.unwrap()).await;
    assert_eq!((st, detail.contains("members")), (400, true), "{detail}");
    // A JSON option over MAX_OPTION_BYTES (a list of 100,000 targets): 400 before it is parsed.
    let targets = format!("[{}]", vec!["1"; 100_000].join(","));
    let body = format!("{{\"image\": \"{b64}\", \"target\": {targets}}}");
    let (st, detail) = problem(s.client.post(&url).header("content-type", "application/json").body(body).send().await.unwrap()).await;
    assert_eq!((st, detail.contains("option `target`")), (400, true), "{detail}");
    // The same limits hold for the multipart `options` part.
    let form = Form::new().part("image", Part::bytes(jpg.clone())).text("options", format!("{{{}}}", members(MAX_JSON_MEMBERS + 1)));
    let (st, detail) = problem(s.client.post(&url).multipart(form).send().await.unwrap()).await;
    assert_eq!((st, detail.contains("members")), (400, true), "{detail}");
}

/// Lines that tracing writes, kept for inspection (installed once per test process).
fn captured_log() -> Arc<Mutex<Vec<u8>>> {
    static LOG: std::sync::OnceLock<Arc<Mutex<Vec<u8>>>> = std::sync::OnceLock::new();
    LOG.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = buf.clone();
        let make = move || Writer(sink.clone());
        tracing::subscriber::set_global_default(
            tracing_subscriber::fmt().with_max_level(tracing::Level::TRACE).with_writer(make).with_ansi(false).finish(),
        )
        .expect("the first subscriber of this test process");
        buf
    })
    .clone()
}

struct Writer(Arc<Mutex<Vec<u8>>>);
impl std::io::Write for Writer {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

const KEY: &str = "k3y-NEVER-IN-A-LOG-7f3a";
const WRONG: &str = "wr0ng-NEVER-IN-A-LOG-91c2";

/// Requests to `model` with the right and a wrong key in both headers: 200, 422, 404 and 401 answers.
async fn exercise_keys(base: &str, model: &str) {
    let c = reqwest::Client::new();
    let jpg = image_bytes("010.jpg");
    let explain = format!("{base}/v1/models/{model}/explain?outputs=raw");
    for (h, v) in [("authorization", format!("Bearer {KEY}")), ("x-api-key", KEY.to_string())] {
        assert_eq!(c.post(&explain).header(h, &v).header("content-type", "image/jpeg").body(jpg.clone()).send().await.unwrap().status(), 200);
        assert_eq!(c.post(format!("{explain}&methods=nope")).header(h, &v).header("content-type", "image/jpeg").body(jpg.clone()).send().await.unwrap().status(), 422);
        assert_eq!(c.get(format!("{base}/v1/models/nosuch")).header(h, &v).send().await.unwrap().status(), 404);
    }
    for (h, v) in [("authorization", format!("Bearer {WRONG}")), ("x-api-key", WRONG.to_string())] {
        let r = c.post(&explain).header(h, &v).header("content-type", "image/jpeg").body(jpg.clone()).send().await.unwrap();
        assert_eq!(r.status(), 401);
        let text = r.text().await.unwrap();
        assert!(!text.contains(WRONG), "the 401 echoes the presented key: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_are_never_logged() {
    let log = captured_log();
    let mut config = demo_config();
    config.server.api_keys = vec![KEY.to_string()].into();
    // A model name of its own: the injected panic below must not hit another test's request.
    config.models[0].name = "keyed".into();
    // The configuration's Debug (what a panic or a debug log would print) names no key.
    let dbg = format!("{config:?}");
    assert!(!dbg.contains(KEY) && dbg.contains("ApiKeys(1 redacted)"), "{dbg}");
    let mut s = Server::start(config).await;
    exercise_keys(&s.url(""), "keyed").await;
    // A panic inside a batch: logged as an error, answered 500, and the key is not in the log.
    camserve::backend::batcher::test_hooks::panic_next_batch("keyed");
    let r = s.client.post(s.url("/v1/models/keyed/explain")).bearer_auth(KEY).header("content-type", "image/jpeg")
        .body(image_bytes("010.jpg")).send().await.unwrap();
    assert_eq!(r.status(), 500);
    s.stop().await.unwrap();
    let text = String::from_utf8_lossy(&log.lock().unwrap()).to_string();
    assert!(text.contains("inference panicked"), "the capture works: the panic's log line is there");
    assert!(text.contains("TRACE") || text.contains("DEBUG"), "the capture runs at trace level");
    assert!(!text.contains(KEY) && !text.contains(WRONG), "a key reached the log");

    // The real binary, at trace level for every crate, configured with the key from a file and in the config.
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::write(&keys, format!("{KEY}-file\n")).unwrap();
    let p = process::Process::start_logging(&format!("api_keys = [\"{KEY}\"]\napi_keys_file = \"{}\"", keys.display()), "trace").await;
    exercise_keys(&p.base, "demo").await;
    let text = p.log_text();
    assert!(text.contains("TRACE") && text.contains("request"), "trace logging is on: {:.500}", text);
    assert!(!text.contains(KEY) && !text.contains(WRONG), "a key reached the binary's log");
}

#[tokio::test]
async fn metrics_label_cardinality_is_bounded() {
    let s = Server::start(demo_config()).await;
    let c = &s.client;
    for i in 0..20 {
        let m = reqwest::Method::from_bytes(format!("MINTED{i}").as_bytes()).unwrap();
        c.request(m, s.url("/healthz")).send().await.unwrap();
        c.get(s.url(&format!("/minted-path-{i}"))).send().await.unwrap();
        c.post(s.url(&format!("/v1/models/minted-model-{i}/explain"))).header("content-type", "image/jpeg").body(vec![1u8; 10]).send().await.unwrap();
        c.post(s.url(&format!("/v1/models/demo/explain?methods=minted-method-{i}"))).header("content-type", "image/jpeg")
            .body(image_bytes("010.jpg")).send().await.unwrap();
        c.get(s.url(&format!("/v1/models/demo?minted-query-{i}=1"))).header("x-request-id", format!("minted-id-{i}")).send().await.unwrap();
    }
    let text = c.get(s.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(!text.contains("minted") && !text.contains("MINTED"), "a request minted a label value:\n{text}");
    let series: Vec<&str> = text.lines().filter(|l| l.starts_with("camserve_http_requests_total{")).collect();
    let label = |line: &str, k: &str| line.split(&format!("{k}=\"")).nth(1).and_then(|r| r.split('"').next()).unwrap_or("").to_string();
    for line in &series {
        let method = label(line, "method");
        assert!(["GET", "POST", "HEAD", "OPTIONS", "PUT", "DELETE", "PATCH", "CONNECT", "TRACE", "other"].contains(&method.as_str()), "{line}");
        let route = label(line, "route");
        assert!(route == "unmatched" || route == "/" || route.starts_with("/v1/") || route.starts_with("/examples/")
            || ["/healthz", "/readyz", "/metrics", "/openapi.yaml"].contains(&route.as_str()), "{line}");
    }
    assert!(series.iter().any(|l| label(l, "method") == "other"), "the invented methods are counted as `other`");
    assert!(series.iter().any(|l| label(l, "route") == "unmatched"), "unknown paths are counted as `unmatched`");
}

#[tokio::test]
async fn cors_preflight_with_and_without_keys() {
    let origin = "https://app.example.com";
    let preflight = |s: &Server| {
        s.client.request(reqwest::Method::OPTIONS, s.url("/v1/models/demo/explain")).header("origin", origin)
            .header("access-control-request-method", "POST").header("access-control-request-headers", "content-type,authorization,x-api-key")
            .send()
    };
    for keys in [vec![], vec![KEY.to_string()]] {
        let mut config = demo_config();
        config.server.cors_origins = vec![origin.into()];
        config.server.api_keys = keys.clone().into();
        let s = Server::start(config).await;
        // The preflight carries no key (browsers never send credentials on it) and is answered either way.
        let pre = preflight(&s).await.unwrap();
        assert!(pre.status().is_success(), "keys {keys:?}: {}", pre.status());
        assert_eq!(pre.headers()["access-control-allow-origin"], origin);
        let allowed = pre.headers()["access-control-allow-headers"].to_str().unwrap().to_ascii_lowercase();
        assert!(allowed.contains("authorization") && allowed.contains("x-api-key") && allowed.contains("content-type"), "{allowed}");
        assert!(pre.headers()["access-control-allow-methods"].to_str().unwrap().contains("POST"));
        // The request itself: without a key 401 when keys are set, with CORS headers so the page can read why.
        let r = s.client.get(s.url("/v1/models")).header("origin", origin).send().await.unwrap();
        assert_eq!(r.headers()["access-control-allow-origin"], origin);
        assert_eq!(r.status(), if keys.is_empty() { 200 } else { 401 });
        if !keys.is_empty() {
            let r = s.client.get(s.url("/v1/models")).header("origin", origin).header("x-api-key", KEY).send().await.unwrap();
            assert_eq!((r.status().as_u16(), r.headers()["access-control-allow-origin"].to_str().unwrap()), (200, origin));
        }
        // Another origin gets no CORS grant.
        let r = s.client.request(reqwest::Method::OPTIONS, s.url("/v1/models")).header("origin", "https://evil.example.com")
            .header("access-control-request-method", "GET").send().await.unwrap();
        assert!(r.headers().get("access-control-allow-origin").is_none());
    }
    // Without `cors_origins`, no CORS at all: the preflight is a 405 problem with no grant.
    let s = Server::start(demo_config()).await;
    let pre = preflight(&s).await.unwrap();
    assert_eq!(pre.status(), 405);
    assert!(pre.headers().get("access-control-allow-origin").is_none());
    assert_eq!(problem(pre).await.0, 405);
}

#[test]
fn json_member_limit_is_checked_while_parsing() {
    use camserve::core::options::{json_members, MAX_JSON_MEMBERS};
    let ok = format!("{{{}}}", (0..MAX_JSON_MEMBERS).map(|i| format!("\"k{i}\": [1, {{\"a\": 2}}]")).collect::<Vec<_>>().join(","));
    let m = json_members(ok.as_bytes()).unwrap();
    assert_eq!(m.len(), MAX_JSON_MEMBERS);
    assert_eq!(m[3].1.get(), "[1, {\"a\": 2}]", "values are kept as their JSON text");
    // The member after the limit is refused even when the rest of the text is not JSON at all: parsing stopped.
    let over = format!("{{{}, \"k\": 1, garbage", (0..MAX_JSON_MEMBERS).map(|i| format!("\"k{i}\": 0")).collect::<Vec<_>>().join(","));
    assert!(json_members(over.as_bytes()).unwrap_err().contains(&format!("more than {MAX_JSON_MEMBERS} members")));
    assert!(json_members(b"[1]").unwrap_err().contains("must be a JSON object"));
    assert!(json_members(b"{\"a\": ").unwrap_err().contains("not valid JSON"));
}
