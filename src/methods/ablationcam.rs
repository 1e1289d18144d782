//! Ablation-CAM (Desai & Ramaswamy 2020), as pytorch-grad-cam 1.5.7's `AblationCAM`: channel k's weight is the
//! relative drop of the target's logit when the channel is ablated, (y - y_k) / y; the map is relu(sum_k w_k A_k).
//! A channel is ablated as its `AblationLayer` does: set to 0 when the layer's minimum is 0 (after a ReLU), else to
//! that minimum minus 1e7. Only the part of the model after the layer runs for the ablated batches
//! ([`crate::backend::engine::PlanKey::Head`], built at rewrite time): the backbone is not rerun.
//!
//! One difference from the reference: pytorch-grad-cam takes the minimum of the whole ablation batch, which after
//! the first ablation already holds the ablation value, so with negative activations its later rows go 1e7 lower
//! each time; here every row uses the layer's own minimum. Both saturate the logit the same way in practice, and
//! they agree exactly when the layer is non-negative (the usual case: the default layer ends in a ReLU).

use ndarray::{Array2, ArrayView3, Axis};

use super::{Compute, Kind, MethodDef, Passes, PassesCtx, Pending, RawMap};
use crate::backend::engine::ModelInfo;
use crate::error::ServiceError;
use crate::maths::cam;

/// The value an ablated channel is set to.
pub fn ablation_value(acts: ArrayView3<f32>) -> f32 {
    let min = acts.iter().copied().fold(f32::INFINITY, f32::min);
    if min == 0.0 { 0.0 } else { min - 1e7 }
}

/// Ablation-CAM's map for target `class`, whose logit on the image is `y`.
pub async fn run(passes: &Passes<'_>, layer: &str, acts: ArrayView3<'_, f32>, class: usize, y: f32, label: &str) -> Result<Array2<f32>, ServiceError> {
    let k = acts.len_of(Axis(0));
    let value = ablation_value(acts);
    let logits = passes
        .head_logits(layer, k, label, |i| {
            let mut a = acts.to_owned();
            a.index_axis_mut(Axis(0), i).fill(value);
            a
        })
        .await?;
    let weights: Vec<f32> = logits.column(class).iter().map(|&yk| (y - yk) / y).collect();
    Ok(cam::weighted(acts, &weights))
}

/// The registry's entry: one pass of the part after the layer per channel, counted as a whole forward (an upper
/// bound).
pub const DEF: MethodDef = MethodDef {
    pass: crate::backend::batcher::PassKind::Head,
    refuses_at: ModelInfo::why_no_head,
    cost: |info, layer, _| info.layer(layer).map_or(0, |l| l.dims[1] as u64),
    ..MethodDef::new("ablationcam", Kind::Cam, Compute::Passes(start))
};


fn start<'a>(cx: &'a PassesCtx<'a>) -> Pending<'a> {
    Box::pin(async move {
        let y = cx.out.logits[[cx.row, cx.class]];
        Ok(RawMap::Cam(run(cx.passes, cx.layer, cx.acts, cx.class, y, cx.label).await?).into())
    })
}
