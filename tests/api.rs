//! The HTTP API driven in process with `oneshot` against a stand-in backend: no ONNX Runtime, no socket, no model
//! file. The stand-in is a real (linear) classifier with exact gradients, so what comes back can be checked
//! against maps computed here independently, while the routes, the request forms, the pipeline, the batcher and
//! the registry's methods all run as they do in the server.
//!
//! The stand-in model: 3 x 8 x 8 input x; its layer A = 2x2 average pooling of x's first two channels (`[2, 4, 4]`);
//! logits y_k = sum_c W[k][c] mean(A_c), a global-average-pool + linear head, so plain CAM is offered. Hence
//! dy/dA_c = W[k][c] / 16 at every cell and dy/dx_c = W[k][c] / 64 at every pixel of channels 0 and 1 (0 for
//! channel 2), for every ReLU rule (there is no ReLU).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use base64::Engine as _;
use http_body_util::BodyExt;
use ndarray::{s, Array2, Array4, Axis};
use serde_json::Value;
use tower::ServiceExt;

use camserve::api::{app, metrics_handle, AppState};
use camserve::backend::batcher::{self, BatcherConfig, Runner};
use camserve::backend::engine::{ranked, Batch, BatchOutput, Device, EngineError, ModelInfo, ModelKind, PlanKey};
use camserve::core::options::OptionLimits;
use camserve::core::pipeline::{ModelHandle, Service, ServiceLimits};
use camserve::onnx::head::LinearHead;
use camserve::onnx::rewrite::{InputLayout, LayerInfo};
use camserve::onnx::rules::ReluRule;
use camserve::preprocess::DecodeLimits;

const W: [[f32; 2]; 4] = [[1.0, 0.5], [-1.0, 2.0], [0.3, -0.7], [2.0, 1.0]];
const LABELS: [&str; 4] = ["alpha", "beta", "gamma", "delta"];
const LAYER: &str = "pool";

#[derive(Clone, Copy)]
enum Behaviour {
    Exact,
    /// Every batch fails as ONNX Runtime would.
    Fail,
    /// Every batch takes this long.
    Slow(Duration),
}

struct StandIn {
    info: Arc<ModelInfo>,
    behaviour: Behaviour,
    /// Rows run, by every plan.
    rows: Arc<AtomicUsize>,
}

fn info() -> ModelInfo {
    let weights = (0..4).flat_map(|k| W[k]).collect();
    ModelInfo {
        name: "standin".into(),
        kind: ModelKind::Plain,
        input_name: "x".into(),
        input_shape: [3, 8, 8],
        num_classes: 4,
        labels: Some(LABELS.iter().map(|l| l.to_string()).collect()),
        layers: vec![LayerInfo::nchw(LAYER, vec![1, 2, 4, 4])],
        default_layer: LAYER.into(),
        rules: ReluRule::ALL.to_vec(),
        device: Device::Cpu,
        mean: [0.0; 3],
        std: [1.0; 3],
        pixels: Default::default(),
        input_layout: InputLayout::Nchw,
        stripped_output_op: None,
        attention: None,
        linear_heads: [(LAYER.to_string(), Ok(Arc::new(LinearHead { weights, classes: 4, channels: 2 })))].into(),
        heads: [(LAYER.to_string(), Ok(()))].into(),
        token_heads: Default::default(),
        output_dims: vec![4],
        metadata: Default::default(),
        batch_fixed: false,
    }
}

/// The layer of a batch of inputs `[N, 3, 8, 8]`: 2x2 average pooling of channels 0 and 1.
fn layer_of(x: &Array4<f32>) -> Array4<f32> {
    let n = x.len_of(Axis(0));
    Array4::from_shape_fn((n, 2, 4, 4), |(i, c, a, b)| x.slice(s![i, c, 2 * a..2 * a + 2, 2 * b..2 * b + 2]).mean().unwrap())
}

fn logits_of(acts: &Array4<f32>) -> Array2<f32> {
    let n = acts.len_of(Axis(0));
    let means = Array2::from_shape_fn((n, 2), |(i, c)| acts.slice(s![i, c, .., ..]).mean().unwrap());
    Array2::from_shape_fn((n, 4), |(i, k)| W[k][0] * means[[i, 0]] + W[k][1] * means[[i, 1]])
}

impl Runner for StandIn {
    fn info(&self) -> Arc<ModelInfo> {
        self.info.clone()
    }

    fn run(&mut self, plan: &PlanKey, batch: &Batch) -> Result<BatchOutput, EngineError> {
        match self.behaviour {
            Behaviour::Fail => return Err(EngineError::Ort("stand-in: the batch failed".into())),
            Behaviour::Slow(d) => std::thread::sleep(d),
            Behaviour::Exact => {}
        }
        let n = batch.images.len_of(Axis(0));
        self.rows.fetch_add(n, Ordering::SeqCst);
        let acts = match plan {
            PlanKey::Head(_) => batch.images.clone(),
            _ => layer_of(&batch.images),
        };
        let logits = logits_of(&acts);
        let mut out = BatchOutput { logits, targets: None, activations: None, gradients: None, input_grads: vec![], attention: vec![] };
        let PlanKey::Explain(p) = plan else { return Ok(out) };
        // The seed over the logits: the ranked class's one-hot, or the batch's own seed row.
        let mut seeds = batch.seeds.clone();
        let mut targets = vec![];
        for i in 0..n {
            let rank = batch.ranks[i];
            if rank >= 0 {
                let class = ranked(out.logits.row(i).iter().copied())[rank as usize];
                seeds.row_mut(i).fill(0.0);
                seeds[[i, class]] = 1.0;
            }
            targets.push(camserve::backend::engine::argmax(seeds.row(i).iter()));
        }
        let dy_dmean = |i: usize, c: usize| (0..4).map(|k| seeds[[i, k]] * W[k][c]).sum::<f32>();
        out.gradients = Some(Array4::from_shape_fn((n, 2, 4, 4), |(i, c, _, _)| dy_dmean(i, c) / 16.0));
        for &rule in &p.rules {
            let g = Array4::from_shape_fn((n, 3, 8, 8), |(i, c, _, _)| if c < 2 { dy_dmean(i, c) / 64.0 } else { 0.0 });
            out.input_grads.push((rule, g));
        }
        out.activations = Some(acts);
        out.targets = Some(targets);
        Ok(out)
    }
}

struct Harness {
    router: Router,
    service: Arc<Service>,
    rows: Arc<AtomicUsize>,
    jobs: Arc<camserve::core::jobs::Jobs>,
}

fn limits(timeout: Duration) -> ServiceLimits {
    ServiceLimits {
        decode: DecodeLimits { max_pixels: 1 << 20, max_dimension: 1024 },
        options: OptionLimits { max_top_k: 4, max_targets: 4, max_methods: 18, scorecam_max_channels: None },
        request_timeout: timeout,
        max_forward_passes: 4096,
    }
}

/// The service on a stand-in backend, its models installed unless `ready` is false.
fn harness(behaviour: Behaviour, queue_capacity: usize, timeout: Duration, ready: bool) -> Harness {
    let service = Arc::new(Service::new(limits(timeout)));
    let rows = Arc::new(AtomicUsize::new(0));
    let info = Arc::new(info());
    let config = BatcherConfig { max_batch: 4, max_wait: Duration::ZERO, queue_capacity };
    let queue = batcher::spawn(StandIn { info: info.clone(), behaviour, rows: rows.clone() }, config);
    let handle = ModelHandle::new(info, queue, 0, config.max_batch);
    if ready {
        service.install([("standin".to_string(), handle)].into());
    }
    let jobs = Arc::new(camserve::core::jobs::Jobs::new(camserve::core::jobs::JobLimits {
        timeout: Duration::from_secs(60),
        max_running: 2,
        max_kept: 3,
        ttl: Duration::from_millis(1500),
    }));
    let state = AppState {
        jobs: jobs.clone(),
        service: service.clone(),
        metrics: metrics_handle(),
        api_keys: Arc::new(camserve::config::ApiKeys(vec![])),
        open_endpoints: Arc::new(vec!["healthz".into(), "readyz".into(), "metrics".into()]),
        body_limit: 1 << 20,
        body_timeout: Duration::from_secs(5),
    };
    Harness { router: app(state, &[]), service, rows, jobs }
}

/// An 8 x 8 RGB PNG whose pixel (x, y) has channels (x, y, x + y) * 16.
fn png() -> Vec<u8> {
    let img = image::RgbImage::from_fn(8, 8, |x, y| image::Rgb([(x * 16) as u8, (y * 16) as u8, ((x + y) * 16) as u8]));
    let mut bytes = std::io::Cursor::new(Vec::new());
    img.write_to(&mut bytes, image::ImageFormat::Png).unwrap();
    bytes.into_inner()
}

/// The model input the PNG becomes (mean 0, std 1, pixels / 255; no resize at 8 x 8).
fn input() -> Array4<f32> {
    Array4::from_shape_fn((1, 3, 8, 8), |(_, c, y, x)| [x * 16, y * 16, (x + y) * 16][c] as f32 / 255.0)
}

async fn call(router: &Router, req: Request<Body>) -> (StatusCode, String, Value) {
    let res = router.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let ctype = res.headers().get("content-type").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, ctype, body)
}

fn get(path: &str) -> Request<Body> {
    Request::get(path).body(Body::empty()).unwrap()
}

fn explain(query: &str, body: Vec<u8>) -> Request<Body> {
    Request::post(format!("/v1/models/standin/explain?{query}")).header("content-type", "image/png").body(Body::from(body)).unwrap()
}

fn raw(e: &Value) -> (Vec<usize>, Vec<f32>) {
    let shape = e["raw"]["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
    let bytes = base64::engine::general_purpose::STANDARD.decode(e["raw"]["data"].as_str().unwrap()).unwrap();
    (shape, bytes.chunks(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect())
}

fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
    let err = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max) / scale;
    assert!(err <= tol, "{what}: max relative error {err:.2e} over {tol:.0e}\n got {got:?}\nwant {want:?}");
}

fn assert_problem(status: StatusCode, ctype: &str, body: &Value, want: StatusCode, kind: &str) {
    assert_eq!(status, want, "{body}");
    assert_eq!(ctype, "application/problem+json", "{body}");
    assert_eq!(body["status"], want.as_u16(), "{body}");
    assert_eq!(body["type"], format!("urn:camserve:problem:{kind}"), "{body}");
    assert!(body["detail"].as_str().is_some_and(|d| !d.is_empty()), "{body}");
}

/// What the registry offers the stand-in, and the maps it answers with, each against the linear model's exact
/// maps computed here (tolerance 1e-6 relative: float32 sums of eight terms).
#[tokio::test]
async fn explanations_from_a_stand_in_backend() {
    let h = harness(Behaviour::Exact, 64, Duration::from_secs(10), true);
    let (st, _, listing) = call(&h.router, get("/v1/models")).await;
    assert_eq!(st, StatusCode::OK);
    let m = &listing["models"][0];
    assert_eq!(m["name"], "standin");
    let offered: Vec<&str> = m["methods"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert!(offered.contains(&"cam") && offered.contains(&"ablationcam") && offered.contains(&"scorecam"), "{offered:?}");
    // Not the rollouts (no attention), D-RISE (a detector's) nor ViT ReciproCAM (no token layer).
    assert_eq!(m["unavailable"].as_object().unwrap().keys().collect::<Vec<_>>(), ["attention_rollout", "drise", "gradient_rollout", "vit_reciprocam"]);
    // Ablation-CAM's cost is one head pass per channel: 2, on top of the explain pass (1 forward + 1 backward chain
    // counted as 2).
    assert_eq!(m["costs"]["ablationcam"], 5);

    let x = input();
    let acts = layer_of(&x);
    let y = logits_of(&acts);
    let class = 1; // "beta"
    let query = "methods=gradcam,cam,saliency,ablationcam,scorecam,integrated_gradients&outputs=raw&target=beta&steps=4";
    let (st, _, body) = call(&h.router, explain(query, png())).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(body["model"], "standin");
    assert_eq!(body["predictions"][0]["index"], ranked(y.row(0).iter().copied())[0]);
    let ex = body["explanations"].as_array().unwrap();
    assert_eq!(ex.len(), 6);
    let by = |name: &str| ex.iter().find(|e| e["method"] == name).unwrap_or_else(|| panic!("{name} missing"));
    for e in ex {
        assert_eq!(e["target"]["index"], class, "{}", e["method"]);
        assert_eq!(e["target"]["label"], "beta");
    }
    let a = |c: usize, i: usize, j: usize| acts[[0, c, i, j]];
    let grid = |f: &dyn Fn(usize, usize) -> f32| -> Vec<f32> { (0..16).map(|p| f(p / 4, p % 4).max(0.0)).collect() };
    // Grad-CAM: weights mean(dy/dA_c) = W[t][c] / 16. CAM: the head's weights W[t][c].
    let (shape, got) = raw(by("gradcam"));
    assert_eq!(shape, [4, 4]);
    assert_close(&got, &grid(&|i, j| (W[class][0] * a(0, i, j) + W[class][1] * a(1, i, j)) / 16.0), 1e-6, "gradcam");
    assert_eq!(by("gradcam")["layer"], LAYER);
    let (_, got) = raw(by("cam"));
    assert_close(&got, &grid(&|i, j| W[class][0] * a(0, i, j) + W[class][1] * a(1, i, j)), 1e-6, "cam");
    // Saliency: the input gradient W[t][c] / 64 on channels 0 and 1, 0 on channel 2; no layer.
    let (shape, got) = raw(by("saliency"));
    assert_eq!(shape, [3, 8, 8]);
    let want: Vec<f32> = (0..192).map(|p| if p / 64 < 2 { W[class][p / 64] / 64.0 } else { 0.0 }).collect();
    assert_close(&got, &want, 1e-6, "saliency");
    assert!(by("saliency").get("layer").is_none());
    // Ablation-CAM: channel k set to pytorch-grad-cam's ablation value (0 when the layer's minimum is 0, else that
    // minimum - 1e7; here the minimum is 8/255), weights (y - y_k) / y.
    let min = acts.iter().copied().fold(f32::INFINITY, f32::min);
    let value = if min == 0.0 { 0.0 } else { min - 1e7 };
    let weights: Vec<f32> = (0..2)
        .map(|k| {
            let mut ablated = acts.clone();
            ablated.slice_mut(s![0, k, .., ..]).fill(value);
            (y[[0, class]] - logits_of(&ablated)[[0, class]]) / y[[0, class]]
        })
        .collect();
    let (_, got) = raw(by("ablationcam"));
    assert_close(&got, &grid(&|i, j| weights[0] * a(0, i, j) + weights[1] * a(1, i, j)), 1e-6, "ablationcam");
    // Score-CAM ran one masked forward per channel, integrated gradients one gradient pass per step; with the
    // explain pass and Ablation-CAM's two head passes that is 1 + 2 + 2 + 4 rows.
    assert_eq!(h.rows.load(Ordering::SeqCst), 9);
    // Integrated gradients of a linear model: (x - baseline) * gradient, exactly, whatever the steps.
    let (shape, got) = raw(by("integrated_gradients"));
    assert_eq!(shape, [3, 8, 8]);
    let want: Vec<f32> = (0..192).map(|p| if p / 64 < 2 { x[[0, p / 64, (p % 64) / 8, p % 8]] * W[class][p / 64] / 64.0 } else { 0.0 }).collect();
    assert_close(&got, &want, 1e-5, "integrated_gradients");
}

/// Each kind of bad request gets its problem+json status from the handler, and the service keeps serving.
#[tokio::test]
async fn bad_requests_are_problems_and_the_service_keeps_serving() {
    let h = harness(Behaviour::Exact, 64, Duration::from_secs(10), true);
    let cases: [(Request<Body>, StatusCode, &str); 7] = [
        (Request::post("/v1/models/nope/explain").header("content-type", "image/png").body(Body::from(png())).unwrap(), StatusCode::NOT_FOUND, "unknown-model"),
        (explain("", b"not an image".to_vec()), StatusCode::BAD_REQUEST, "bad-request"),
        (explain("methods=gradcam,nonsense", png()), StatusCode::UNPROCESSABLE_ENTITY, "invalid-option"),
        (explain("methods=attention_rollout", png()), StatusCode::UNPROCESSABLE_ENTITY, "invalid-option"),
        (explain("target=9", png()), StatusCode::UNPROCESSABLE_ENTITY, "invalid-option"),
        (explain("methods=scorecam&channels=0", png()), StatusCode::UNPROCESSABLE_ENTITY, "invalid-option"),
        (get("/v1/models/standin/explain"), StatusCode::METHOD_NOT_ALLOWED, "method-not-allowed"),
    ];
    for (req, want, kind) in cases {
        let what = format!("{} {}", req.method(), req.uri());
        let (st, ctype, body) = call(&h.router, req).await;
        assert_problem(st, &ctype, &body, want, kind);
        eprintln!("{what}: {}", body["detail"]);
    }
    assert_eq!(h.rows.load(Ordering::SeqCst), 0, "nothing bad reached the backend");
    let (st, _, body) = call(&h.router, explain("methods=gradcam", png())).await;
    assert_eq!(st, StatusCode::OK, "{body}");
}

/// A backend that fails gives 500 problem+json for that request; readiness is unchanged.
#[tokio::test]
async fn a_failing_backend_is_a_500() {
    let h = harness(Behaviour::Fail, 64, Duration::from_secs(10), true);
    for _ in 0..2 {
        let (st, ctype, body) = call(&h.router, explain("methods=gradcam", png())).await;
        assert_problem(st, &ctype, &body, StatusCode::INTERNAL_SERVER_ERROR, "internal");
    }
    let (st, _, _) = call(&h.router, get("/readyz")).await;
    assert_eq!(st, StatusCode::OK);
}

/// A slow backend: a request past its deadline is a 504, and with the queue full the next is refused at once with
/// 429 and Retry-After, before its image is decoded.
#[tokio::test]
async fn a_slow_backend_times_out_and_a_full_queue_refuses() {
    let h = harness(Behaviour::Slow(Duration::from_millis(400)), 1, Duration::from_millis(150), true);
    let (st, ctype, body) = call(&h.router, explain("methods=gradcam", png())).await;
    assert_problem(st, &ctype, &body, StatusCode::GATEWAY_TIMEOUT, "timeout");

    let h = harness(Behaviour::Slow(Duration::from_millis(500)), 1, Duration::from_secs(10), true);
    // Four requests, 40 ms apart: one runs, one waits in the worker's hand-over slot, one in the collector's, and
    // one in the one-row queue. The fifth is refused.
    let mut accepted = vec![];
    for _ in 0..4 {
        accepted.push(tokio::spawn(h.router.clone().oneshot(explain("methods=gradcam", png()))));
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    let res = h.router.clone().oneshot(explain("methods=gradcam", b"refused before decoding".to_vec())).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(res.headers()["retry-after"], "1");
    for r in accepted {
        assert_eq!(r.await.unwrap().unwrap().status(), StatusCode::OK);
    }
}

/// Until the models are installed, readyz and the model routes are 503 with Retry-After, healthz is 200; once
/// draining, readyz is 503 again while requests in flight still complete.
#[tokio::test]
async fn readiness_follows_the_registry() {
    let h = harness(Behaviour::Exact, 64, Duration::from_secs(10), false);
    assert_eq!(call(&h.router, get("/healthz")).await.0, StatusCode::OK);
    let (st, ctype, body) = call(&h.router, get("/readyz")).await;
    assert_problem(st, &ctype, &body, StatusCode::SERVICE_UNAVAILABLE, "not-ready");
    let (st, ctype, body) = call(&h.router, explain("", png())).await;
    assert_problem(st, &ctype, &body, StatusCode::SERVICE_UNAVAILABLE, "not-ready");

    let ready = harness(Behaviour::Exact, 64, Duration::from_secs(10), true);
    assert_eq!(call(&ready.router, get("/readyz")).await.0, StatusCode::OK);
    ready.service.start_draining();
    let (st, ctype, body) = call(&ready.router, get("/readyz")).await;
    assert_problem(st, &ctype, &body, StatusCode::SERVICE_UNAVAILABLE, "draining");
    assert_eq!(call(&ready.router, explain("", png())).await.0, StatusCode::OK);
}

/// The time estimate: once a pass has been measured (here the stand-in's 100 ms explain batch), a request whose
/// estimate exceeds the request timeout is refused with a 422 that states the estimate and the limit, before any
/// row runs; `GET /v1/models/{model}` gives each method's estimate; a request within the limit still runs.
#[tokio::test]
async fn a_request_estimated_past_its_deadline_is_refused_before_any_work() {
    let h = harness(Behaviour::Slow(Duration::from_millis(100)), 64, Duration::from_secs(2), true);
    // Nothing measured yet: no estimate, no refusal.
    let (st, _, m) = call(&h.router, get("/v1/models/standin")).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(m["estimates"], serde_json::json!({}), "no estimate before a pass is measured");
    let (st, _, _) = call(&h.router, explain("methods=gradcam", png())).await;
    assert_eq!(st, StatusCode::OK);
    let (_, _, m) = call(&h.router, get("/v1/models/standin")).await;
    // One explain row of 3 forward-equivalents took ~100 ms: ~33 ms each (a bound: the sleep can only overrun).
    let gradcam = m["estimates"]["gradcam"].as_f64().unwrap();
    assert!((0.09..0.5).contains(&gradcam), "{m}");
    let smoothgrad = m["estimates"]["smoothgrad"].as_f64().unwrap();
    assert!(smoothgrad > 20.0 * gradcam, "25 samples of 3 forward-equivalents each: {m}");
    let before = h.rows.load(Ordering::SeqCst);
    let (st, ctype, body) = call(&h.router, explain("methods=smoothgrad&samples=100", png())).await;
    assert_problem(st, &ctype, &body, StatusCode::UNPROCESSABLE_ENTITY, "invalid-option");
    let detail = body["detail"].as_str().unwrap();
    assert!(detail.contains("estimated to take") && detail.contains("over the 2 s request timeout") && detail.contains("`samples` (smoothgrad)"), "{detail}");
    assert_eq!(h.rows.load(Ordering::SeqCst), before, "refused before any row ran");
    let (st, _, _) = call(&h.router, explain("methods=gradcam", png())).await;
    assert_eq!(st, StatusCode::OK, "a request within the limit still runs");
}

async fn poll_until_finished(router: &Router, location: &str) -> Vec<Value> {
    let mut seen = vec![];
    for _ in 0..400 {
        let (st, _, job) = call(router, get(location)).await;
        assert_eq!(st, StatusCode::OK, "{job}");
        let finished = ["done", "failed", "cancelled"].contains(&job["state"].as_str().unwrap());
        seen.push(job);
        if finished {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the job did not finish: {:?}", seen.last());
}

/// A job (`?async=true` or `Prefer: respond-async`): 202 with Location and the plan; polled, its progress rises
/// to the planned forward-equivalents; done, it gives the synchronous request's answer; then it expires (410).
/// Unknown ids are 404, a bad `async` value 400, a refused request (over its budget) a 422 at once, not a job.
#[tokio::test]
async fn a_job_runs_reports_its_progress_and_answers_as_the_request_would() {
    let h = harness(Behaviour::Slow(Duration::from_millis(60)), 64, Duration::from_secs(10), true);
    let query = "methods=smoothgrad&samples=12&seed=3&outputs=raw";
    let res = h.router.clone().oneshot(explain(&format!("{query}&async=true"), png())).await.unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let location = res.headers()["location"].to_str().unwrap().to_string();
    assert_eq!(res.headers()["preference-applied"], "respond-async");
    let body: Value = serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(body["location"], location.as_str());
    assert!(location.starts_with("/v1/jobs/"), "{location}");
    // Smoothgrad: the explain pass (3) and 12 noisy copies of 3 each.
    assert_eq!(body["progress"]["planned"], 39, "{body}");
    assert!(["queued", "running"].contains(&body["state"].as_str().unwrap()), "{body}");
    let seen = poll_until_finished(&h.router, &location).await;
    let done: Vec<u64> = seen.iter().map(|j| j["progress"]["done"].as_u64().unwrap()).collect();
    assert!(done.windows(2).all(|w| w[0] <= w[1]), "progress only rises: {done:?}");
    assert!(done.iter().any(|&d| d > 0 && d < 39), "progress seen part-way: {done:?}");
    let last = seen.last().unwrap();
    assert_eq!(last["state"], "done", "{last}");
    assert_eq!(last["progress"]["done"], 39);
    assert_eq!(last["remaining_seconds"], 0.0);
    // The answer is the synchronous request's (same seed).
    let (st, _, sync) = call(&h.router, explain(query, png())).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(raw(&last["result"]["explanations"][0]), raw(&sync["explanations"][0]));
    assert_eq!(last["result"]["explanations"][0]["seed"], 3);
    // `Prefer: respond-async` asks for a job too.
    let req = Request::post(format!("/v1/models/standin/explain?{query}")).header("content-type", "image/png").header("prefer", "wait=5, respond-async").body(Body::from(png())).unwrap();
    assert_eq!(h.router.clone().oneshot(req).await.unwrap().status(), StatusCode::ACCEPTED);
    // Refused at once, not as a failed job: over the forward budget, a bad async value, an unknown model.
    let (st, ctype, body) = call(&h.router, explain("methods=smoothgrad,integrated_gradients&samples=1000&steps=1000&async=true", png())).await;
    assert_problem(st, &ctype, &body, StatusCode::UNPROCESSABLE_ENTITY, "invalid-option");
    let (st, ctype, body) = call(&h.router, explain("async=maybe", png())).await;
    assert_problem(st, &ctype, &body, StatusCode::BAD_REQUEST, "bad-request");
    // Unknown ids: 404; once expired (jobs.ttl_ms, 1.5 s here): 410.
    let (st, ctype, body) = call(&h.router, get("/v1/jobs/camserve.0000")).await;
    assert_problem(st, &ctype, &body, StatusCode::NOT_FOUND, "unknown-job");
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let (st, ctype, body) = call(&h.router, get(&location)).await;
    assert_problem(st, &ctype, &body, StatusCode::GONE, "job-expired");
}

/// Cancelling: DELETE stops a running job, whose remaining batches never run; a second DELETE (a finished job) is
/// 409. Meanwhile a synchronous request is answered before the job's batches (they run in the background). Over
/// `jobs.max_running` (2 here) a new job is 429 with Retry-After.
#[tokio::test]
async fn a_job_yields_to_requests_is_cancelled_and_jobs_are_limited() {
    let h = harness(Behaviour::Slow(Duration::from_millis(50)), 1024, Duration::from_secs(10), true);
    let long = "methods=smoothgrad&samples=300&async=true";
    let (st, _, a) = call(&h.router, explain(long, png())).await;
    assert_eq!(st, StatusCode::ACCEPTED, "{a}");
    let (st, _, b) = call(&h.router, explain(long, png())).await;
    assert_eq!(st, StatusCode::ACCEPTED, "{b}");
    let (st, ctype, body) = call(&h.router, explain(long, png())).await;
    assert_problem(st, &ctype, &body, StatusCode::TOO_MANY_REQUESTS, "too-many-jobs");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A synchronous request meanwhile: answered while both jobs still run.
    let (st, _, _) = call(&h.router, explain("methods=gradcam", png())).await;
    assert_eq!(st, StatusCode::OK);
    let a_loc = a["location"].as_str().unwrap();
    let (_, _, now) = call(&h.router, get(a_loc)).await;
    assert_eq!(now["state"], "running", "{now}");
    // Cancel both; their batches stop (at most the batches already handed to the worker run).
    let (st, _, cancelled) = call(&h.router, Request::delete(a_loc).body(Body::empty()).unwrap()).await;
    assert_eq!(st, StatusCode::OK, "{cancelled}");
    assert_eq!(cancelled["state"], "cancelled");
    let (st, _, _) = call(&h.router, Request::delete(b["location"].as_str().unwrap()).body(Body::empty()).unwrap()).await;
    assert_eq!(st, StatusCode::OK);
    let rows = h.rows.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = h.rows.load(Ordering::SeqCst);
    assert!(after <= rows + 8, "cancelled jobs ran {} more rows", after - rows);
    let (st, ctype, body) = call(&h.router, Request::delete(a_loc).body(Body::empty()).unwrap()).await;
    assert_problem(st, &ctype, &body, StatusCode::CONFLICT, "job-finished");
    let (_, _, job) = call(&h.router, get(a_loc)).await;
    assert_eq!(job["state"], "cancelled");
    assert!(job["progress"]["done"].as_u64().unwrap() < job["progress"]["planned"].as_u64().unwrap());
    // Room again for a new job.
    let (st, _, _) = call(&h.router, explain("methods=gradcam&async=true", png())).await;
    assert_eq!(st, StatusCode::ACCEPTED);
}

/// The event stream: `progress` events, then `done` with the whole job and its answer, and the stream ends; a
/// client that goes away mid-stream drops its stream (the count returns to 0) and the job carries on.
#[tokio::test]
async fn job_events_stream_progress_and_end() {
    let h = harness(Behaviour::Slow(Duration::from_millis(40)), 64, Duration::from_secs(10), true);
    let (st, _, job) = call(&h.router, explain("methods=smoothgrad&samples=16&async=true", png())).await;
    assert_eq!(st, StatusCode::ACCEPTED);
    let loc = job["location"].as_str().unwrap().to_string();
    let res = h.router.clone().oneshot(get(&format!("{loc}/events"))).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    assert_eq!(h.jobs.streams(), 1);
    let text = String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    let events: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("event: ")).collect();
    assert!(events.len() >= 2 && events[..events.len() - 1].iter().all(|&e| e == "progress"), "{events:?}");
    assert_eq!(events.last(), Some(&"done"));
    let last: Value = serde_json::from_str(text.lines().filter_map(|l| l.strip_prefix("data: ")).last().unwrap()).unwrap();
    assert_eq!(last["state"], "done");
    assert_eq!(last["result"]["explanations"][0]["method"], "smoothgrad");
    assert_eq!(h.jobs.streams(), 0, "the stream ended with the job");

    // A client that leaves: read one event, drop the body.
    let (_, _, job) = call(&h.router, explain("methods=smoothgrad&samples=40&async=true", png())).await;
    let loc = job["location"].as_str().unwrap().to_string();
    let res = h.router.clone().oneshot(get(&format!("{loc}/events"))).await.unwrap();
    let mut body = res.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(first.data_ref().unwrap()).contains("event: progress"));
    assert_eq!(h.jobs.streams(), 1);
    drop(body);
    assert_eq!(h.jobs.streams(), 0, "a dropped stream is gone at once");
    let seen = poll_until_finished(&h.router, &loc).await;
    assert_eq!(seen.last().unwrap()["state"], "done", "the job carried on");
    let (st, ctype, body) = call(&h.router, get("/v1/jobs/nope/events")).await;
    assert_problem(st, &ctype, &body, StatusCode::NOT_FOUND, "unknown-job");
}
