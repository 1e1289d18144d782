//! SmoothGrad (Smilkov et al. 2017): the mean plain input gradient over `samples` noisy copies of the model-space
//! input, with Gaussian noise of sigma = `noise` x (max - min) of that input (0.15 by default, as the paper). What
//! Captum's `NoiseTunnel(Saliency(abs=False))` with `nt_type="smoothgrad"` computes. The noise comes from ChaCha8
//! seeded per request; the seed is returned, so the same request with it reproduces the map bit for bit. With
//! noise 0 every copy is the input and the map is `saliency`'s exactly.

use ndarray::{Array3, Axis, Zip};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use super::params::{Param, ParamKind};
use super::{Compute, Kind, MethodDef, Passes, PassesCtx, Pending, RawMap, Returned};
use crate::backend::batcher::Target;
use crate::error::ServiceError;
use crate::onnx::rules::ReluRule;

/// Sigma of the noise for `input`.
pub fn sigma(input: &Array3<f32>, noise: f32) -> f32 {
    let (lo, hi) = input.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    noise * (hi - lo)
}

/// The noisy copies' noise, in the order the copies are made: copy i is `input + noise[i]`.
pub struct Noise {
    rng: ChaCha8Rng,
    normal: Option<Normal<f32>>,
}

impl Noise {
    pub fn new(seed: u64, sigma: f32) -> Noise {
        let normal = (sigma > 0.0).then(|| Normal::new(0.0, sigma)).and_then(Result::ok);
        Noise { rng: ChaCha8Rng::seed_from_u64(seed), normal }
    }

    /// The next noisy copy of `input`.
    pub fn copy(&mut self, input: &Array3<f32>) -> Array3<f32> {
        match &self.normal {
            None => input.clone(),
            Some(n) => input.mapv(|v| v + n.sample(&mut self.rng)),
        }
    }
}

/// The mean of the plain input gradients of `target` at `n` inputs, summed in float64.
pub async fn mean_gradient<F>(passes: &Passes<'_>, layer: &str, target: Target, n: usize, label: &str, row: F) -> Result<Array3<f32>, ServiceError>
where
    F: FnMut(usize) -> Array3<f32>,
{
    let grads = passes.plain_gradients(layer, target, n, label, row).await?;
    let mut sum = Array3::<f64>::zeros((grads.shape()[1], grads.shape()[2], grads.shape()[3]));
    for g in grads.axis_iter(Axis(0)) {
        Zip::from(&mut sum).and(&g).for_each(|s, &v| *s += v as f64);
    }
    Ok(sum.mapv(|s| (s / n as f64) as f32))
}

/// SmoothGrad's map `[C, H, W]` of `target` (a class, or a detection's or segment's seed).
#[allow(clippy::too_many_arguments)]
pub async fn run(
    passes: &Passes<'_>,
    layer: &str,
    input: &Array3<f32>,
    target: Target,
    samples: usize,
    noise: f32,
    seed: u64,
    label: &str,
) -> Result<Array3<f32>, ServiceError> {
    let mut rng = Noise::new(seed, sigma(input, noise));
    mean_gradient(passes, layer, target, samples, label, |_| rng.copy(input)).await
}

/// Its noisy copies.
pub const SAMPLES: Param = Param { name: "samples", kind: ParamKind::Count { default: 25, max: 1000 }, help: "SmoothGrad's noisy copies" };
/// Its noise level: sigma = noise * (max - min) of the model-space input.
pub const NOISE: Param = Param { name: "noise", kind: ParamKind::Number { default: 0.15, min: 0.0, max: 10.0 }, help: "SmoothGrad's noise level" };
/// Its noise seed (random when not given; the explanation returns the one used). D-RISE's masks share it.
pub const SEED: Param = Param { name: "seed", kind: ParamKind::Seed, help: "the seed of SmoothGrad's noise and D-RISE's masks (default: random; the answer gives the one used)" };

/// The registry's entry: `samples` gradient passes through the plain chain (a forward and a backward each).
pub const DEF: MethodDef = MethodDef {
    pass: crate::backend::batcher::PassKind::Explain,
    batch_rule: Some(ReluRule::Plain),
    cost: |_, _, params| 3 * params.count(&SAMPLES) as u64,
    params: &[&SAMPLES, &NOISE, &SEED],
    ..MethodDef::new("smoothgrad", Kind::Gradient, Compute::Passes(start))
};

/// Runs with the request's seed, or a fresh one, which the explanation returns.
fn start<'a>(cx: &'a PassesCtx<'a>) -> Pending<'a> {
    Box::pin(async move {
        let seed = cx.params.integer(&SEED).unwrap_or_else(rand::random);
        let g = run(cx.passes, cx.layer, cx.input, cx.target.clone(), cx.params.count(&SAMPLES), cx.params.number(&NOISE), seed, cx.label).await?;
        Ok(super::Computed { map: RawMap::Gradient(g), returned: Returned { seed: Some(seed), ..Default::default() } })
    })
}
