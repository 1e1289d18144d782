//! Which tensors carry a gradient from the image input to the logits.
//!
//! A tensor carries the gradient when it is a float tensor computed, through inputs that ops differentiate, from
//! the image input. Shapes, indices, masks, pad amounts and positional encodings built from shapes are computed
//! from the input too (`Shape(x)`), but through inputs that carry no derivative (`Shape`'s output does not
//! change when pixel values do; a Reshape's shape input or a Gather's indices are not differentiated; Floor,
//! Ceil, Round and comparisons have a zero derivative wherever they have one). Only nodes on paths made of
//! differentiable edges need backward rules (docs/DESIGN.md, "Gradient path"); every other node runs forward only.

use std::collections::HashSet;

use super::graph::GraphIndex;
use super::probe::Probe;
use super::proto::{GraphProto, NodeProto};

/// Ops whose outputs carry no gradient at all: their outputs are integers or booleans, or piecewise constant in
/// their inputs (zero derivative almost everywhere, which is what PyTorch's autograd gives them too).
const NO_GRADIENT: &[&str] = &[
    "Shape", "Size", "NonZero", "ArgMax", "ArgMin", "Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual",
    "Not", "And", "Or", "Xor", "IsNaN", "IsInf", "Sign", "Floor", "Ceil", "Round", "ConstantOfShape", "Range",
    "EyeLike", "RandomNormalLike", "RandomUniformLike", "Bernoulli", "Multinomial", "OneHot", "BitShift",
    "BitwiseAnd", "BitwiseOr", "BitwiseXor", "BitwiseNot", "Mod", "QuantizeLinear", "DynamicQuantizeLinear",
];

/// The input positions of `node` through which a gradient flows: `None` means every input.
pub fn differentiable_inputs(node: &NodeProto) -> Option<&'static [usize]> {
    const FIRST: &[usize] = &[0];
    const NONE: &[usize] = &[];
    if !super::is_default_domain(node.domain()) {
        return None;
    }
    let op = node.op_type();
    if NO_GRADIENT.contains(&op) {
        return Some(NONE);
    }
    Some(match op {
        // Data first; shapes, indices, pads, axes, scales, repeats, k after it.
        "Reshape" | "Expand" | "Tile" | "Slice" | "Pad" | "Gather" | "GatherElements" | "GatherND" | "Resize"
        | "Upsample" | "Squeeze" | "Unsqueeze" | "Split" | "ReduceMean" | "ReduceSum" | "ReduceMax" | "ReduceMin"
        | "ReduceL1" | "ReduceL2" | "ReduceLogSumExp" | "ReduceProd" | "ReduceSumSquare" | "CumSum" | "TopK"
        | "Clip" | "Dropout" | "Transpose" | "Flatten" | "Cast" | "CastLike" | "Identity" | "SpaceToDepth"
        | "DepthToSpace" | "ReverseSequence" | "Trilu" | "CenterCropPad" => FIRST,
        // The RoIs get no gradient, as in torchvision's `roi_align` (rules/resample.rs).
        "RoiAlign" => FIRST,
        "ScatterND" | "ScatterElements" | "Scatter" => &[0, 2],
        "Where" => &[1, 2],
        _ => return None,
    })
}

/// Tensors that carry the gradient from `source` (included): float tensors reached through differentiable
/// inputs only.
pub fn carrying(graph: &GraphProto, index: &GraphIndex, probe: &Probe, source: &str) -> HashSet<String> {
    let mut carry: HashSet<String> = HashSet::from([source.to_string()]);
    for &i in &index.order {
        let node = &graph.node[i];
        let fed = match differentiable_inputs(node) {
            None => node.input.iter().any(|s| carry.contains(s)),
            Some(pos) => pos.iter().any(|&k| node.input.get(k).is_some_and(|s| carry.contains(s))),
        };
        if fed {
            carry.extend(node.output.iter().filter(|o| !o.is_empty() && probe.is_float(o)).cloned());
        }
    }
    carry
}

/// Whether input `k` of `node` is one the gradient flows through.
pub fn is_differentiable_input(node: &NodeProto, k: usize) -> bool {
    differentiable_inputs(node).is_none_or(|pos| pos.contains(&k))
}

/// Nodes through which the gradient flows from `source` to `target`, in topological order: nodes with a carrying
/// differentiable input and a carrying output from which `target` is reached through differentiable inputs.
pub fn gradient_path(graph: &GraphProto, index: &GraphIndex, carry: &HashSet<String>, target: &str) -> Vec<usize> {
    let mut reaches: HashSet<&str> = HashSet::from([target]);
    let mut on_path = vec![false; graph.node.len()];
    for &i in index.order.iter().rev() {
        let node = &graph.node[i];
        if !node.output.iter().any(|o| reaches.contains(o.as_str()) && carry.contains(o)) {
            continue;
        }
        let mut fed = false;
        for (k, s) in node.input.iter().enumerate() {
            if !s.is_empty() && carry.contains(s) && is_differentiable_input(node, k) {
                reaches.insert(s.as_str());
                fed = true;
            }
        }
        on_path[i] = fed;
    }
    index.order.iter().copied().filter(|&i| on_path[i]).collect()
}
