//! What follows a layer in a classifier: the weights of a global-average-pool + linear head, which plain CAM
//! (Zhou et al. 2016) reads. The sub-graph from a layer to the logits, which Ablation-CAM runs, is
//! [`super::rewrite::Explainable::head_model`].

use super::attr;
use super::graph::GraphIndex;
use super::proto::GraphProto;

/// The linear layer after global average pooling: `logits = W · mean_hw(A) + b`.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearHead {
    /// `[classes, channels]`, row-major.
    pub weights: Vec<f32>,
    pub classes: usize,
    pub channels: usize,
}

impl LinearHead {
    /// The weights of class `k` over the layer's channels.
    pub fn class_weights(&self, k: usize) -> &[f32] {
        &self.weights[k * self.channels..(k + 1) * self.channels]
    }
}

/// Why a layer has no CAM head, for the 422 that refuses `cam`.
pub type NoHead = String;

/// Follows `layer` to `logits` and returns the linear head's weights if the path is exactly: global average pooling
/// (`GlobalAveragePool`, or `ReduceMean` over the two spatial axes), shape-only ops (`Flatten`, `Reshape` with a
/// constant or computed shape, `Squeeze`, `Identity`), one linear op with constant weights (`Gemm` or `MatMul`), and constant bias `Add`s.
pub fn linear_head(graph: &GraphProto, index: &GraphIndex, layer: &str, logits: &str, channels: usize) -> Result<LinearHead, NoHead> {
    let mut t = layer.to_string();
    let mut pooled = false;
    let mut head: Option<LinearHead> = None;
    for _ in 0..graph.node.len() {
        if t == logits {
            break;
        }
        let consumers = index.consumers_of(&t);
        let [i] = consumers else {
            return Err(format!("tensor `{t}` after the layer feeds {} ops, not one pooling-then-linear chain", consumers.len()));
        };
        let n = &graph.node[*i];
        let op = n.op_type();
        let other_const = |k: usize| n.input.get(k).is_some_and(|s| s.is_empty() || index.constant(graph, s).is_some());
        match op {
            "GlobalAveragePool" if !pooled && head.is_none() => pooled = true,
            "ReduceMean" if !pooled && head.is_none() => {
                let axes = attr::ints(n, "axes").or_else(|| n.input.get(1).and_then(|a| index.const_i64(graph, a)));
                let spatial = axes.as_deref().is_some_and(|a| {
                    let mut a: Vec<i64> = a.iter().map(|&x| if x < 0 { x + 4 } else { x }).collect();
                    a.sort();
                    a == [2, 3]
                });
                if !spatial {
                    return Err(format!("`{}` averages over axes {axes:?}, not the two spatial axes", n.name()));
                }
                pooled = true;
            }
            "Flatten" | "Reshape" | "Squeeze" | "Identity" if pooled && head.is_none() && (1..n.input.len()).all(other_const) => {}
            // PyTorch's `x.view(x.size(0), -1)` reshapes with a shape computed from the image's batch size. After the
            // pooling the tensor is [N, C, 1, 1], and any Reshape keeps its values in channel order: the linear layer
            // after it must still take exactly the layer's channels (checked in `matrix`).
            "Reshape" if pooled && head.is_none() && n.input[0] == t => {}
            "Gemm" if pooled && head.is_none() && n.input[0] == t => {
                if attr::int_or(n, "transA", 0) != 0 {
                    return Err("the linear layer transposes its input".into());
                }
                let alpha = attr::float_or(n, "alpha", 1.0);
                let (dims, b) = index.const_f32(graph, &n.input[1]).ok_or("the linear layer's weights are not constant")?;
                let trans_b = attr::int_or(n, "transB", 0) != 0;
                head = Some(matrix(&dims, &b, trans_b, alpha, channels)?);
                if n.input.get(2).is_some_and(|c| !c.is_empty() && index.constant(graph, c).is_none()) {
                    return Err("the linear layer's bias is not constant".into());
                }
            }
            "MatMul" if pooled && head.is_none() && n.input[0] == t => {
                let (dims, b) = index.const_f32(graph, &n.input[1]).ok_or("the linear layer's weights are not constant")?;
                head = Some(matrix(&dims, &b, false, 1.0, channels)?);
            }
            "Add" if head.is_some() && n.input.iter().any(|s| s != &t && index.constant(graph, s).is_some()) => {}
            _ => {
                let stage = if !pooled { "before global average pooling" } else if head.is_none() { "before the linear layer" } else { "after the linear layer" };
                return Err(format!("op `{op}` {stage}: the layer is not followed by global average pooling and one linear layer"));
            }
        }
        t = n.output.first().cloned().unwrap_or_default();
    }
    if t != logits {
        return Err("the chain after the layer does not reach the logits".into());
    }
    head.ok_or_else(|| "no linear layer after the pooling".into())
}

/// `W [classes, channels]` from a weight matrix `B` of `x · op(B)`: `B` is `[channels, classes]`, or
/// `[classes, channels]` when transposed.
fn matrix(dims: &[i64], b: &[f32], transposed: bool, alpha: f32, channels: usize) -> Result<LinearHead, NoHead> {
    let [r, c] = dims else { return Err(format!("the linear layer's weights have shape {dims:?}")) };
    let (rows, cols) = (*r as usize, *c as usize);
    let (classes, inner) = if transposed { (rows, cols) } else { (cols, rows) };
    if inner != channels {
        return Err(format!("the linear layer takes {inner} features; the layer has {channels} channels"));
    }
    let mut weights = vec![0f32; classes * channels];
    for k in 0..classes {
        for ch in 0..channels {
            let v = if transposed { b[k * cols + ch] } else { b[ch * cols + k] };
            weights[k * channels + ch] = alpha * v;
        }
    }
    Ok(LinearHead { weights, classes, channels })
}
