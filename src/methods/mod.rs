//! The explanation methods: each one a [`MethodDef`] that says what it reads, what it costs and how it computes its
//! map, and [`Method::ALL`], the one registry of them.
//!
//! The request's explain pass (`Service::handle_input`) gives the logits, the layer's activations and gradients,
//! the input gradients and the attention blocks the methods ask for. A one-pass method computes its map from its
//! row of that pass ([`Compute::Layer`], [`Compute::Pass`]); a multi-pass method ([`Compute::Passes`]) gets a
//! [`Passes`] handle through which it submits extra batches to the model's batcher and awaits them: masked inputs
//! (Score-CAM), ablated activations through the part of the model after the layer (Ablation-CAM), interpolated or
//! noisy inputs through the plain input gradient (integrated gradients, SmoothGrad), or a second pass with its own
//! seed (Finer-CAM). Both kinds go through [`compute`], the one computation path. The metrics (metrics.rs, their
//! registry [`metrics::Metric::ALL`]) run the same way. A method's own options are [`params::Param`]s it declares.
//!
//! The registry is the single source of the method names: serde, `GET /v1/models` (which the page reads), the
//! CLI's `--method` values, the OIP outputs; a test holds openapi.yaml's enum, README's table and
//! docs/METHODS.md's table to it. A new method is its file here (a `pub const DEF: MethodDef`, from
//! [`MethodDef::new`] and the fields where it differs, its parameters in `params`), one line in [`Method::ALL`],
//! and its test;
//! docs/METHODS.md says what each answers and what it costs.

pub mod ablationcam;
pub mod cams;
pub mod finercam;
pub mod gradients;
pub mod integrated_gradients;
pub mod metrics;
pub mod params;
mod passes;
pub mod reciprocam;
pub mod rise;
pub mod rollouts;
pub mod drise;
pub mod scorecam;
pub mod smoothgrad;
pub mod vit_reciprocam;

use std::future::Future;
use std::pin::Pin;

use ndarray::{Array2, Array3, ArrayView1, ArrayView3, Axis};

use crate::backend::batcher::{PassKind, PassTimes, Target};
use crate::backend::engine::{BatchOutput, ModelInfo};
use crate::error::ServiceError;
use crate::onnx::rules::ReluRule;
use metrics::Metric;
use params::{Param, Params};
pub use passes::{Passes, Reply};

// ------------------------------------------------------------------------------------------ what a method is

/// What a method's map is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A map on the layer's grid `[h, w]`.
    Cam,
    /// An input gradient or attribution image `[C, H, W]`.
    Gradient,
    /// A map on a transformer's token grid, from every attention block.
    Attention,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Cam => "cam",
            Kind::Gradient => "gradient",
            Kind::Attention => "attention",
        }
    }
}

/// How a `[C, H, W]` map is shown (maps on a grid are always a colour-mapped heatmap).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heatmap {
    /// The colour-mapped map.
    Map,
    /// The gradient as an image (`maps::deprocess`), its magnitude for the overlay and mask.
    GradientImage,
    /// The channel-summed magnitude as a heatmap (Captum's view of an attribution).
    SummedMagnitude,
}

impl Heatmap {
    pub fn as_str(self) -> &'static str {
        match self {
            Heatmap::Map => "map",
            Heatmap::GradientImage => "gradient_image",
            Heatmap::SummedMagnitude => "summed_magnitude",
        }
    }
}

/// A method's description: the registry's entry.
pub struct MethodDef {
    /// Its name in the API (serde, query strings, the CLI, OIP output names).
    pub name: &'static str,
    pub kind: Kind,
    pub heatmap: Heatmap,
    /// The input-gradient chain it reads from the request's explain pass.
    pub input_rule: Option<ReluRule>,
    /// The input-gradient chain its own batches run through (integrated gradients, SmoothGrad).
    pub batch_rule: Option<ReluRule>,
    /// Whether its explanation names the layer it read.
    pub uses_layer: bool,
    /// Why it cannot run at a layer (a tensor name) of a model, beyond its rules and attention (checked from the
    /// fields above); `None` where it can.
    pub refuses_at: fn(&ModelInfo, &str) -> Option<String>,
    /// Forward-equivalents it costs per target beyond the request's explain pass, at a layer (a tensor name) with
    /// the request's parameters.
    pub cost: fn(&ModelInfo, &str, &Params) -> u64,
    /// The request parameters it reads (params.rs): the options a request may give it.
    pub params: &'static [&'static Param],
    /// The kind of pass its `cost` is made of (the time estimates price each kind as measured).
    pub pass: PassKind,
    pub compute: Compute,
}

impl MethodDef {
    /// An entry with what most share: no input-gradient rule, available wherever its rules and attention are, no
    /// cost beyond the explain pass; CAMs name their layer, gradient maps show as images. An entry overrides the
    /// rest with struct update syntax.
    pub const fn new(name: &'static str, kind: Kind, compute: Compute) -> MethodDef {
        MethodDef {
            name,
            kind,
            heatmap: if matches!(kind, Kind::Gradient) { Heatmap::GradientImage } else { Heatmap::Map },
            input_rule: None,
            batch_rule: None,
            uses_layer: matches!(kind, Kind::Cam),
            refuses_at: anywhere,
            cost: no_cost,
            params: &[],
            pass: PassKind::Forward,
            compute,
        }
    }
}

/// A future borrowing its method's context (the multi-pass methods are `async`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A method's result for one target row: its raw map and what it returns besides.
pub struct Computed {
    pub map: RawMap,
    pub returned: Returned,
}

impl From<RawMap> for Computed {
    fn from(map: RawMap) -> Computed {
        Computed { map, returned: Returned::default() }
    }
}

/// A multi-pass method's computation under way.
pub type Pending<'a> = BoxFuture<'a, Result<Computed, ServiceError>>;

/// How a method computes its map for one target row.
pub enum Compute {
    /// From the row's activations `[K, h, w]` and gradients of the layer alone (the Grad-CAM family).
    Layer(fn(ArrayView3<f32>, ArrayView3<f32>) -> Array2<f32>),
    /// From the row of the request's explain pass (input gradients, attention blocks, the model's head).
    Pass(fn(&Row<'_>) -> Result<RawMap, ServiceError>),
    /// With extra batches through the model's batcher.
    Passes(for<'a> fn(&'a PassesCtx<'a>) -> Pending<'a>),
}

/// One target row of the request's explain pass, as a one-pass method reads it.
pub struct Row<'a> {
    pub info: &'a ModelInfo,
    /// The layer (a tensor name).
    pub layer: &'a str,
    pub row: usize,
    /// The class the row explains.
    pub class: usize,
    pub out: &'a BatchOutput,
    pub acts: ArrayView3<'a, f32>,
    pub grads: ArrayView3<'a, f32>,
}

impl<'a> Row<'a> {
    /// The row's input gradient `[C, H, W]` under `rule`.
    pub fn input_grad(&self, rule: ReluRule) -> Result<ArrayView3<'a, f32>, ServiceError> {
        self.out
            .input_grads
            .iter()
            .find(|(r, _)| *r == rule)
            .map(|(_, a)| a.index_axis(Axis(0), self.row))
            .ok_or_else(|| ServiceError::Internal(format!("the {rule} input gradient is missing. This is a bug.")))
    }
}

/// What a multi-pass method gets: its target row of the request's explain pass and the [`Passes`] handle.
pub struct PassesCtx<'a> {
    pub passes: &'a Passes<'a>,
    /// The layer (a tensor name).
    pub layer: &'a str,
    /// The request's parameter values.
    pub params: &'a Params,
    pub out: &'a BatchOutput,
    pub row: usize,
    pub class: usize,
    /// What the row explains, as the batcher takes it: the class, or the seed of a detection or a segment (the
    /// gradient passes of integrated gradients and SmoothGrad reuse it).
    pub target: Target,
    /// The row's activations of the layer `[K, h, w]`.
    pub acts: ArrayView3<'a, f32>,
    /// The preprocessed image `[C, H, W]`.
    pub input: &'a Array3<f32>,
    /// The method's name, the label its rows are counted under.
    pub label: &'static str,
    /// A detector's detections (D-RISE's).
    pub proposals: Option<&'a dyn drise::Proposals>,
    /// How the model's output gives class probabilities (RISE's).
    pub probabilities: Probabilities,
}

/// How a row of the model's output gives its classes' probabilities, which RISE weighs its masks with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Probabilities {
    /// A classifier's logits: their softmax.
    #[default]
    Softmax,
    /// A multi-label classifier's logits: their sigmoid.
    Sigmoid,
    /// The output is already the probabilities (a multi-label classifier whose Sigmoid is in the graph).
    AsIs,
}

impl Probabilities {
    /// Class `class`'s probability in `row`.
    pub fn of(self, row: ArrayView1<f32>, class: usize) -> f32 {
        let v = row.get(class).copied().unwrap_or(f32::NAN);
        match self {
            Probabilities::AsIs => v,
            Probabilities::Sigmoid => (1.0 / (1.0 + (-(v as f64)).exp())) as f32,
            Probabilities::Softmax => {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
                let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
                ((v as f64 - max).exp() / sum) as f32
            }
        }
    }
}

/// A method's raw map for one target row: `[h, w]` on a grid, `[C, H, W]` for the gradient methods.
pub enum RawMap {
    Cam(Array2<f32>),
    Gradient(Array3<f32>),
}

/// What a method returns besides its map (multi-pass methods only, so far).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Returned {
    /// SmoothGrad's noise seed, returned so a result can be reproduced.
    pub seed: Option<u64>,
    /// Score-CAM's channels when capped.
    pub channels: Option<usize>,
}

/// Why a method does not run on a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// It needs what the model lacks, at any layer.
    Model(String),
    /// Its own condition fails at the layer asked for.
    Layer(String),
}

impl Refusal {
    pub fn reason(&self) -> &str {
        match self {
            Refusal::Model(r) | Refusal::Layer(r) => r,
        }
    }
}

/// Available wherever its rules and attention are.
fn anywhere(_: &ModelInfo, _: &str) -> Option<String> {
    None
}

/// No forward passes beyond the request's explain pass.
fn no_cost(_: &ModelInfo, _: &str, _: &Params) -> u64 {
    0
}

// ------------------------------------------------------------------------------------------ the registry

/// An explanation method: a handle on its registry entry. Equal, hashed and ordered by name.
#[derive(Clone, Copy)]
pub struct Method(&'static MethodDef);

impl Method {
    /// Every method of the API, in the order `GET /v1/models`, the CLI, openapi.yaml and the docs list them.
    pub const ALL: [Method; 22] = [
        Method(&cams::GRADCAM),
        Method(&cams::GRADCAM_PLUS_PLUS),
        Method(&cams::XGRADCAM),
        Method(&cams::HIRESCAM),
        Method(&cams::LAYERCAM),
        Method(&cams::EIGENCAM),
        Method(&gradients::GUIDED_BACKPROP),
        Method(&gradients::DECONVNET),
        Method(&gradients::SALIENCY),
        Method(&gradients::GUIDED_GRADCAM),
        Method(&rollouts::ATTENTION_ROLLOUT),
        Method(&rollouts::GRADIENT_ROLLOUT),
        Method(&cams::CAM),
        Method(&scorecam::DEF),
        Method(&ablationcam::DEF),
        Method(&finercam::DEF),
        Method(&integrated_gradients::DEF),
        Method(&smoothgrad::DEF),
        Method(&drise::DEF),
        Method(&reciprocam::DEF),
        Method(&vit_reciprocam::DEF),
        Method(&rise::DEF),
    ];

    /// What a request gets without `methods`.
    pub const DEFAULT: [Method; 2] = [Method(&cams::GRADCAM), Method(&gradients::GUIDED_GRADCAM)];

    pub fn as_str(self) -> &'static str {
        self.0.name
    }

    pub fn parse(s: &str) -> Option<Method> {
        let s = s.trim_start().to_ascii_lowercase();
        // `?methods=gradcam++` typed into a URL arrives as "gradcam  " ('+' is a space in a query string);
        // trimming it would silently give plain Grad-CAM.
        if s == "gradcam  " {
            return Some(Method(&cams::GRADCAM_PLUS_PLUS));
        }
        let s = s.trim_end();
        Method::ALL.into_iter().find(|m| m.as_str() == s)
    }

    /// True for the methods that need more than the request's one explain pass.
    pub fn is_multipass(self) -> bool {
        matches!(self.0.compute, Compute::Passes(_))
    }

    /// The one question of whether the method runs on `model`: why not, if it does not. First what it needs of
    /// the model whatever the layer (an input-gradient rule, attention blocks), then, given a `layer` (a tensor
    /// name), its own condition there.
    pub fn refusal(self, model: &ModelInfo, layer: Option<&str>) -> Option<Refusal> {
        for rule in [self.input_rule, self.batch_rule].into_iter().flatten() {
            if !model.rules.contains(&rule) {
                return Some(Refusal::Model(format!("method `{self}` needs the `{rule}` input gradient, which model `{}` does not provide", model.name)));
            }
        }
        if self.kind == Kind::Attention && model.attention.is_none() {
            return Some(Refusal::Model(format!(
                "method `{self}` needs attention: model `{}` has no attention blocks (Softmax [N, heads, T, T] over its token layers)",
                model.name
            )));
        }
        layer.and_then(|l| (self.refuses_at)(model, l)).map(Refusal::Layer)
    }
}

impl std::ops::Deref for Method {
    type Target = MethodDef;
    fn deref(&self) -> &MethodDef {
        self.0
    }
}

impl PartialEq for Method {
    fn eq(&self, other: &Method) -> bool {
        self.0.name == other.0.name
    }
}

impl Eq for Method {}

impl std::hash::Hash for Method {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.0.name.hash(h)
    }
}

impl PartialOrd for Method {
    fn partial_cmp(&self, other: &Method) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Method {
    fn cmp(&self, other: &Method) -> std::cmp::Ordering {
        self.0.name.cmp(other.0.name)
    }
}

impl std::fmt::Debug for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Method({})", self.0.name)
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0.name)
    }
}

impl serde::Serialize for Method {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0.name)
    }
}

// ------------------------------------------------------------------------------------------ costs

/// Forward passes one row of the request's explain pass costs: one forward and, per gradient chain, a backward
/// counted as two forwards (the usual estimate of reverse-mode cost).
pub fn explain_pass_cost(methods: &[Method]) -> u64 {
    let rules = methods.iter().filter_map(|m| m.input_rule).collect::<std::collections::BTreeSet<_>>();
    let chains = rules.len().max(1) as u64;
    1 + 2 * chains
}

/// The cost of one target explained by `method` alone at the model's default layer with `params` (the defaults a
/// request without options gets); `None` when the method is not available there.
pub fn default_cost(method: Method, info: &ModelInfo, params: &Params) -> Option<u64> {
    if method.refusal(info, Some(&info.default_layer)).is_some() {
        return None;
    }
    Some(request_cost(info, &Work { layer: &info.default_layer, methods: &[method], params, metrics: &[], targets: 1 }))
}

/// What a request asks for, as the budget reads it.
pub struct Work<'a> {
    /// The layer (a tensor name).
    pub layer: &'a str,
    pub methods: &'a [Method],
    pub params: &'a Params,
    pub metrics: &'a [Metric],
    /// The number of targets.
    pub targets: usize,
}

/// The request's cost in forward-equivalents: its explain pass, each method's extra passes and each metric, for
/// every target.
pub fn request_cost(info: &ModelInfo, work: &Work<'_>) -> u64 {
    let per_target: u64 = explain_pass_cost(work.methods)
        + work.methods.iter().map(|m| (m.cost)(info, work.layer, work.params)).sum::<u64>()
        + work.methods.len() as u64 * work.metrics.iter().map(|&m| m.cost(info)).sum::<u64>();
    per_target * work.targets.max(1) as u64
}

/// The request's estimated time in seconds: its cost in forward-equivalents of each kind of pass (the explain pass,
/// each method's extra passes, the metrics' forwards) times what one costs this model now (`PassTimes`, measured
/// by the worker). `None` until the model has run a pass.
pub fn request_seconds(info: &ModelInfo, times: &PassTimes, work: &Work<'_>) -> Option<f64> {
    let t = |kind: PassKind| times.per_forward(kind);
    let mut per_target = explain_pass_cost(work.methods) as f64 * t(PassKind::Explain)?;
    for m in work.methods {
        let cost = (m.cost)(info, work.layer, work.params);
        if cost > 0 {
            per_target += cost as f64 * t(m.pass)?;
        }
    }
    let metrics: u64 = work.methods.len() as u64 * work.metrics.iter().map(|&m| m.cost(info)).sum::<u64>();
    if metrics > 0 {
        per_target += metrics as f64 * t(PassKind::Forward)?;
    }
    Some(per_target * work.targets.max(1) as f64)
}

/// One target explained by `method` alone at the model's default layer with `params`, in seconds as now measured;
/// `None` where the method is not available there or nothing was measured yet.
pub fn default_seconds(method: Method, info: &ModelInfo, times: &PassTimes, params: &Params) -> Option<f64> {
    if method.refusal(info, Some(&info.default_layer)).is_some() {
        return None;
    }
    request_seconds(info, times, &Work { layer: &info.default_layer, methods: &[method], params, metrics: &[], targets: 1 })
}

// ------------------------------------------------------------------------------------------ running them

/// The class target row `row` of the explain pass explains: the one way to read it (no fallback: a missing target
/// is a bug, reported as one).
pub fn row_class(out: &BatchOutput, row: usize) -> Result<usize, ServiceError> {
    out.targets
        .as_ref()
        .and_then(|t| t.get(row).copied())
        .ok_or_else(|| ServiceError::Internal(format!("the target of row {row} is missing from the explain pass. This is a bug.")))
}

fn layer_arrays(out: &BatchOutput, row: usize) -> Result<(ArrayView3<'_, f32>, ArrayView3<'_, f32>), ServiceError> {
    let missing = || ServiceError::Internal("activations missing from an explain run. This is a bug.".into());
    let acts = out.activations.as_ref().ok_or_else(missing)?;
    let grads = out.gradients.as_ref().ok_or_else(missing)?;
    Ok((acts.index_axis(Axis(0), row), grads.index_axis(Axis(0), row)))
}

/// What every method computes from: the request's explain pass, the model, the layer, the parameters, and for the
/// multi-pass methods the [`Passes`] handle and the preprocessed image.
pub struct Request<'a> {
    pub info: &'a ModelInfo,
    pub layer: &'a str,
    pub params: &'a Params,
    pub out: &'a BatchOutput,
    /// The multi-pass methods' handle and the preprocessed image `[C, H, W]` (`None` when no method needs them).
    pub passes: Option<(&'a Passes<'a>, &'a Array3<f32>)>,
    /// A detector's detections, for D-RISE (`None` for a classifier).
    pub proposals: Option<&'a dyn drise::Proposals>,
    /// Each row's seed, where the pass had one (a detection's, a segment's); a row without explains its class.
    pub seeds: &'a [Option<std::sync::Arc<[f32]>>],
    /// How the model's output gives class probabilities (RISE's).
    pub probabilities: Probabilities,
}

/// The one computation path: `method`'s raw map (and what it returns besides) for target row `row` of the
/// request's explain pass, whether it computes from that row alone or runs its own batches.
pub async fn compute(method: Method, req: &Request<'_>, row: usize) -> Result<Computed, ServiceError> {
    let (acts, grads) = layer_arrays(req.out, row)?;
    match method.compute {
        Compute::Layer(f) => Ok(RawMap::Cam(f(acts, grads)).into()),
        Compute::Pass(f) => {
            let r = Row { info: req.info, layer: req.layer, row, class: row_class(req.out, row)?, out: req.out, acts, grads };
            f(&r).map(Computed::from)
        }
        Compute::Passes(start) => {
            let Some((passes, input)) = req.passes else {
                return Err(ServiceError::Internal(format!("{method} needs its own passes, which the request did not set up. This is a bug.")));
            };
            let cx = PassesCtx {
                passes,
                layer: req.layer,
                params: req.params,
                out: req.out,
                row,
                class: row_class(req.out, row)?,
                target: match req.seeds.get(row) {
                    Some(Some(seed)) => Target::Seed(seed.clone()),
                    _ => Target::Class(row_class(req.out, row)?),
                },
                acts,
                input,
                label: method.as_str(),
                proposals: req.proposals,
                probabilities: req.probabilities,
            };
            start(&cx).await
        }
    }
}

/// The model-space input of an all-black image (integrated gradients' baseline): `(0 - mean) / std` per channel.
pub fn black_input(info: &ModelInfo) -> Array3<f32> {
    let [_, h, w] = info.input_shape;
    let black = image::RgbImage::new(w as u32, h as u32);
    crate::preprocess::normalize(&black, info.mean, info.std, info.pixels)
}
