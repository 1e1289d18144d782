//! A real camserve on 127.0.0.1:0 for integration tests, and OpenAPI response validation.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use camserve::config::Config;
use serde_json::Value;
use tokio::sync::oneshot;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The default configuration (the demo model) with absolute paths.
pub fn demo_config() -> Config {
    let mut c = Config::default();
    c.models.retain(|m| m.name == "demo");
    c.models[0].path = root().join("models/demo.onnx");
    c.models[0].labels = Some(root().join("models/demo.labels.txt"));
    c.server.bind = "127.0.0.1:0".into();
    c.runtime.device = camserve::backend::engine::DeviceChoice::Cpu;
    c.runtime.threads = 1;
    c
}

/// The demo model plus the tiny ViT fixture (tests/fixtures/models/vit.onnx, 32x32, no labels) as `vit`.
pub fn demo_and_vit_config() -> Config {
    let mut c = demo_config();
    let mut vit = c.models[0].clone();
    vit.name = "vit".into();
    vit.path = root().join("tests/fixtures/models/vit.onnx");
    vit.labels = None;
    c.models.push(vit);
    c
}

pub struct Server {
    pub addr: SocketAddr,
    pub client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Server {
    pub async fn start(config: Config) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let mut config = config;
        // Tests stop servers often: no drain delay unless a test asks for one.
        if config.server.drain_delay_ms == camserve::config::Config::default().server.drain_delay_ms {
            config.server.drain_delay_ms = 0;
        }
        let task = tokio::spawn(camserve::server::serve_on(listener, config, async {
            let _ = rx.await;
        }));
        let client = reqwest::Client::new();
        let server = Server { addr, client, stop: Some(tx), task: Some(task) };
        // Up to 2 minutes: a debug build rewrites and warms a ResNet-50-sized segmenter (tests/segmentation.rs) in
        // tens of seconds on two busy cores.
        for _ in 0..6000 {
            if let Ok(r) = server.client.get(server.url("/readyz")).send().await
                && r.status() == 200 {
                    return server;
                }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the server did not become ready");
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Sends the shutdown signal (if not sent yet) and waits for the server to exit.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.task.take().expect("stopped twice").await.unwrap()
    }

    pub fn signal_stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

pub fn image_bytes(name: &str) -> Vec<u8> {
    std::fs::read(root().join("tests/data/shapes").join(name)).unwrap()
}

/// The OpenAPI document as JSON.
pub fn openapi() -> Value {
    let text = std::fs::read_to_string(root().join("openapi.yaml")).unwrap();
    let yaml: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
    serde_json::to_value(yaml).unwrap()
}

fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    match v.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let mut cur = doc;
            for part in r.trim_start_matches("#/").split('/') {
                cur = &cur[part];
            }
            cur
        }
        None => v,
    }
}

/// Validates a response body against the document's schema for (path template, method, status, content type).
pub fn check_response(path: &str, method: &str, status: u16, content_type: &str, body: &Value) {
    let doc = openapi();
    let op = &doc["paths"][path][method];
    assert!(op.is_object(), "openapi.yaml has no {method} {path}");
    let responses = &op["responses"];
    let resp = responses.get(status.to_string()).unwrap_or_else(|| panic!("openapi.yaml: {method} {path} does not document status {status}"));
    let resp = resolve(&doc, resp);
    let ct = content_type.split(';').next().unwrap().trim();
    let schema = resp["content"].get(ct).unwrap_or_else(|| panic!("openapi.yaml: {method} {path} {status} has no {ct} content"));
    let mut root = schema["schema"].clone();
    root.as_object_mut().unwrap().insert("components".into(), doc["components"].clone());
    let validator = jsonschema::validator_for(&root).expect("a valid schema");
    let errors: Vec<String> = validator.iter_errors(body).map(|e| format!("{} at {}", e, e.instance_path())).collect();
    assert!(errors.is_empty(), "{method} {path} {status}: response does not match openapi.yaml:\n{}\n{body:#}", errors.join("\n"));
}
