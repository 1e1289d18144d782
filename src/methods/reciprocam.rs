//! ReciproCAM (Byun & Lee, "Recipro-CAM: Fast gradient-free visual explanations for convolutional neural
//! networks", 2022), as OpenVINO XAI 1.1's `ReciproCAM` computes it for a CNN: the layer's feature map `[C, h, w]`
//! is copied once per spatial location, copy `i * w + j` keeping location (i, j) of every channel and zero
//! elsewhere (the "mosaic" feature maps); each copy runs through the part of the model after the layer; the map at
//! (i, j) is the target's score of copy (i, j). The score is the model's output before a final Softmax (OpenVINO
//! XAI's `search_softmax`; camserve strips that Softmax at load time). OpenVINO XAI then min-max scales each map
//! to 0..255 (`embed_scaling`); camserve returns the raw scores and min-max normalises them for display, as every
//! map.
//!
//! It costs h x w passes of the part after the layer (49 at a 7 x 7 layer), which run as batches of
//! [`crate::backend::engine::PlanKey::Head`] like Ablation-CAM's: the backbone is not rerun.

use ndarray::{s, Array2, Array3, ArrayView3};

use super::{Compute, Kind, MethodDef, Passes, PassesCtx, Pending, RawMap};
use crate::backend::engine::ModelInfo;
use crate::error::ServiceError;

/// Mosaic feature map `k` (location `(k / w, k % w)`): the layer's activations at that location, zero elsewhere.
pub fn mosaic(acts: ArrayView3<f32>, k: usize) -> Array3<f32> {
    let (c, h, w) = acts.dim();
    let (i, j) = (k / w, k % w);
    let mut out = Array3::zeros((c, h, w));
    out.slice_mut(s![.., i, j]).assign(&acts.slice(s![.., i, j]));
    out
}

/// ReciproCAM's map `[h, w]` for target `class`: each location's mosaic scored by the part after `layer`.
pub async fn run(passes: &Passes<'_>, layer: &str, acts: ArrayView3<'_, f32>, class: usize, label: &str) -> Result<Array2<f32>, ServiceError> {
    let (_, h, w) = acts.dim();
    let logits = passes.head_logits(layer, h * w, label, |k| mosaic(acts, k)).await?;
    let scores = logits.column(class).to_vec();
    Array2::from_shape_vec((h, w), scores).map_err(|e| ServiceError::Internal(format!("ReciproCAM's map: {e}. This is a bug.")))
}

/// The registry's entry: one pass of the part after the layer per location of the layer's grid, counted as a whole
/// forward (an upper bound).
pub const DEF: MethodDef = MethodDef {
    pass: crate::backend::batcher::PassKind::Head,
    refuses_at: ModelInfo::why_no_head,
    cost: |info, layer, _| info.layer(layer).map_or(0, |l| l.dims.iter().skip(2).map(|&d| d.max(1) as u64).product()),
    ..MethodDef::new("reciprocam", Kind::Cam, Compute::Passes(start))
};


fn start<'a>(cx: &'a PassesCtx<'a>) -> Pending<'a> {
    Box::pin(async move { Ok(RawMap::Cam(run(cx.passes, cx.layer, cx.acts, cx.class, cx.label).await?).into()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_mosaic_keeps_one_location_of_every_channel() {
        let acts = Array3::from_shape_fn((3, 2, 4), |(c, i, j)| (100 * c + 10 * i + j + 1) as f32);
        for k in 0..8 {
            let m = mosaic(acts.view(), k);
            let (i, j) = (k / 4, k % 4);
            for ((c, y, x), &v) in m.indexed_iter() {
                let expected = if (y, x) == (i, j) { acts[[c, y, x]] } else { 0.0 };
                assert_eq!(v, expected, "mosaic {k} at ({c}, {y}, {x})");
            }
        }
    }
}
