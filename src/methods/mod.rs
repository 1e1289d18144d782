//! The methods that need more than the request's one explain pass, and the faithfulness metrics.
//!
//! The request's explain pass (`Service::handle_input`) gives the logits, the layer's activations and gradients
//! and the input gradients every one-pass method reads (explain/). A method here declares what more it needs
//! ([`Method::is_multipass`], [`method_cost`]) and gets a [`Passes`] handle through which it submits extra
//! batches to the model's batcher and awaits them: masked inputs (Score-CAM), ablated activations through the
//! part of the model after the layer (Ablation-CAM), interpolated or noisy inputs through the plain input gradient
//! (integrated gradients, SmoothGrad), or a second pass with its own seed (Finer-CAM). Each method is one file;
//! the metrics (metrics.rs) run the same way. docs/METHODS.md says what each answers and what it costs.

pub mod ablationcam;
pub mod finercam;
pub mod integrated_gradients;
pub mod metrics;
pub mod scorecam;
pub mod smoothgrad;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use ndarray::{concatenate, Array2, Array3, Array4, Axis};
use tokio::sync::oneshot;

use crate::batcher::{Images, Job, JobOutput, Queue, SubmitError, Target};
use crate::engine::{BatchOutput, ModelInfo, PlanKey};
use crate::explain::Method;
use crate::onnx::rewrite::ExplainPlan;
use crate::onnx::rules::ReluRule;
use crate::options::{ExplainOptions, Metric};
use crate::service::ServiceError;

/// What a method may ask of the model: batches through its batcher, within the request's deadline. Every row
/// submitted is counted in `camserve_forward_passes_total{model, method}`.
pub struct Passes<'a> {
    pub queue: &'a Queue,
    pub info: &'a ModelInfo,
    /// Rows per submitted job: the batcher's `max_batch`, so one method's rows share batches with other requests.
    pub max_batch: usize,
    pub deadline: Instant,
    pub timeout: Duration,
}

/// A submitted job's answer.
pub type Reply = oneshot::Receiver<Result<JobOutput, crate::engine::EngineError>>;

impl Passes<'_> {
    /// Submits one job, or refuses at once when the queue is full; counts its rows under `label`.
    pub fn submit(&self, plan: &PlanKey, images: Images, targets: Vec<Target>, label: &str) -> Result<Reply, ServiceError> {
        let rows = targets.len().max(1) as u64;
        let (tx, rx) = oneshot::channel();
        self.queue.submit(Job { plan: plan.clone(), images, targets, deadline: self.deadline, reply: tx }).map_err(|e| match e {
            SubmitError::QueueFull => ServiceError::QueueFull(self.info.name.clone()),
            SubmitError::Closed => ServiceError::Internal("the model's worker has stopped".into()),
        })?;
        ::metrics::counter!("camserve_forward_passes_total", "model" => self.info.name.clone(), "method" => label.to_string()).increment(rows);
        Ok(rx)
    }

    /// Awaits a submitted job within the request's deadline.
    pub async fn wait(&self, rx: Reply) -> Result<JobOutput, ServiceError> {
        match tokio::time::timeout_at(self.deadline.into(), rx).await {
            Err(_) | Ok(Err(_)) => Err(ServiceError::Timeout(self.timeout)),
            Ok(Ok(r)) => r.map_err(|e| ServiceError::Internal(e.to_string())),
        }
    }

    /// Runs `n` rows through `plan`, `row(i)` making row i's array and target when its chunk is submitted (so a
    /// 2048-row Score-CAM never holds more than two chunks of masked images). Chunks of `max_batch` rows, two in
    /// flight, so the worker never waits for the next chunk to be built. Returns the chunks' outputs in order.
    pub async fn run<F>(&self, plan: &PlanKey, n: usize, label: &str, mut row: F) -> Result<Vec<BatchOutput>, ServiceError>
    where
        F: FnMut(usize) -> (Array3<f32>, Target),
    {
        let chunk = self.max_batch.max(1);
        let mut inflight: VecDeque<Reply> = VecDeque::new();
        let mut outs = Vec::with_capacity(n.div_ceil(chunk));
        let mut start = 0;
        while start < n || !inflight.is_empty() {
            if start < n && inflight.len() < 2 {
                let end = (start + chunk).min(n);
                let (images, targets): (Vec<_>, Vec<_>) = (start..end).map(&mut row).unzip();
                inflight.push_back(self.submit(plan, Images::PerRow(images), targets, label)?);
                start = end;
                continue;
            }
            let rx = inflight.pop_front().expect("checked non-empty above. This is a bug.");
            outs.push(self.wait(rx).await?.output);
        }
        Ok(outs)
    }

    /// The logits of `n` images (`row(i)`), `[n, K]`.
    pub async fn logits<F>(&self, n: usize, label: &str, mut row: F) -> Result<Array2<f32>, ServiceError>
    where
        F: FnMut(usize) -> Array3<f32>,
    {
        let outs = self.run(&PlanKey::Predict, n, label, |i| (row(i), Target::Rank(0))).await?;
        stack_logits(&outs)
    }

    /// The logits of the part of the model after `layer`, on `n` activations `[C, h, w]` (`row(i)`).
    pub async fn head_logits<F>(&self, layer: &str, n: usize, label: &str, mut row: F) -> Result<Array2<f32>, ServiceError>
    where
        F: FnMut(usize) -> Array3<f32>,
    {
        let outs = self.run(&PlanKey::Head(layer.to_string()), n, label, |i| (row(i), Target::Rank(0))).await?;
        stack_logits(&outs)
    }

    /// The plain input gradients `[n, C, H, W]` of `class`'s logit at `n` images (`row(i)`).
    pub async fn plain_gradients<F>(&self, layer: &str, class: usize, n: usize, label: &str, mut row: F) -> Result<Array4<f32>, ServiceError>
    where
        F: FnMut(usize) -> Array3<f32>,
    {
        let plan = self.explain_plan(ExplainPlan::new(layer.to_string(), [ReluRule::Plain]));
        let outs = self.run(&plan, n, label, |i| (row(i), Target::Class(class))).await?;
        let grads: Vec<_> = outs
            .iter()
            .map(|o| o.input_grads.iter().find(|(r, _)| *r == ReluRule::Plain).map(|(_, g)| g.view()))
            .collect::<Option<_>>()
            .ok_or_else(|| ServiceError::Internal("the plain input gradient is missing. This is a bug.".into()))?;
        concatenate(Axis(0), &grads).map_err(|e| ServiceError::Internal(format!("stacking gradients: {e}")))
    }

    /// The layer's gradients `[C, h, w]` of the score whose gradient with respect to the logits is `seed`.
    pub async fn seeded_gradients(&self, layer: &str, image: &Array3<f32>, seed: Vec<f32>, label: &str) -> Result<Array3<f32>, ServiceError> {
        let plan = self.explain_plan(ExplainPlan::new(layer.to_string(), []));
        let seed: std::sync::Arc<[f32]> = seed.into();
        let outs = self.run(&plan, 1, label, |_| (image.clone(), Target::Seed(seed.clone()))).await?;
        let g = outs.first().and_then(|o| o.gradients.as_ref()).ok_or_else(|| ServiceError::Internal("gradients missing. This is a bug.".into()))?;
        Ok(g.index_axis(Axis(0), 0).to_owned())
    }

    /// Plain models choose targets inside the graph; contract models take the seed as it is.
    fn explain_plan(&self, plan: ExplainPlan) -> PlanKey {
        PlanKey::Explain(if self.info.kind == crate::engine::ModelKind::Plain { plan.with_target_selection() } else { plan })
    }
}

fn stack_logits(outs: &[BatchOutput]) -> Result<Array2<f32>, ServiceError> {
    let views: Vec<_> = outs.iter().map(|o| o.logits.view()).collect();
    concatenate(Axis(0), &views).map_err(|e| ServiceError::Internal(format!("stacking logits: {e}")))
}

// ------------------------------------------------------------------------------------------ costs

/// Forward passes one row of the request's explain pass costs: one forward and, per gradient chain, a backward
/// counted as two forwards (the usual estimate of reverse-mode cost).
pub fn explain_pass_cost(options: &ExplainOptions) -> u64 {
    let rules = options.methods.iter().filter_map(|m| m.input_rule()).collect::<std::collections::BTreeSet<_>>();
    let chains = rules.len().max(1) as u64;
    1 + 2 * chains
}

/// Channels of the layer Score-CAM masks with, given the request's cap.
pub fn scorecam_channels(info: &ModelInfo, layer: &str, cap: Option<usize>) -> usize {
    let k = info.layer(layer).map_or(0, |l| l.dims[1] as usize);
    cap.map_or(k, |c| c.min(k))
}

/// Extra forward-equivalents `method` costs per target beyond the request's explain pass.
pub fn method_cost(method: Method, info: &ModelInfo, options: &ExplainOptions) -> u64 {
    let channels = info.layer(&options.layer).map_or(0, |l| l.dims[1] as u64);
    match method {
        Method::ScoreCam => scorecam_channels(info, &options.layer, options.channels) as u64,
        // One pass of the part after the layer per channel, counted as a whole forward (an upper bound).
        Method::AblationCam => channels,
        Method::FinerCam => 3,
        Method::IntegratedGradients => 3 * options.steps as u64,
        Method::SmoothGrad => 3 * options.samples as u64,
        _ => 0,
    }
}

/// The cost of one target explained by `method` alone at the model's default layer and options; `None` when the
/// method is not available there.
pub fn default_cost(method: Method, info: &ModelInfo, limits: crate::options::OptionLimits) -> Option<u64> {
    let raw = crate::options::RawOptions { methods: Some(vec![method.as_str().to_string()]), ..Default::default() };
    let limits = crate::options::OptionLimits { max_methods: 1, ..limits };
    raw.validate(info, limits).ok().map(|o| request_cost(info, &o))
}

/// Forward passes of one metric on one map of a model with input `h x w`.
pub fn metric_cost(metric: Metric, info: &ModelInfo) -> u64 {
    match metric {
        Metric::Deletion | Metric::Insertion => metrics::steps(info.input_shape[1], info.input_shape[2]).1 as u64 + 1,
        Metric::ConfidenceChange => 1,
    }
}

/// The request's cost in forward-equivalents: its explain pass, each method's extra passes and each metric, for
/// every target.
pub fn request_cost(info: &ModelInfo, options: &ExplainOptions) -> u64 {
    let per_target: u64 = explain_pass_cost(options)
        + options.methods.iter().map(|&m| method_cost(m, info, options)).sum::<u64>()
        + options.methods.len() as u64 * options.metrics.iter().map(|&m| metric_cost(m, info)).sum::<u64>();
    per_target * options.targets.len().max(1) as u64
}

// ------------------------------------------------------------------------------------------ running them

/// A multi-pass method's raw map for one target row: `[h, w]` for the CAMs, `[C, H, W]` for the gradient methods.
pub enum RawMap {
    Cam(Array2<f32>),
    Gradient(Array3<f32>),
}

/// What a multi-pass method returns besides its map.
#[derive(Default)]
pub struct Extra {
    /// SmoothGrad's noise seed, returned so a result can be reproduced.
    pub seed: Option<u64>,
    /// Score-CAM's channels when capped.
    pub channels: Option<usize>,
}

/// Computes one multi-pass method for target row `row` of the request's explain pass `out`.
pub async fn run(
    method: Method,
    passes: &Passes<'_>,
    options: &ExplainOptions,
    out: &BatchOutput,
    row: usize,
    input: &Array3<f32>,
) -> Result<(RawMap, Extra), ServiceError> {
    let bug = |what: &str| ServiceError::Internal(format!("{what} missing from the explain pass. This is a bug."));
    let class = out.targets.as_ref().and_then(|t| t.get(row).copied()).ok_or_else(|| bug("targets"))?;
    let acts = out.activations.as_ref().ok_or_else(|| bug("activations"))?.index_axis(Axis(0), row);
    let layer = options.layer.as_str();
    let label = method.as_str();
    Ok(match method {
        Method::ScoreCam => {
            let (map, used) = scorecam::run(passes, acts, input, class, options.channels, label).await?;
            (RawMap::Cam(map), Extra { channels: Some(used), ..Default::default() })
        }
        Method::AblationCam => {
            let y = out.logits[[row, class]];
            (RawMap::Cam(ablationcam::run(passes, layer, acts, class, y, label).await?), Extra::default())
        }
        Method::FinerCam => {
            let seed = finercam::seed(out.logits.row(row), class, finercam::ALPHA, finercam::COMPARISONS);
            let grads = passes.seeded_gradients(layer, input, seed, label).await?;
            (RawMap::Cam(crate::explain::cam::gradcam(acts, grads.view())), Extra::default())
        }
        Method::IntegratedGradients => {
            let baseline = black_input(passes.info);
            let a = integrated_gradients::run(passes, layer, input, &baseline, class, options.steps, label).await?;
            (RawMap::Gradient(a), Extra::default())
        }
        Method::SmoothGrad => {
            let seed = options.seed.unwrap_or_else(rand::random);
            let g = smoothgrad::run(passes, layer, input, class, options.samples, options.noise, seed, label).await?;
            (RawMap::Gradient(g), Extra { seed: Some(seed), ..Default::default() })
        }
        _ => return Err(ServiceError::Internal(format!("{method} is not a multi-pass method. This is a bug."))),
    })
}

/// The model-space input of an all-black image (integrated gradients' baseline): `(0 - mean) / std` per channel.
pub fn black_input(info: &ModelInfo) -> Array3<f32> {
    let [_, h, w] = info.input_shape;
    let black = image::RgbImage::new(w as u32, h as u32);
    crate::preprocess::normalize(&black, info.mean, info.std, info.pixels)
}
