//! Integrated gradients (Sundararajan et al. 2017), as Captum's `IntegratedGradients` with its defaults:
//! attribution = (x - x') * sum_i w_i * grad f(x' + a_i (x - x')), with the Gauss-Legendre nodes a_i and weights
//! w_i on [0, 1] (Captum's `gausslegendre`, 50 steps by default). The baseline x' is the model-space image of black
//! pixels. The interpolated inputs run as batches through the explain graph's plain input gradient.

use ndarray::{Array3, Axis, Zip};

use super::params::{Param, ParamKind};
use super::{black_input, Compute, Heatmap, Kind, MethodDef, Passes, PassesCtx, Pending, RawMap};
use crate::backend::batcher::Target;
use crate::error::ServiceError;
use crate::onnx::rules::ReluRule;

/// Gauss-Legendre nodes and weights on [0, 1] (as Captum: 0.5 * (1 + x_i) and 0.5 * w_i of the rule on [-1, 1]).
/// The roots of P_n by Newton's method from Chebyshev guesses, weights 2 / ((1 - x^2) P_n'(x)^2): what numpy's
/// `leggauss` gives, to rounding. (The `gauss-quad` crate computes the same but pulls in nalgebra.)
pub fn gauss_legendre(n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut alphas = vec![0f64; n];
    let mut weights = vec![0f64; n];
    for i in 0..n {
        let mut x = (std::f64::consts::PI * (i as f64 + 0.75) / (n as f64 + 0.5)).cos();
        let mut dp = 1.0;
        for _ in 0..100 {
            // P_n(x) and P_n'(x) by the three-term recurrence.
            let (mut p0, mut p1) = (1.0f64, x);
            for k in 2..=n {
                let p2 = ((2 * k - 1) as f64 * x * p1 - (k - 1) as f64 * p0) / k as f64;
                p0 = p1;
                p1 = p2;
            }
            let pn = if n == 0 { 1.0 } else { p1 };
            let pm = if n == 0 { 0.0 } else { p0 };
            dp = n as f64 * (x * pn - pm) / (x * x - 1.0);
            let dx = pn / dp;
            x -= dx;
            if dx.abs() < 1e-16 {
                break;
            }
        }
        let w = 2.0 / ((1.0 - x * x) * dp * dp);
        // Ascending in alpha, as numpy's leggauss (roots ascending).
        alphas[n - 1 - i] = 0.5 * (1.0 + x);
        weights[n - 1 - i] = 0.5 * w;
    }
    (alphas, weights)
}

/// The attribution `[C, H, W]` of `target` (a class, or a detection's or segment's seed) at `input` against
/// `baseline`.
pub async fn run(
    passes: &Passes<'_>,
    layer: &str,
    input: &Array3<f32>,
    baseline: &Array3<f32>,
    target: Target,
    steps: usize,
    label: &str,
) -> Result<Array3<f32>, ServiceError> {
    let (alphas, weights) = if steps == 1 { (vec![0.5], vec![1.0]) } else { gauss_legendre(steps) };
    let diff = input - baseline;
    let grads = passes
        .plain_gradients(layer, target, steps, label, |i| {
            let a = alphas[i] as f32;
            Zip::from(baseline).and(&diff).map_collect(|&b, &d| b + a * d)
        })
        .await?;
    let mut total = ndarray::Array3::<f64>::zeros(input.dim());
    for (g, &w) in grads.axis_iter(Axis(0)).zip(&weights) {
        Zip::from(&mut total).and(&g).for_each(|t, &v| *t += w * v as f64);
    }
    Ok(Zip::from(&total).and(&diff).map_collect(|&t, &d| (t * d as f64) as f32))
}

/// Its steps along the straight path from the baseline.
pub const STEPS: Param = Param { name: "steps", kind: ParamKind::Count { default: 50, max: 1000 }, help: "integrated gradients' steps" };

/// The registry's entry: `steps` gradient passes through the plain chain (a forward and a backward each). The
/// attribution `[C, H, W]` is the raw output; the heatmap is its channel-summed magnitude.
pub const DEF: MethodDef = MethodDef {
    pass: crate::backend::batcher::PassKind::Explain,
    heatmap: Heatmap::SummedMagnitude,
    batch_rule: Some(ReluRule::Plain),
    cost: |_, _, params| 3 * params.count(&STEPS) as u64,
    params: &[&STEPS],
    ..MethodDef::new("integrated_gradients", Kind::Gradient, Compute::Passes(start))
};

fn start<'a>(cx: &'a PassesCtx<'a>) -> Pending<'a> {
    Box::pin(async move {
        let baseline = black_input(cx.passes.info);
        let a = run(cx.passes, cx.layer, cx.input, &baseline, cx.target.clone(), cx.params.count(&STEPS), cx.label).await?;
        Ok(RawMap::Gradient(a).into())
    })
}
