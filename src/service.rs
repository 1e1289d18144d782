//! The request pipeline behind the HTTP routes: validate the options and the request's cost, decode and
//! preprocess the image, run the explain pass through the model's batcher, then the multi-pass methods' and the
//! metrics' batches (methods/), turn the arrays into explanations (explain/) and pictures (render/).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use image::RgbImage;
use ndarray::{Array2, Array3, Axis};
use rayon::prelude::*;
use serde::Serialize;

use crate::batcher::{Images, Queue, Target};
use crate::engine::{ranked, BatchOutput, Device, ModelInfo, ModelKind, PlanKey};
use crate::explain::maps;
use crate::onnx::rewrite::ExplainPlan;
use crate::options::{ExplainOptions, OptionError, OptionLimits, OutputSize, RawOptions};
use crate::preprocess::{self, DecodeLimits, ImageError};
use crate::render;
use crate::methods::{self, Heatmap, Kind, Method};

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
    /// The faithfulness metrics asked for (`metrics=`), by name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics: Option<BTreeMap<&'static str, f64>>,
    /// The deletion and insertion curves (`outputs=curves`): the target's softmax score at each step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub curves: Option<BTreeMap<&'static str, Vec<f64>>>,
    /// SmoothGrad's noise seed: send it back as `seed` to reproduce the map.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Score-CAM's channels, when fewer than the layer's (`channels`, `server.scorecam_max_channels`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channels: Option<usize>,
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
    /// The faithfulness metrics' forward passes.
    pub metrics: f64,
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
                PlanKey::Explain(if info.kind == ModelKind::Plain { plan.with_target_selection() } else { plan })
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

/// What an explanation shows, before rendering.
enum Display {
    /// A [0, 1] map at the output size.
    Map(Array2<f32>),
    /// A gradient image `[H, W, 3]` in [0, 1] and its normalised magnitude, at the output size.
    Gradient { rgb: Array3<f32>, magnitude: Array2<f32> },
}

/// One explanation between its computation and its rendering.
pub struct Prepared {
    method: Method,
    row: usize,
    raw: (Vec<usize>, Vec<f32>),
    display: Display,
    /// The map at the model's input size, normalised to [0, 1]: what the metrics rank and multiply with.
    model_map: Array2<f32>,
    extra: methods::Extra,
    scores: Vec<methods::metrics::Score>,
}

impl Prepared {
    /// The class this explanation's row explains.
    fn class(&self, out: &BatchOutput) -> usize {
        out.targets.as_deref().and_then(|t| t.get(self.row).copied()).unwrap_or(0)
    }
}

/// The raw map of one (row, method): the multi-pass method's own result, or from the request's explain pass.
fn raw_map(method: Method, info: &ModelInfo, layer: &str, row: usize, out: &BatchOutput, extra: Option<methods::RawMap>) -> Result<methods::RawMap, ServiceError> {
    match extra {
        Some(r) => Ok(r),
        None => methods::one_pass(method, info, layer, out, row),
    }
}

struct Sizes {
    /// The display's size (the model's input, the upload, or a crop of it).
    display: (usize, usize),
    model: (usize, usize),
}

fn prepare(method: Method, info: &ModelInfo, layer: &str, row: usize, out: &BatchOutput, sizes: Sizes, extra: Option<(methods::RawMap, methods::Extra)>) -> Result<Prepared, ServiceError> {
    let (size, model_size) = (sizes.display, sizes.model);
    let (oh, ow) = size;
    let (raw_extra, extra) = match extra {
        Some((r, e)) => (Some(r), e),
        None => (None, methods::Extra::default()),
    };
    match raw_map(method, info, layer, row, out, raw_extra)? {
        methods::RawMap::Cam(raw) => {
            let display = Display::Map(maps::display_map(&raw, oh, ow));
            let model_map = maps::display_map(&raw, model_size.0, model_size.1);
            let shape = raw.shape().to_vec();
            Ok(Prepared { method, row, raw: (shape, raw.into_raw_vec_and_offset().0), display, model_map, extra, scores: vec![] })
        }
        // Integrated gradients' attribution is shown as Captum shows it: the channel-summed magnitude as a heatmap.
        methods::RawMap::Gradient(raw) if method.heatmap == Heatmap::SummedMagnitude => {
            let summed = raw.mapv(f32::abs).sum_axis(Axis(0));
            let display = Display::Map(maps::display_map(&summed, oh, ow));
            let model_map = maps::display_map(&summed, model_size.0, model_size.1);
            let shape = raw.shape().to_vec();
            let raw = (shape, raw.as_standard_layout().iter().copied().collect());
            Ok(Prepared { method, row, raw, display, model_map, extra, scores: vec![] })
        }
        methods::RawMap::Gradient(raw) => {
            let mut rgb = maps::deprocess(raw.view());
            let mut magnitude = maps::magnitude(raw.view());
            let model_map = if magnitude.dim() == model_size { magnitude.clone() } else { maps::resize_bilinear(magnitude.view(), model_size.0, model_size.1) };
            if magnitude.dim() != (oh, ow) {
                let chw = rgb.permuted_axes([2, 0, 1]);
                rgb = maps::resize_channels(chw.view(), oh, ow).permuted_axes([1, 2, 0]).as_standard_layout().to_owned();
                magnitude = maps::resize_bilinear(magnitude.view(), oh, ow);
            }
            let shape = raw.shape().to_vec();
            let raw = (shape, raw.as_standard_layout().iter().copied().collect());
            Ok(Prepared { method, row, raw, display: Display::Gradient { rgb, magnitude }, model_map, extra, scores: vec![] })
        }
    }
}

fn render_one(p: Prepared, info: &ModelInfo, options: &ExplainOptions, out: &BatchOutput, scores: &[Vec<f32>], base: &RgbImage) -> Explanation {
    let class = p.class(out);
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
    let metrics = (!p.scores.is_empty()).then(|| p.scores.iter().map(|s| (s.metric.as_str(), s.value)).collect());
    let curves = (o.curves && !p.scores.is_empty())
        .then(|| p.scores.iter().filter_map(|s| Some((s.metric.as_str(), s.curve.clone()?))).collect());
    Explanation {
        method: p.method,
        layer: p.method.uses_layer.then(|| options.layer.clone()),
        target,
        heatmap_png: heat.map(|h| png(render::png_rgb(&h))),
        overlay_png: overlay,
        mask_png: o.mask.then(|| png(render::png_gray(&render::mask(map)))),
        raw,
        peak: maps::peak(map),
        bbox: maps::bbox(map, 0.15),
        metrics,
        curves,
        seed: p.extra.seed,
        channels: p.extra.channels,
    }
}

/// Every (target row, method) pair's map, computed in parallel (multi-pass methods' maps given in `extras`);
/// returns them with the time taken.
pub fn prepare_all(
    info: &ModelInfo,
    options: &ExplainOptions,
    out: &BatchOutput,
    mut extras: BTreeMap<(usize, Method), (methods::RawMap, methods::Extra)>,
    orig: &RgbImage,
    model_rgb: &RgbImage,
    region: preprocess::Region,
) -> Result<(Vec<Prepared>, Duration), ServiceError> {
    // At `size=original` the maps cover the part of the upload the model saw (all of it unless cropped), in the
    // upload's pixels; outside a crop they are zero (gradient images neutral grey).
    let model_size = (model_rgb.height() as usize, model_rgb.width() as usize);
    let (size, placed) = match options.size {
        OutputSize::Model => (model_size, None),
        OutputSize::Original => {
            let (x0, y0, x1, y1) = region.pixels(orig.width(), orig.height());
            let full = (x0, y0, x1, y1) == (0, 0, orig.width(), orig.height());
            let at = (!full).then_some(((y0 as usize, x0 as usize), ((y1 - y0) as usize, (x1 - x0) as usize)));
            ((orig.height() as usize, orig.width() as usize), at)
        }
    };
    let t0 = Instant::now();
    let items: Vec<(usize, Method, Option<(methods::RawMap, methods::Extra)>)> = (0..out.len())
        .flat_map(|r| options.methods.iter().map(move |&m| (r, m)))
        .map(|(r, m)| (r, m, extras.remove(&(r, m))))
        .collect();
    let layer = options.layer.as_str();
    let prepared: Vec<Prepared> = items
        .into_par_iter()
        .map(|(r, m, extra)| match placed {
            None => prepare(m, info, layer, r, out, Sizes { display: size, model: model_size }, extra),
            Some((at, inner)) => prepare(m, info, layer, r, out, Sizes { display: inner, model: model_size }, extra).map(|p| place(p, at, size)),
        })
        .collect::<Result<_, _>>()?;
    Ok((prepared, t0.elapsed()))
}

/// Renders every prepared explanation in parallel; returns them with the time taken.
pub fn render_all(prepared: Vec<Prepared>, info: &ModelInfo, options: &ExplainOptions, out: &BatchOutput, orig: &RgbImage, model_rgb: &RgbImage) -> (Vec<Explanation>, Duration) {
    let base = match options.size {
        OutputSize::Model => model_rgb,
        OutputSize::Original => orig,
    };
    let scores: Vec<Vec<f32>> = out.logits.outer_iter().map(softmax).collect();
    let t0 = Instant::now();
    let explanations: Vec<Explanation> = prepared.into_par_iter().map(|p| render_one(p, info, options, out, &scores, base)).collect();
    (explanations, t0.elapsed())
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
