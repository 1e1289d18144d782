//! The attention rollouts of vision transformers (`crate::maths::rollout`): maps on the token grid from the
//! attention probabilities of every block (Abnar & Zuidema), and their gradients (Chefer et al.'s gradient
//! rollout), all from the request's explain pass.

use ndarray::{Array2, ArrayView3, Axis};

use super::{Compute, Kind, MethodDef, RawMap, Row};
use crate::error::ServiceError;
use crate::maths::rollout::{self, TokenGrid};

const fn attention(name: &'static str, f: fn(&Row<'_>) -> Result<RawMap, ServiceError>) -> MethodDef {
    MethodDef::new(name, Kind::Attention, Compute::Pass(f))
}

pub const ATTENTION_ROLLOUT: MethodDef = attention("attention_rollout", |r| {
    with_blocks(r, |blocks, grid| rollout::attention_rollout(&blocks.iter().map(|b| b.0).collect::<Vec<_>>(), grid))
});
pub const GRADIENT_ROLLOUT: MethodDef = attention("gradient_rollout", |r| with_blocks(r, |blocks, grid| rollout::gradient_rollout(blocks, grid)));

type Blocks<'a> = [(ArrayView3<'a, f32>, ArrayView3<'a, f32>)];

/// The row's attention blocks (probabilities and their gradients, first block first) on the model's token grid.
fn with_blocks(r: &Row<'_>, f: impl FnOnce(&Blocks<'_>, TokenGrid) -> Result<Array2<f32>, String>) -> Result<RawMap, ServiceError> {
    let bug = |why: String| ServiceError::Internal(format!("attention rollout: {why}. This is a bug."));
    let a = r.info.attention.as_ref().ok_or_else(|| bug("the model has no attention blocks".into()))?;
    if r.out.attention.len() != a.outputs.len() {
        return Err(bug(format!("{} attention blocks returned for {}", r.out.attention.len(), a.outputs.len())));
    }
    let grid = TokenGrid { prefix: a.prefix, h: a.grid.0 as usize, w: a.grid.1 as usize };
    let blocks: Vec<_> = r.out.attention.iter().map(|(p, g)| (p.index_axis(Axis(0), r.row), g.index_axis(Axis(0), r.row))).collect();
    f(&blocks, grid).map(RawMap::Cam).map_err(bug)
}
