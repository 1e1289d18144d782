//! Finer-CAM (Zhang et al., CVPR 2025), as pytorch-grad-cam's `FinerCAM` with its defaults: Grad-CAM of the score
//! f = sum_j p_j (y_t - alpha y_j) / (sum_j p_j + 1e-9) over the three classes j whose logits are closest to the
//! target's, p = softmax(logits), alpha = 1. Its seed is df/dlogits (softmax weights differentiated too, as
//! autograd does in the reference), so it needs only the logits of the request's pass before its own gradient
//! pass.

use ndarray::ArrayView1;

use super::{Compute, Kind, MethodDef, PassesCtx, Pending, RawMap};
use crate::backend::engine::ModelInfo;
use crate::maths::cam;

pub const ALPHA: f64 = 1.0;
/// How many similar classes the target is compared with (pytorch-grad-cam's comparison_categories 1, 2, 3).
pub const COMPARISONS: usize = 3;

/// The classes whose logits are closest to the target's (ties: the lower index first), at most `n`.
pub fn similar_classes(logits: ArrayView1<f32>, target: usize, n: usize) -> Vec<usize> {
    let yt = logits[target];
    let mut others: Vec<usize> = (0..logits.len()).filter(|&j| j != target).collect();
    others.sort_by(|&a, &b| (logits[a] - yt).abs().total_cmp(&(logits[b] - yt).abs()).then(a.cmp(&b)));
    others.truncate(n);
    others
}

/// df/dlogits for the target and its most similar classes, in float64.
pub fn seed(logits: ArrayView1<f32>, target: usize, alpha: f64, comparisons: usize) -> Vec<f32> {
    let y: Vec<f64> = logits.iter().map(|&v| v as f64).collect();
    let max = y.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = y.iter().map(|v| (v - max).exp()).collect();
    let z: f64 = e.iter().sum();
    let p: Vec<f64> = e.iter().map(|v| v / z).collect();
    let js = similar_classes(logits, target, comparisons);
    const EPS: f64 = 1e-9;
    let s: f64 = js.iter().map(|&j| p[j]).sum();
    let num: f64 = js.iter().map(|&j| p[j] * (y[target] - alpha * y[j])).sum();
    (0..y.len())
        .map(|i| {
            let in_j = js.contains(&i);
            // dN/dy_i: through the softmax weights, then through y_t and y_j directly.
            let mut dn: f64 = js.iter().map(|&j| p[j] * (f64::from(i == j) - p[i]) * (y[target] - alpha * y[j])).sum();
            if i == target {
                dn += s;
            }
            if in_j {
                dn -= alpha * p[i];
            }
            let ds = if in_j { p[i] } else { 0.0 } - p[i] * s;
            ((dn * (s + EPS) - num * ds) / ((s + EPS) * (s + EPS))) as f32
        })
        .collect()
}

/// The registry's entry: one seeded gradient pass after the request's, counted as a forward and a backward.
pub const DEF: MethodDef = MethodDef {
    pass: crate::backend::batcher::PassKind::Explain,
    refuses_at: one_class,
    cost: |_, _, _| 3,
    ..MethodDef::new("finercam", Kind::Cam, Compute::Passes(start))
};

/// A model of one class has no other class to compare with.
fn one_class(info: &ModelInfo, _: &str) -> Option<String> {
    (info.num_classes < 2).then(|| "Finer-CAM compares the target with other classes".into())
}

fn start<'a>(cx: &'a PassesCtx<'a>) -> Pending<'a> {
    Box::pin(async move {
        let seed = seed(cx.out.logits.row(cx.row), cx.class, ALPHA, COMPARISONS);
        let grads = cx.passes.seeded_gradients(cx.layer, cx.input, seed, cx.label).await?;
        Ok(RawMap::Cam(cam::gradcam(cx.acts, grads.view())).into())
    })
}
