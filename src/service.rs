//! The request workflow behind the HTTP routes: decode and preprocess the image, queue it for the model's
//! batcher, then turn the engine's arrays into explanations (explain/) and pictures (render/).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use image::RgbImage;
use ndarray::{Array2, Array3, Axis};
use rayon::prelude::*;
use serde::Serialize;
use tokio::sync::oneshot;

use crate::batcher::{Job, Queue, SubmitError, Target};
use crate::engine::{ranked, BatchOutput, Device, ModelInfo, ModelKind, PlanKey};
use crate::explain::{cam, maps, rollout, Method};
use crate::onnx::rewrite::ExplainPlan;
use crate::options::{ExplainOptions, OptionError, OptionLimits, OutputSize, RawOptions};
use crate::preprocess::{self, DecodeLimits, ImageError};
use crate::render;

/// What can go wrong in a request; `http::error` maps each kind to its status.
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
}

#[derive(Debug, Clone, Copy)]
pub struct ServiceLimits {
    pub decode: DecodeLimits,
    pub options: OptionLimits,
    pub request_timeout: Duration,
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

// ------------------------------------------------------------------------------------------ response types

#[derive(Debug, Serialize)]
pub struct ExplainResponse {
    pub model: String,
    pub device: Device,
    pub image: ImageSize,
    pub predictions: Vec<Prediction>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub explanations: Option<Vec<Explanation>>,
    pub timings_ms: Timings,
    /// Every class's logit, for the Open Inference Protocol's `logits` and `probabilities` outputs (the v1 JSON
    /// answer carries the top classes only).
    #[serde(skip)]
    pub logits: Vec<f32>,
}

/// What a request brings as its image.
pub enum ImageInput {
    /// An encoded file (JPEG, PNG, ...): decoded and preprocessed for the model.
    Encoded(Bytes),
    /// The model's input tensor `[C, H, W]`, already preprocessed; overlays are drawn on the image it stands for
    /// (the preprocessing undone).
    Tensor(ndarray::Array3<f32>),
}

#[derive(Debug, Serialize, Clone, Copy)]
pub struct ImageSize {
    pub width: u32,
    pub height: u32,
}

#[derive(Debug, Serialize, Clone)]
pub struct Prediction {
    pub index: usize,
    pub label: Option<String>,
    pub score: f32,
    pub logit: f32,
}

#[derive(Debug, Serialize, Clone)]
pub struct TargetInfo {
    pub index: usize,
    pub label: Option<String>,
    pub score: f32,
}

#[derive(Debug, Serialize)]
pub struct Explanation {
    pub method: Method,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layer: Option<String>,
    pub target: TargetInfo,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heatmap_png: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub overlay_png: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mask_png: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw: Option<RawArray>,
    pub peak: maps::Point,
    pub bbox: Option<maps::BBox>,
}

#[derive(Debug, Serialize)]
pub struct RawArray {
    pub shape: Vec<usize>,
    pub dtype: &'static str,
    /// Little-endian float32 values, base64.
    pub data: String,
}

#[derive(Debug, Serialize, Default, Clone, Copy)]
pub struct Timings {
    pub queue: f64,
    pub decode: f64,
    pub inference: f64,
    pub explain: f64,
    pub render: f64,
    pub total: f64,
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
                        let want = [c as usize, h as usize, w as usize];
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
                let rules = options.methods.iter().filter_map(|m| m.input_rule());
                let mut plan = ExplainPlan::new(options.layer.clone(), rules);
                if options.methods.iter().any(|m| m.is_attention()) {
                    plan = plan.with_attention();
                }
                PlanKey::Explain(if info.kind == ModelKind::Plain { plan.with_target_selection() } else { plan })
            }
        };
        let targets = if endpoint == Endpoint::Predict { vec![Target::Rank(0)] } else { options.targets.clone() };
        let deadline = started + self.limits.request_timeout;
        let (tx, rx) = oneshot::channel();
        handle
            .queue
            .submit(Job { plan, image: input, targets, deadline, reply: tx })
            .map_err(|e| match e {
                SubmitError::QueueFull => ServiceError::QueueFull(info.name.clone()),
                SubmitError::Closed => ServiceError::Internal("the model's worker has stopped".into()),
            })?;
        let out = match tokio::time::timeout_at(deadline.into(), rx).await {
            Err(_) => return Err(ServiceError::Timeout(self.limits.request_timeout)),
            Ok(Err(_)) => return Err(ServiceError::Timeout(self.limits.request_timeout)),
            Ok(Ok(r)) => r.map_err(|e| ServiceError::Internal(e.to_string()))?,
        };

        let predictions = predictions(&info, &out.output, options.top_k.max(5));
        let logits = out.output.logits.row(0).to_vec();
        let image_size = ImageSize { width: orig.width(), height: orig.height() };
        let mut timings = Timings { queue: ms(out.queue), decode: ms(decode), inference: ms(out.inference), ..Default::default() };
        let explanations = if endpoint == Endpoint::Explain {
            let (ex, t_explain, t_render) = tokio::task::spawn_blocking({
                let info = info.clone();
                move || build_explanations(&info, &options, &out.output, &orig, &model_rgb, region)
            })
            .await
            .map_err(|e| ServiceError::Internal(format!("explanation task failed: {e}")))??;
            timings.explain = ms(t_explain);
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

/// What an explanation shows, before rendering.
enum Display {
    /// A [0, 1] map at the output size.
    Map(Array2<f32>),
    /// A gradient image `[H, W, 3]` in [0, 1] and its normalised magnitude, at the output size.
    Gradient { rgb: Array3<f32>, magnitude: Array2<f32> },
}

struct Prepared {
    method: Method,
    row: usize,
    raw: (Vec<usize>, Vec<f32>),
    display: Display,
}

fn input_grad(out: &BatchOutput, method: Method) -> Result<&ndarray::Array4<f32>, ServiceError> {
    let rule = method.input_rule().ok_or_else(|| ServiceError::Internal(format!("{method} reads no input gradient. This is a bug.")))?;
    out.input_grads
        .iter()
        .find(|(r, _)| *r == rule)
        .map(|(_, a)| a)
        .ok_or_else(|| ServiceError::Internal(format!("the {rule} input gradient is missing. This is a bug.")))
}

/// An attention rollout's raw map on the token grid `[h, w]`, from the row's attention blocks.
fn rollout_map(method: Method, info: &ModelInfo, row: usize, out: &BatchOutput) -> Result<Array2<f32>, ServiceError> {
    let bug = |why: String| ServiceError::Internal(format!("{method}: {why}. This is a bug."));
    let a = info.attention.as_ref().ok_or_else(|| bug("the model has no attention blocks".into()))?;
    if out.attention.len() != a.outputs.len() {
        return Err(bug(format!("{} attention blocks returned for {}", out.attention.len(), a.outputs.len())));
    }
    let grid = rollout::TokenGrid { prefix: a.prefix, h: a.grid.0 as usize, w: a.grid.1 as usize };
    let blocks: Vec<_> = out.attention.iter().map(|(p, g)| (p.index_axis(Axis(0), row), g.index_axis(Axis(0), row))).collect();
    let map = match method {
        Method::AttentionRollout => rollout::attention_rollout(&blocks.iter().map(|b| b.0.view()).collect::<Vec<_>>(), grid),
        _ => rollout::gradient_rollout(&blocks, grid),
    };
    map.map_err(bug)
}

fn prepare(method: Method, info: &ModelInfo, row: usize, out: &BatchOutput, size: (usize, usize)) -> Result<Prepared, ServiceError> {
    let missing = || ServiceError::Internal("activations missing from an explain run. This is a bug.".into());
    let acts = out.activations.as_ref().ok_or_else(missing)?.index_axis(Axis(0), row);
    let grads = out.gradients.as_ref().ok_or_else(missing)?.index_axis(Axis(0), row);
    let (oh, ow) = size;
    if method.is_attention() {
        let raw = rollout_map(method, info, row, out)?;
        let display = Display::Map(maps::display_map(&raw, oh, ow));
        let shape = raw.shape().to_vec();
        return Ok(Prepared { method, row, raw: (shape, raw.into_raw_vec_and_offset().0), display });
    }
    if method.is_cam() {
        let raw = cam::compute(method, acts, grads);
        let display = Display::Map(maps::display_map(&raw, oh, ow));
        let shape = raw.shape().to_vec();
        return Ok(Prepared { method, row, raw: (shape, raw.into_raw_vec_and_offset().0), display });
    }
    let g = input_grad(out, method)?.index_axis(Axis(0), row);
    let raw: Array3<f32> = if method == Method::GuidedGradCam {
        // guided_backprop * up(gradcam), up = bilinear upsampling to H x W, then min-max normalisation.
        let (h, w) = (g.shape()[1], g.shape()[2]);
        let up = maps::normalize(&maps::resize_bilinear(cam::gradcam(acts, grads).view(), h, w));
        &g * &up.insert_axis(Axis(0))
    } else {
        g.to_owned()
    };
    let mut rgb = maps::deprocess(raw.view());
    let mut magnitude = maps::magnitude(raw.view());
    if magnitude.dim() != (oh, ow) {
        let chw = rgb.permuted_axes([2, 0, 1]);
        rgb = maps::resize_channels(chw.view(), oh, ow).permuted_axes([1, 2, 0]).as_standard_layout().to_owned();
        magnitude = maps::resize_bilinear(magnitude.view(), oh, ow);
    }
    let shape = raw.shape().to_vec();
    Ok(Prepared { method, row, raw: (shape, raw.as_standard_layout().iter().copied().collect()), display: Display::Gradient { rgb, magnitude } })
}

fn render_one(p: Prepared, info: &ModelInfo, options: &ExplainOptions, out: &BatchOutput, scores: &[Vec<f32>], base: &RgbImage) -> Explanation {
    let targets = out.targets.as_deref().unwrap_or(&[]);
    let class = targets.get(p.row).copied().unwrap_or(0);
    let target = TargetInfo { index: class, label: info.label(class).map(str::to_string), score: scores[p.row][class] };
    let o = options.outputs;
    let png = |b: Vec<u8>| render::base64(&b);
    let (map, heat) = match &p.display {
        Display::Map(m) => (m, o.heatmap.then(|| render::colorize(m, options.colormap))),
        Display::Gradient { rgb, magnitude } => (magnitude, o.heatmap.then(|| render::rgb_from_unit(rgb))),
    };
    let overlay = o.overlay.then(|| {
        let colored = match (&p.display, &heat) {
            (Display::Map(_), Some(h)) => h.clone(),
            _ => render::colorize(map, options.colormap),
        };
        png(render::png_rgb(&render::overlay(base, &colored, options.alpha)))
    });
    let raw = o.raw.then(|| {
        let mut bytes = Vec::with_capacity(p.raw.1.len() * 4);
        for v in &p.raw.1 {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        RawArray { shape: p.raw.0.clone(), dtype: "float32", data: render::base64(&bytes) }
    });
    let uses_layer = p.method.is_cam() || p.method == Method::GuidedGradCam;
    Explanation {
        method: p.method,
        layer: uses_layer.then(|| options.layer.clone()),
        target,
        heatmap_png: heat.map(|h| png(render::png_rgb(&h))),
        overlay_png: overlay,
        mask_png: o.mask.then(|| png(render::png_gray(&render::mask(map)))),
        raw,
        peak: maps::peak(map),
        bbox: maps::bbox(map, 0.15),
    }
}

/// Every (target row, method) pair, computed and rendered in parallel; returns the explain and render times.
pub fn build_explanations(
    info: &ModelInfo,
    options: &ExplainOptions,
    out: &BatchOutput,
    orig: &RgbImage,
    model_rgb: &RgbImage,
    region: preprocess::Region,
) -> Result<(Vec<Explanation>, Duration, Duration), ServiceError> {
    // At `size=original` the maps cover the part of the upload the model saw (all of it unless cropped), in the
    // upload's pixels; outside a crop they are zero (gradient images neutral grey).
    let (base, size, placed) = match options.size {
        OutputSize::Model => (model_rgb, (model_rgb.height() as usize, model_rgb.width() as usize), None),
        OutputSize::Original => {
            let (x0, y0, x1, y1) = region.pixels(orig.width(), orig.height());
            let full = (x0, y0, x1, y1) == (0, 0, orig.width(), orig.height());
            let at = (!full).then_some(((y0 as usize, x0 as usize), ((y1 - y0) as usize, (x1 - x0) as usize)));
            (orig, (orig.height() as usize, orig.width() as usize), at)
        }
    };
    let scores: Vec<Vec<f32>> = out.logits.outer_iter().map(softmax).collect();
    let t0 = Instant::now();
    let items: Vec<(usize, Method)> = (0..out.len()).flat_map(|r| options.methods.iter().map(move |&m| (r, m))).collect();
    let prepared: Vec<Prepared> = items
        .par_iter()
        .map(|&(r, m)| match placed {
            None => prepare(m, info, r, out, size),
            Some((at, inner)) => prepare(m, info, r, out, inner).map(|p| place(p, at, size)),
        })
        .collect::<Result<_, _>>()?;
    let t1 = Instant::now();
    let explanations: Vec<Explanation> = prepared.into_par_iter().map(|p| render_one(p, info, options, out, &scores, base)).collect();
    Ok((explanations, t1 - t0, t1.elapsed()))
}

/// A prepared display of the crop's size, placed at `at` (row, column) on a canvas of `size`: maps are zero
/// outside, gradient images neutral grey (0.5, what `deprocess` makes of a zero gradient) with zero magnitude.
fn place(p: Prepared, at: (usize, usize), size: (usize, usize)) -> Prepared {
    let (y0, x0) = at;
    let display = match p.display {
        Display::Map(m) => {
            let mut canvas = Array2::zeros(size);
            canvas.slice_mut(ndarray::s![y0..y0 + m.nrows(), x0..x0 + m.ncols()]).assign(&m);
            Display::Map(canvas)
        }
        Display::Gradient { rgb, magnitude } => {
            let (h, w) = magnitude.dim();
            let mut rgb_canvas = Array3::from_elem((size.0, size.1, 3), 0.5f32);
            rgb_canvas.slice_mut(ndarray::s![y0..y0 + h, x0..x0 + w, ..]).assign(&rgb);
            let mut mag = Array2::zeros(size);
            mag.slice_mut(ndarray::s![y0..y0 + h, x0..x0 + w]).assign(&magnitude);
            Display::Gradient { rgb: rgb_canvas, magnitude: mag }
        }
    };
    Prepared { display, ..p }
}
