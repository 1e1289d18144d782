//! The request pipeline behind the HTTP routes: validate the options and the request's cost, decode and
//! preprocess the image, run the explain pass through the model's batcher, then the multi-pass methods' and the
//! metrics' batches (methods/), turn the arrays into explanations (explain/) and pictures (render/).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::explanations::{prepare_all, render_all};
use super::options::{OptionError, OptionLimits, RawOptions};
use crate::api::wire::{ExplainResponse, ImageSize, Prediction, Timings};
use crate::backend::batcher::{Images, Queue, Target};
use crate::backend::engine::{ranked, BatchOutput, ModelInfo, PlanKey};
use crate::methods::{self, Kind};
use crate::onnx::rewrite::ExplainPlan;
use crate::preprocess::{self, DecodeLimits, ImageError};

/// What can go wrong in a request; `api::error` maps each kind to its status.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("{0}")]
    BadRequest(String),
    #[error("no model named `{0}`")]
    UnknownModel(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    Unprocessable(String),
    #[error("the queue of model `{0}` is full; retry shortly")]
    QueueFull(String),
    #[error("the request waited longer than {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    NotReady(String),
    #[error("{0}")]
    Internal(String),
}

impl From<OptionError> for ServiceError {
    fn from(e: OptionError) -> Self {
        match e {
            OptionError::Malformed(m) => ServiceError::BadRequest(m),
            OptionError::Invalid(m) => ServiceError::Unprocessable(m),
        }
    }
}

impl From<ImageError> for ServiceError {
    fn from(e: ImageError) -> Self {
        match e {
            ImageError::TooLarge { .. } | ImageError::OverDecoderLimit(_) => ServiceError::TooLarge(e.to_string()),
            _ => ServiceError::BadRequest(e.to_string()),
        }
    }
}

pub struct ModelHandle {
    pub info: Arc<ModelInfo>,
    pub queue: Queue,
    /// Its place in the configuration: `GET /v1/models` lists models in that order (the page opens on the first).
    pub position: usize,
    /// The batcher's `max_batch`: the multi-pass methods submit their rows in jobs of this size.
    pub max_batch: usize,
}

#[derive(Debug, Clone, Copy)]
pub struct ServiceLimits {
    pub decode: DecodeLimits,
    pub options: OptionLimits,
    pub request_timeout: Duration,
    /// The most forward-equivalents one request may cost (`server.max_forward_passes`; methods::request_cost).
    pub max_forward_passes: u64,
}

pub struct Service {
    /// Set once every configured model is loaded and warmed.
    models: OnceLock<BTreeMap<String, ModelHandle>>,
    pub limits: ServiceLimits,
    draining: AtomicBool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Predict,
    Explain,
}

/// What a request brings as its image.
pub enum ImageInput {
    /// An encoded file (JPEG, PNG, ...): decoded and preprocessed for the model.
    Encoded(Bytes),
    /// The model's input tensor `[C, H, W]`, already preprocessed; overlays are drawn on the image it stands for
    /// (the preprocessing undone).
    Tensor(ndarray::Array3<f32>),
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e5).round() / 100.0
}

// ------------------------------------------------------------------------------------------ the workflow

impl Service {
    pub fn new(limits: ServiceLimits) -> Service {
        Service { models: OnceLock::new(), limits, draining: AtomicBool::new(false) }
    }

    /// Makes the loaded models available; from now on the service is ready (unless draining).
    pub fn install(&self, models: BTreeMap<String, ModelHandle>) {
        if self.models.set(models).is_err() {
            tracing::warn!("models installed twice; keeping the first set");
        }
    }

    pub fn models(&self) -> Result<&BTreeMap<String, ModelHandle>, ServiceError> {
        self.models.get().ok_or_else(|| ServiceError::NotReady("the models are still loading".into()))
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.models.get().is_some() && !self.draining.load(Ordering::SeqCst)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    pub fn model(&self, name: &str) -> Result<&ModelHandle, ServiceError> {
        self.models()?.get(name).ok_or_else(|| ServiceError::UnknownModel(name.to_string()))
    }

    pub async fn handle(&self, model: &str, endpoint: Endpoint, image: Bytes, raw: RawOptions) -> Result<ExplainResponse, ServiceError> {
        self.handle_input(model, endpoint, ImageInput::Encoded(image), raw).await
    }

    pub async fn handle_input(&self, model: &str, endpoint: Endpoint, image: ImageInput, raw: RawOptions) -> Result<ExplainResponse, ServiceError> {
        let started = Instant::now();
        let handle = self.model(model)?;
        let info = handle.info.clone();
        let options = raw.validate(&info, self.limits.options)?;
        if endpoint == Endpoint::Explain {
            let cost = methods::request_cost(&info, &options);
            if cost > self.limits.max_forward_passes {
                return Err(ServiceError::Unprocessable(format!(
                    "this request costs {cost} forward passes (methods, metrics and targets together; GET /v1/models/{} gives each method's cost), over the limit of {} (server.max_forward_passes)",
                    info.name, self.limits.max_forward_passes
                )));
            }
        }
        // Under overload, refuse before spending a decode on a request that cannot be queued.
        let rows = if endpoint == Endpoint::Predict { 1 } else { options.targets.len() };
        if !handle.queue.has_room(rows) {
            metrics::counter!("camserve_queue_rejections_total").increment(1);
            return Err(ServiceError::QueueFull(info.name.clone()));
        }

        // Decode and preprocess off the async runtime.
        let limits = self.limits.decode;
        let (orig, model_rgb, input, region) = tokio::task::spawn_blocking({
            let info = info.clone();
            move || -> Result<_, ServiceError> {
                let [c, h, w] = info.input_shape;
                match image {
                    ImageInput::Encoded(bytes) => {
                        let orig = preprocess::decode(&bytes, limits)?;
                        let (resized, region) = preprocess::to_model_size(&orig, w as u32, h as u32, info.pixels);
                        let input = preprocess::normalize(&resized, info.mean, info.std, info.pixels);
                        Ok((orig, resized, input, region))
                    }
                    ImageInput::Tensor(input) => {
                        let want = [c, h, w];
                        if input.shape() != want {
                            return Err(ServiceError::BadRequest(format!(
                                "the input tensor of one image has shape {:?}; model `{}` takes {want:?}",
                                input.shape(),
                                info.name
                            )));
                        }
                        if input.iter().any(|v| !v.is_finite()) {
                            return Err(ServiceError::BadRequest("the input tensor holds a NaN or an infinity".into()));
                        }
                        let rgb = preprocess::denormalize(input.view(), info.mean, info.std, info.pixels);
                        let whole = preprocess::Region { x: 0.0, y: 0.0, width: w as f64, height: h as f64 };
                        Ok((rgb.clone(), rgb, input, whole))
                    }
                }
            }
        })
        .await
        .map_err(|e| ServiceError::Internal(format!("preprocessing task failed: {e}")))??;
        let decode = started.elapsed();

        let plan = match endpoint {
            Endpoint::Predict => PlanKey::Predict,
            Endpoint::Explain => {
                let rules = options.methods.iter().filter_map(|m| m.input_rule);
                let mut plan = ExplainPlan::new(options.layer.clone(), rules);
                if options.methods.iter().any(|m| m.kind == Kind::Attention) {
                    plan = plan.with_attention();
                }
                PlanKey::explain(&info, plan)
            }
        };
        let targets = if endpoint == Endpoint::Predict { vec![Target::Rank(0)] } else { options.targets.clone() };
        let deadline = started + self.limits.request_timeout;
        // The request's own pass and every multi-pass method's and metric's batches go through one handle.
        let passes = methods::Passes { queue: &handle.queue, info: &info, max_batch: handle.max_batch, deadline, timeout: self.limits.request_timeout };
        let multipass = endpoint == Endpoint::Explain && (options.methods.iter().any(|m| m.is_multipass()) || !options.metrics.is_empty());
        let kept_input = multipass.then(|| input.clone());
        let label = if endpoint == Endpoint::Predict { "predict" } else { "explain" };
        let out = passes.wait(passes.submit(&plan, Images::One(input), targets, label)?).await?;

        let predictions = predictions(&info, &out.output, options.top_k.max(5));
        let logits = out.output.logits.row(0).to_vec();
        let image_size = ImageSize { width: orig.width(), height: orig.height() };
        let mut timings = Timings { queue: ms(out.queue), decode: ms(decode), inference: ms(out.inference), ..Default::default() };
        let explanations = if endpoint == Endpoint::Explain {
            let output = Arc::new(out.output);
            let t0 = Instant::now();
            // The multi-pass methods' maps, per (row, method), through the batcher.
            let mut extras = BTreeMap::new();
            if let Some(input) = &kept_input {
                for row in 0..output.len() {
                    for &m in options.methods.iter().filter(|m| m.is_multipass()) {
                        extras.insert((row, m), methods::multi_pass(m, &passes, &options, &output, row, input).await?);
                    }
                }
            }
            let t_passes = t0.elapsed();
            let options = Arc::new(options);
            let (mut prepared, t_explain, orig, model_rgb) = tokio::task::spawn_blocking({
                let (info, options, output) = (info.clone(), options.clone(), output.clone());
                move || prepare_all(&info, &options, &output, extras, &orig, &model_rgb, region).map(|(p, t)| (p, t, orig, model_rgb))
            })
            .await
            .map_err(|e| ServiceError::Internal(format!("explanation task failed: {e}")))??;
            // The metrics, on each map at the model's input size, through the batcher.
            let t1 = Instant::now();
            if let Some(input) = &kept_input {
                let scores: Vec<Vec<f32>> = output.logits.outer_iter().map(softmax).collect();
                for p in prepared.iter_mut() {
                    let class = p.class(&output);
                    for &metric in &options.metrics {
                        let score = methods::metrics::evaluate(&passes, metric, input, &p.model_map, class, scores[p.row][class] as f64).await?;
                        p.scores.push(score);
                    }
                }
            }
            let t_metrics = t1.elapsed();
            let (ex, t_render) = tokio::task::spawn_blocking({
                let (info, options, output) = (info.clone(), options.clone(), output.clone());
                move || render_all(prepared, &info, &options, &output, &orig, &model_rgb)
            })
            .await
            .map_err(|e| ServiceError::Internal(format!("render task failed: {e}")))?;
            timings.explain = ms(t_explain + t_passes);
            timings.metrics = ms(t_metrics);
            timings.render = ms(t_render);
            Some(ex)
        } else {
            None
        };
        timings.total = ms(started.elapsed());
        Ok(ExplainResponse {
            model: info.name.clone(),
            device: info.device,
            image: image_size,
            predictions,
            explanations,
            timings_ms: timings,
            logits,
        })
    }
}

/// Softmax of one row of logits, summed in float64.
pub fn softmax(logits: ndarray::ArrayView1<f32>) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f64> = logits.iter().map(|&v| ((v - max) as f64).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.iter().map(|&e| (e / sum) as f32).collect()
}

/// The top `n` classes of the first row, with softmax scores.
fn predictions(info: &ModelInfo, out: &BatchOutput, n: usize) -> Vec<Prediction> {
    let logits = out.logits.row(0);
    let scores = softmax(logits);
    ranked(logits.iter().copied())
        .into_iter()
        .take(n.min(info.num_classes))
        .map(|i| Prediction { index: i, label: info.label(i).map(str::to_string), score: scores[i], logit: logits[i] })
        .collect()
}
