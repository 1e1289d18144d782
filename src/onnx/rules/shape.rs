//! Ops that move data without arithmetic: reshapes, Transpose, Concat, Split, Slice, Pad, Identity-likes.

use std::collections::HashMap;

use super::{dy0, input, norm_axis, BackwardRule, RuleCtx};
use crate::onnx::proto::NodeProto;
use crate::onnx::{attr, OnnxError, Result};

pub(super) fn register(m: &mut HashMap<&'static str, BackwardRule>) {
    for op in ["Flatten", "Reshape", "Squeeze", "Unsqueeze"] {
        m.insert(op, reshape);
    }
    for op in ["Identity", "Dropout", "Cast"] {
        m.insert(op, identity);
    }
    m.insert("Transpose", transpose);
    m.insert("Concat", concat);
    m.insert("Split", split);
    m.insert("Slice", slice);
    m.insert("Pad", pad);
}

type Grads = Result<Vec<Option<String>>>;

fn reshape(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], _needs: &[bool]) -> Grads {
    let dy = dy0(node, dy)?;
    let mut out = vec![None; node.input.len()];
    let x = &node.input[0];
    // Flatten(axis = 1) keeps dim 0 (the batch), so its backward reshapes to [0, d1, ...] ("0": copy dim 0),
    // a constant shape: ONNX shape inference then keeps the batch symbol along the chain, which ONNX Runtime's
    // layout pass needs to prove the gradient and the ReLU masks the same shape (see RuleCtx::layout_hint).
    let flatten_1 = node.op_type() == "Flatten" && attr::int_or(node, "axis", 1) == 1;
    out[0] = Some(match ctx.dims(x) {
        Ok(xd) if flatten_1 && xd.len() >= 2 && xd[1..].iter().all(|&d| d > 0) => {
            let mut shape = xd.clone();
            shape[0] = 0;
            let shape = ctx.e.ints(&shape);
            ctx.e.op("Reshape", &[dy, &shape], vec![], "reshape")
        }
        _ => ctx.reshape_like(dy, x),
    });
    Ok(out)
}

fn identity(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], _needs: &[bool]) -> Grads {
    let dy = dy0(node, dy)?;
    if node.op_type() == "Cast" {
        // Only float32 -> float32 casts carry a gradient here (exporters emit them as no-ops).
        let to = attr::int_or(node, "to", 0);
        if to != crate::onnx::tensor::FLOAT as i64 || ctx.probe.get(&node.input[0]).is_none_or(|t| t.elem != crate::onnx::tensor::FLOAT) {
            return Err(OnnxError::node(node, "a Cast between float types on the gradient path"));
        }
    }
    let mut out = vec![None; node.input.len()];
    out[0] = Some(dy.to_string());
    Ok(out)
}

fn transpose(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], _needs: &[bool]) -> Grads {
    let dy = dy0(node, dy)?;
    let rank = ctx.dims(&node.input[0])?.len();
    let perm = attr::ints(node, "perm").unwrap_or_else(|| (0..rank as i64).rev().collect());
    let mut inv = vec![0i64; perm.len()];
    for (i, &p) in perm.iter().enumerate() {
        let p = norm_axis(p, rank);
        if p < 0 || p as usize >= rank {
            return Err(OnnxError::node(node, "bad perm"));
        }
        inv[p as usize] = i as i64;
    }
    Ok(vec![Some(ctx.e.op("Transpose", &[dy], vec![attr::make_ints("perm", &inv)], "transpose_grad"))])
}

fn non_batch_axis(node: &NodeProto, axis: i64, rank: usize) -> Result<i64> {
    let a = norm_axis(axis, rank);
    if a <= 0 || a as usize >= rank {
        return Err(OnnxError::node(node, format!("axis {axis} is the batch axis or out of range")));
    }
    Ok(a)
}

fn concat(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], needs: &[bool]) -> Grads {
    let dy = dy0(node, dy)?;
    let rank = ctx.dims(&node.output[0])?.len();
    let axis = non_batch_axis(node, attr::int_or(node, "axis", 0), rank)?;
    let sizes: Vec<i64> = node.input.iter().map(|i| ctx.dims(i).map(|d| d[axis as usize])).collect::<Result<_>>()?;
    let split = ctx.e.ints(&sizes);
    let parts = ctx.e.op_n("Split", &[dy, &split], vec![attr::make_int("axis", axis)], "concat_grad", sizes.len());
    Ok(parts.into_iter().zip(needs).map(|(p, &n)| n.then_some(p)).collect())
}

fn split(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], _needs: &[bool]) -> Grads {
    let rank = ctx.dims(&node.input[0])?.len();
    let axis = non_batch_axis(node, attr::int_or(node, "axis", 0), rank)?;
    let mut parts = Vec::with_capacity(node.output.len());
    for (i, o) in node.output.iter().enumerate() {
        parts.push(match dy.get(i).cloned().flatten() {
            Some(g) => g,
            None => ctx.zeros_like(o),
        });
    }
    let refs: Vec<&str> = parts.iter().map(|s| s.as_str()).collect();
    let dx = ctx.e.op("Concat", &refs, vec![attr::make_int("axis", axis)], "split_grad");
    let mut out = vec![None; node.input.len()];
    out[0] = Some(dx);
    Ok(out)
}

fn ints_input(ctx: &RuleCtx, node: &NodeProto, i: usize, what: &str) -> Result<Option<Vec<i64>>> {
    match input(node, i) {
        None => Ok(None),
        Some(name) => ctx.const_i64(name).map(Some).ok_or_else(|| OnnxError::node(node, format!("{what} are not constant"))),
    }
}

fn slice(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], _needs: &[bool]) -> Grads {
    // The gradient is dY padded with zeros back to X's extent (steps of 1).
    let dy = dy0(node, dy)?;
    let xd = ctx.dims(&node.input[0])?;
    let rank = xd.len();
    let starts = ints_input(ctx, node, 1, "starts")?.unwrap_or_default();
    let ends = ints_input(ctx, node, 2, "ends")?.unwrap_or_default();
    let axes = ints_input(ctx, node, 3, "axes")?.unwrap_or_else(|| (0..starts.len() as i64).collect());
    let steps = ints_input(ctx, node, 4, "steps")?.unwrap_or_else(|| vec![1; starts.len()]);
    if starts.len() != ends.len() || axes.len() != starts.len() || steps.len() != starts.len() {
        return Err(OnnxError::node(node, "starts/ends/axes/steps lengths differ"));
    }
    let mut pads = vec![0i64; 2 * rank];
    for k in 0..starts.len() {
        if steps[k] != 1 {
            return Err(OnnxError::node(node, "Slice with steps other than 1"));
        }
        let a = norm_axis(axes[k], rank);
        if a < 0 || a as usize >= rank {
            return Err(OnnxError::node(node, "axis out of range"));
        }
        let dim = xd[a as usize];
        let clamp = |v: i64| if v < 0 { (v + dim).max(0) } else { v.min(dim) };
        let (s, e) = (clamp(starts[k]), clamp(ends[k]).max(clamp(starts[k])));
        if a == 0 && (s != 0 || e != dim) {
            return Err(OnnxError::node(node, "Slice along the batch axis"));
        }
        pads[a as usize] = s;
        pads[rank + a as usize] = dim - e;
    }
    if pads.iter().all(|&p| p == 0) {
        return Ok(vec![Some(dy.to_string())]);
    }
    let p = ctx.e.ints(&pads);
    let zero = ctx.e.scalar(0.0);
    Ok(vec![Some(ctx.e.op("Pad", &[dy, &p, &zero], vec![attr::make_string("mode", "constant")], "slice_grad"))])
}

fn pad(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], needs: &[bool]) -> Grads {
    // Constant padding: the gradient is dY cropped back to X's extent.
    let dy = dy0(node, dy)?;
    if needs.iter().skip(1).any(|&n| n) {
        return Err(OnnxError::node(node, "the gradient with respect to the pad value is not supported"));
    }
    let mode = attr::string(node, "mode").unwrap_or_else(|| "constant".into());
    if mode != "constant" {
        return Err(OnnxError::node(node, format!("Pad mode `{mode}`")));
    }
    let xd = ctx.dims(&node.input[0])?;
    let rank = xd.len();
    let pads = ints_input(ctx, node, 1, "pads")?.ok_or_else(|| OnnxError::node(node, "no pads"))?;
    let axes: Vec<i64> = match ints_input(ctx, node, 3, "axes")? {
        Some(a) => a.iter().map(|&a| norm_axis(a, rank)).collect(),
        None => (0..rank as i64).collect(),
    };
    if pads.len() != 2 * axes.len() || pads.iter().any(|&p| p < 0) {
        return Err(OnnxError::node(node, "negative or malformed pads"));
    }
    let n = axes.len();
    let (mut s_axes, mut starts, mut ends) = (vec![], vec![], vec![]);
    for (k, &a) in axes.iter().enumerate() {
        let (pb, pe) = (pads[k], pads[n + k]);
        if pb == 0 && pe == 0 {
            continue;
        }
        if a == 0 {
            return Err(OnnxError::node(node, "padding along the batch axis"));
        }
        s_axes.push(a);
        starts.push(pb);
        ends.push(pb + xd[a as usize]);
    }
    if s_axes.is_empty() {
        return Ok(vec![Some(dy.to_string())]);
    }
    let (s, e, a) = (ctx.e.ints(&starts), ctx.e.ints(&ends), ctx.e.ints(&s_axes));
    Ok(vec![Some(ctx.e.op("Slice", &[dy, &s, &e, &a], vec![], "pad_grad"))])
}
