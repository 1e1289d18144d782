//! The part of a transformer after a token layer, as OpenVINO XAI 1.1's `ViTReciproCAM` runs it: the residual
//! stream `x` between two blocks feeds the next block's first LayerNorm and that block's residual `Add`; a mosaic
//! (the tokens multiplied by a per-token mask) replaces `x` at the `Add`, and the same mask applied to the
//! LayerNorm's output (computed on the *unmasked* tokens) replaces that output where the block reads it. This
//! module finds the pair of tensors and builds that graph; [`crate::methods`] builds the masks.
//!
//! The graph has one input, [`MOSAIC`], `[N, 1, T, D + 1]`: per row the layer's `T` tokens of width `D`, and in the
//! last column the token's mask. One input keeps the batcher's one-array-per-row interface.

use super::graph::{node_label, GraphIndex};
use super::proto::GraphProto;

/// The token head's input.
pub const MOSAIC: &str = "camserve.mosaic";

/// The two tensors a token head masks, and the token layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenHead {
    /// The residual stream `[N, T, D]` (the LayerNorm's input, the residual `Add`'s other input).
    pub x: String,
    /// The LayerNorm's output `[N, T, D]`.
    pub norm: String,
    /// Tokens `T` and width `D`.
    pub tokens: usize,
    pub dim: usize,
}

/// The token head at `layer`: `layer` is either the residual stream `x` itself or the output of the LayerNorm that
/// reads it. `x` must feed exactly one `LayerNormalization` and one `Add` (and shape-only `Shape` nodes), as
/// between two pre-norm transformer blocks; `dims` are the layer's own `[1, T, D]`.
pub fn find(graph: &GraphProto, index: &GraphIndex, layer: &str, dims: &[i64]) -> Result<TokenHead, String> {
    let [_, t, d] = dims else {
        return Err(format!("layer `{layer}` is not a token layer [N, T, D] (dims {dims:?})"));
    };
    let op_of = |i: usize| graph.node[i].op_type();
    let produced_by_norm = index.producer.get(layer).filter(|&&p| op_of(p) == "LayerNormalization" && graph.node[p].output.first().map(String::as_str) == Some(layer));
    let x = match produced_by_norm {
        Some(&p) => graph.node[p].input.first().cloned().unwrap_or_default(),
        None => layer.to_string(),
    };
    let readers: Vec<usize> = index.consumers_of(&x).iter().copied().filter(|&c| op_of(c) != "Shape").collect();
    let norms: Vec<usize> = readers.iter().copied().filter(|&c| op_of(c) == "LayerNormalization" && graph.node[c].input.first() == Some(&x)).collect();
    let adds: Vec<usize> = readers.iter().copied().filter(|&c| op_of(c) == "Add").collect();
    if norms.len() != 1 || adds.len() != 1 || readers.len() != 2 {
        let ops: Vec<String> = readers.iter().map(|&c| format!("{} `{}`", op_of(c), node_label(&graph.node[c]))).collect();
        return Err(format!(
            "ViT ReciproCAM masks the residual stream between two transformer blocks, which feeds one LayerNormalization and one residual Add; `{x}` feeds {}",
            if ops.is_empty() { "nothing".to_string() } else { ops.join(", ") }
        ));
    }
    let norm = graph.node[norms[0]].output.first().cloned().unwrap_or_default();
    Ok(TokenHead { x, norm, tokens: *t as usize, dim: *d as usize })
}

/// Rewires `graph` (a copy of the model, its outputs already set to the logits) into the token head of `head`:
/// [`MOSAIC`] is split into `x` and the mask `m`; the residual `Add` reads `x * m`; every reader of the LayerNorm's
/// output reads `norm * m`; the nodes that computed `x` are dropped by the caller's pruning.
pub fn rewire(graph: &mut GraphProto, head: &TokenHead) {
    use super::builder::node;
    use super::tensor::i64_tensor;
    let (t, d) = (head.tokens as i64, head.dim as i64);
    let masked_x = format!("{}/camserve_masked", head.x);
    let masked_norm = format!("{}/camserve_masked", head.norm);
    let p = |s: &str| format!("camserve/mosaic/{s}");
    // Readers first (node indices are still the file's): the residual Add of x, every reader of the norm's output.
    for n in graph.node.iter_mut() {
        let is_norm = n.op_type() == "LayerNormalization" && n.input.first() == Some(&head.x);
        if n.op_type() == "Add" {
            n.input.iter_mut().filter(|i| **i == head.x).for_each(|i| *i = masked_x.clone());
        }
        if !is_norm {
            n.input.iter_mut().filter(|i| **i == head.norm).for_each(|i| *i = masked_norm.clone());
        }
    }
    graph.node.retain(|n| !n.output.contains(&head.x));
    let constant = |name: &str, v: &[i64]| node("Constant", &[], name, vec![super::attr::make_tensor("value", i64_tensor("", &[v.len() as i64], v))]);
    let front = vec![
        constant(&p("shape"), &[-1, t, d + 1]),
        node("Reshape", &[MOSAIC, &p("shape")], &p("rows"), vec![]),
        constant(&p("zero"), &[0]),
        constant(&p("dim"), &[d]),
        constant(&p("end"), &[d + 1]),
        constant(&p("axis"), &[2]),
        node("Slice", &[&p("rows"), &p("zero"), &p("dim"), &p("axis")], &head.x, vec![]),
        node("Slice", &[&p("rows"), &p("dim"), &p("end"), &p("axis")], &p("mask"), vec![]),
        node("Mul", &[&head.x, &p("mask")], &masked_x, vec![]),
    ];
    graph.node.splice(0..0, front);
    if let Some(k) = graph.node.iter().position(|n| n.output.first() == Some(&head.norm)) {
        graph.node.insert(k + 1, node("Mul", &[&head.norm, &p("mask")], &masked_norm, vec![]));
    }
}

/// OpenVINO XAI's ViTReciproCAM mask for grid location `k` (`(k / w, k % w)`) over `prefix + h * w` tokens: the
/// prefix (class) tokens kept (1), the patch tokens weighted by the 3 x 3 Gaussian `[1 2 1; 2 4 2; 1 2 1] / 16`
/// centred on the location and cut at the grid's border, 0 elsewhere.
pub fn gaussian_mask(prefix: usize, (h, w): (usize, usize), k: usize) -> Vec<f32> {
    const G: [[f32; 3]; 3] = [[1.0 / 16.0, 1.0 / 8.0, 1.0 / 16.0], [1.0 / 8.0, 1.0 / 4.0, 1.0 / 8.0], [1.0 / 16.0, 1.0 / 8.0, 1.0 / 16.0]];
    let (ci, cj) = ((k / w) as isize, (k % w) as isize);
    let mut m = vec![1.0; prefix];
    m.extend((0..h * w).map(|t| {
        let (di, dj) = ((t / w) as isize - ci, (t % w) as isize - cj);
        if di.abs() <= 1 && dj.abs() <= 1 {
            G[(di + 1) as usize][(dj + 1) as usize]
        } else {
            0.0
        }
    }));
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gaussian_mask_is_centred_and_cut_at_the_border() {
        let m = gaussian_mask(1, (3, 4), 0);
        assert_eq!(m.len(), 13);
        assert_eq!(m[0], 1.0, "the class token is kept");
        // Location (0, 0): its own token 1/4, right and below 1/8, diagonal 1/16, the rest 0.
        let grid = &m[1..];
        assert_eq!(&grid[0..4], &[0.25, 0.125, 0.0, 0.0]);
        assert_eq!(&grid[4..8], &[0.125, 0.0625, 0.0, 0.0]);
        assert!(grid[8..].iter().all(|&v| v == 0.0));
        let m = gaussian_mask(2, (3, 4), 6); // (1, 2): a full 3 x 3 window
        assert_eq!(&m[..2], &[1.0, 1.0]);
        let s: f32 = m[2..].iter().sum();
        assert_eq!(s, 1.0, "an interior window keeps the whole kernel");
        assert_eq!(m[2 + 6], 0.25);
    }
}
