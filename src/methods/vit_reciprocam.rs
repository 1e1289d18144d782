//! ViT ReciproCAM (Byun & Lee, "ViT-ReciproCAM: Gradient and attention-free visual explanations for vision
//! transformer", 2023), as OpenVINO XAI 1.1's `ViTReciproCAM` computes it with its defaults (`use_gaussian=True`,
//! `cls_token=True`): per location (i, j) of the token grid a mosaic, the layer's tokens multiplied by a 3 x 3
//! Gaussian centred on (i, j) (`[1 2 1; 2 4 2; 1 2 1] / 16`, cut at the border) with the class token kept; the
//! mosaic replaces the residual stream between two blocks where the next block adds it back, and the same mask
//! applied to that block's first LayerNorm output (computed on the unmasked tokens) replaces that output
//! ([`crate::onnx::token_head`]). The map at (i, j) is the target's score of copy (i, j), before a final Softmax.
//!
//! `layer` names the residual stream or that LayerNorm's output (camserve's default layer for a ViT, the last
//! block's `norm1`, is the latter: OpenVINO XAI's default target, the Add before the last block, pairs with it).
//! It costs one forward to the layer (the tokens, class token included) and h x w passes of the part after it
//! ([`crate::backend::engine::PlanKey::TokenHead`]).

use ndarray::{Array2, Array3};

use super::{Compute, Kind, MethodDef, Passes, PassesCtx, Pending, RawMap};
use crate::backend::engine::{ModelInfo, PlanKey};
use crate::error::ServiceError;
use crate::onnx::rewrite::LayerLayout;
use crate::onnx::token_head::gaussian_mask;

/// Row `k` of the token head's input `[1, T, D + 1]`: the tokens `[T, D]` and mask `k` in the last column.
pub fn mosaic_row(tokens: &Array2<f32>, mask: &[f32]) -> Array3<f32> {
    let (t, d) = tokens.dim();
    Array3::from_shape_fn((1, t, d + 1), |(_, i, j)| if j < d { tokens[[i, j]] } else { mask[i] })
}

fn internal(what: &str) -> ServiceError {
    ServiceError::Internal(format!("ViT ReciproCAM: {what}. This is a bug."))
}

/// ViT ReciproCAM's map `[h, w]` of `class` for the preprocessed image `input` at token layer `layer`.
pub async fn run(passes: &Passes<'_>, layer: &str, input: &Array3<f32>, class: usize, label: &str) -> Result<Array2<f32>, ServiceError> {
    let info = passes.info;
    let head = info.token_head(layer).map_err(|e| internal(&e))?.clone();
    let l = info.layer(layer).ok_or_else(|| internal("the layer is gone"))?;
    let LayerLayout::Tokens { prefix } = l.layout else { return Err(internal("not a token layer")) };
    let (h, w) = (l.dims[2] as usize, l.dims[3] as usize);
    if prefix + h * w != head.tokens {
        return Err(internal(&format!("{} tokens, not {prefix} + {h} x {w}", head.tokens)));
    }
    let tapped = passes.outputs(&PlanKey::Tap(head.x.clone()), 1, label, |_| input.clone()).await?;
    let tokens = Array2::from_shape_vec((head.tokens, head.dim), tapped.row(0).to_vec()).map_err(|e| internal(&e.to_string()))?;
    let plan = PlanKey::TokenHead(layer.to_string());
    let logits = passes.outputs(&plan, h * w, label, |k| mosaic_row(&tokens, &gaussian_mask(prefix, (h, w), k))).await?;
    Array2::from_shape_vec((h, w), logits.column(class).to_vec()).map_err(|e| internal(&e.to_string()))
}

fn start<'a>(cx: &'a PassesCtx<'a>) -> Pending<'a> {
    Box::pin(async move { Ok(RawMap::Cam(run(cx.passes, cx.layer, cx.input, cx.class, cx.label).await?).into()) })
}

/// The registry's entry: a forward to the layer, then one pass of the part after it per location of the grid.
pub const DEF: MethodDef = MethodDef {
    pass: crate::backend::batcher::PassKind::Head,
    refuses_at: ModelInfo::why_no_token_head,
    cost: |info, layer, _| 1 + info.layer(layer).map_or(0, |l| l.dims.iter().skip(2).map(|&d| d.max(1) as u64).product::<u64>()),
    ..MethodDef::new("vit_reciprocam", Kind::Cam, Compute::Passes(start))
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mosaic_row_is_the_tokens_and_the_mask_column() {
        let tokens = Array2::from_shape_fn((5, 3), |(i, j)| (10 * i + j) as f32);
        let mask = gaussian_mask(1, (2, 2), 3);
        let row = mosaic_row(&tokens, &mask);
        assert_eq!(row.dim(), (1, 5, 4));
        for i in 0..5 {
            for j in 0..3 {
                assert_eq!(row[[0, i, j]], tokens[[i, j]]);
            }
            assert_eq!(row[[0, i, 3]], mask[i]);
        }
        assert_eq!(mask, vec![1.0, 0.0625, 0.125, 0.125, 0.25]);
    }
}
