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

/// `axis` normalised; out of range, or along an axis of `tensor` that grows with the batch size when
/// `sizes_baked` (the rule writes sizes read at batch size 1 along it), is an error. Axis 0 is not always the
/// batch: timm's attention stacks q, k, v as `[3, N, heads, T, d]` and splits axis 0.
fn checked_axis(ctx: &RuleCtx, node: &NodeProto, tensor: &str, axis: i64, rank: usize, sizes_baked: bool) -> Result<i64> {
    let a = norm_axis(axis, rank);
    if a < 0 || a as usize >= rank {
        return Err(OnnxError::node(node, format!("axis {axis} is out of range")));
    }
    if sizes_baked && ctx.is_batch_axis(tensor, a as usize) {
        return Err(OnnxError::node(node, format!("axis {axis} is the batch axis")));
    }
    Ok(a)
}

fn concat(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], needs: &[bool]) -> Grads {
    let dy = dy0(node, dy)?;
    let rank = ctx.dims(&node.output[0])?.len();
    // Sizes that change with the image's content (torchvision's per-class candidates) are read at run time.
    if node.input.iter().any(|i| ctx.index.dynamic.contains(i)) {
        let axis = norm_axis(attr::int_or(node, "axis", 0), rank);
        if axis < 0 || axis as usize >= rank {
            return Err(OnnxError::node(node, "axis out of range"));
        }
        let (at, next) = (ctx.e.ints(&[axis]), ctx.e.ints(&[axis + 1]));
        let sizes: Vec<String> = node
            .input
            .iter()
            .map(|i| {
                let s = ctx.shape_of(i);
                ctx.e.op("Slice", &[&s, &at, &next], vec![], "concat_grad_size")
            })
            .collect();
        let refs: Vec<&str> = sizes.iter().map(String::as_str).collect();
        let split = ctx.e.op("Concat", &refs, vec![attr::make_int("axis", 0)], "concat_grad_sizes");
        let parts = ctx.e.op_n("Split", &[dy, &split], vec![attr::make_int("axis", axis)], "concat_grad", sizes.len());
        return Ok(parts.into_iter().zip(needs).map(|(p, &n)| n.then_some(p)).collect());
    }
    let axis = checked_axis(ctx, node, &node.output[0], attr::int_or(node, "axis", 0), rank, true)?;
    let sizes: Vec<i64> = node.input.iter().map(|i| ctx.dims(i).map(|d| d[axis as usize])).collect::<Result<_>>()?;
    let split = ctx.e.ints(&sizes);
    let parts = ctx.e.op_n("Split", &[dy, &split], vec![attr::make_int("axis", axis)], "concat_grad", sizes.len());
    Ok(parts.into_iter().zip(needs).map(|(p, &n)| n.then_some(p)).collect())
}

fn split(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], _needs: &[bool]) -> Grads {
    // The parts' gradients concatenated (split sizes from an input, an attribute or opset 18's num_outputs: the
    // Concat needs none of them).
    let rank = ctx.dims(&node.input[0])?.len();
    let axis = checked_axis(ctx, node, &node.input[0], attr::int_or(node, "axis", 0), rank, false)?;
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

/// The input indices, in output order, that an ONNX Slice with `start`, `end` and `step` takes from an axis of
/// length `dim` (negative start and end count from the end; both are then clamped as the operator specifies:
/// to [0, dim] for positive steps, start to [0, dim - 1] and end to [-1, dim - 1] for negative ones).
fn slice_indices(start: i64, end: i64, step: i64, dim: i64) -> Vec<i64> {
    let wrap = |v: i64| if v < 0 { v.saturating_add(dim) } else { v };
    let (s, e) = (wrap(start), wrap(end));
    if step > 0 {
        let (s, e) = (s.clamp(0, dim), e.clamp(0, dim));
        (s..e).step_by(step as usize).collect()
    } else if step < 0 {
        let (mut i, e) = (s.clamp(0, dim - 1), e.clamp(-1, dim - 1));
        let mut out = Vec::new();
        while i > e {
            out.push(i);
            i = match i.checked_add(step) {
                Some(v) => v,
                None => break,
            };
        }
        out
    } else {
        Vec::new()
    }
}

fn slice(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], _needs: &[bool]) -> Grads {
    // Along an axis with step 1 the gradient is dY padded with zeros back to X's extent (one Pad for all such
    // axes). Along an axis with any other step (LeViT's subsampled queries, Swin's patch merging x[..., 0::2,
    // 1::2, :], a reversal), input index i receives dY at the output position that took it and zero elsewhere:
    // `RuleCtx::gather_behind_zero_slab` with constant indices (exact).
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
    let mut g = dy.to_string();
    for k in 0..starts.len() {
        let a = norm_axis(axes[k], rank);
        if a < 0 || a as usize >= rank {
            return Err(OnnxError::node(node, "axis out of range"));
        }
        let a = a as usize;
        let dim = xd[a];
        if steps[k] == 0 {
            return Err(OnnxError::node(node, "Slice with a step of 0"));
        }
        if ctx.is_batch_axis(&node.input[0], a) {
            // The probe's batch size says nothing about the served one: only a slice that keeps every item
            // of any batch (start 0 or below -2^31, end at least 2^31 - 1, step 1) is the identity.
            let keeps_all = steps[k] == 1 && (starts[k] == 0 || starts[k] <= -(1 << 31)) && ends[k] >= (1 << 31) - 1;
            if !keeps_all {
                return Err(OnnxError::node(node, "Slice along the batch axis"));
            }
            continue;
        }
        let src = slice_indices(starts[k], ends[k], steps[k], dim);
        if src.len() as i64 == dim && src.iter().enumerate().all(|(o, &i)| i == o as i64) {
            continue;
        }
        if steps[k] == 1 || src.is_empty() {
            // A run src[0]..=src[last], or nothing: dY (possibly empty along `a`) padded to X's extent.
            let (lo, hi) = src.first().zip(src.last()).map_or((0, 0), |(&f, &l)| (f, l + 1));
            pads[a] = lo;
            pads[rank + a] = dim - hi;
            continue;
        }
        // inv[i]: 1 + the output position holding input index i, or 0 (the zero slab) when none does. The slab
        // comes from g itself: g is non-empty along `a` here, and its other axes are mid-way between dY's and X's.
        let mut inv = vec![0i64; dim as usize];
        for (o, &i) in src.iter().enumerate() {
            inv[i as usize] = o as i64 + 1;
        }
        let idx = ctx.e.ints(&inv);
        let from = g.clone();
        g = ctx.gather_behind_zero_slab(&from, &from, a, &idx, "slice_step_grad");
    }
    if pads.iter().all(|&p| p == 0) {
        return Ok(vec![Some(g)]);
    }
    let p = ctx.e.ints(&pads);
    let zero = ctx.e.scalar(0.0);
    Ok(vec![Some(ctx.e.op("Pad", &[&g, &p, &zero], vec![attr::make_string("mode", "constant")], "slice_grad"))])
}

fn pad(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], needs: &[bool]) -> Grads {
    // Constant padding: the gradient is dY cropped back to X's extent. Edge, reflect and wrap padding: see
    // `pad_border_grad`.
    let dy = dy0(node, dy)?;
    if needs.iter().skip(1).any(|&n| n) {
        return Err(OnnxError::node(node, "the gradient with respect to the pad value is not supported"));
    }
    let mode = attr::string(node, "mode").unwrap_or_else(|| "constant".into());
    let border = match mode.as_str() {
        "constant" => None,
        "edge" => Some(Border::Edge),
        "reflect" => Some(Border::Reflect),
        "wrap" => Some(Border::Wrap),
        _ => return Err(OnnxError::node(node, format!("Pad mode `{mode}`"))),
    };
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
    if let Some(border) = border {
        return pad_border_grad(ctx, node, dy, border, &xd, &axes, &pads).map(|dx| vec![Some(dx)]);
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

/// The non-constant Pad modes.
#[derive(Clone, Copy)]
enum Border {
    Edge,
    Reflect,
    Wrap,
}

/// The input index that padded index `o` copies along an axis of length `n` padded by `before` (NumPy's
/// `edge`, `reflect` and `wrap`, which ONNX Pad follows).
fn pad_source(border: Border, o: i64, before: i64, n: i64) -> i64 {
    let i = o - before;
    match border {
        Border::Edge => i.clamp(0, n - 1),
        Border::Reflect if n == 1 => 0,
        Border::Reflect => {
            let t = i.rem_euclid(2 * (n - 1));
            if t < n { t } else { 2 * (n - 1) - t }
        }
        Border::Wrap => i.rem_euclid(n),
    }
}

/// Edge, reflect and wrap padding copy each output from one input index: along a padded axis,
/// Y[o] = X[src(o)], so dX[i] = sum of dY[o] over the o with src(o) = i. Per axis, the outputs are cut into runs
/// where src moves by +1 (a Slice), -1 (a reversed Slice) or 0 (a Slice summed to one element); each run is
/// zero-padded back to the input's extent at its source position, and the runs are summed. The axes are
/// independent (the forward pads one axis after the other), so they are undone one at a time.
fn pad_border_grad(ctx: &mut RuleCtx, node: &NodeProto, dy: &str, border: Border, xd: &[i64], axes: &[i64], pads: &[i64]) -> Result<String> {
    let rank = xd.len();
    let k = axes.len();
    let mut g = dy.to_string();
    for (j, &a) in axes.iter().enumerate() {
        let (before, after) = (pads[j], pads[k + j]);
        if before == 0 && after == 0 {
            continue;
        }
        if a <= 0 || a as usize >= rank {
            return Err(OnnxError::node(node, "padding along the batch axis or out of range"));
        }
        let n = xd[a as usize];
        if n <= 0 {
            return Err(OnnxError::node(node, "padding an empty axis"));
        }
        let out_len = before + n + after;
        let src: Vec<i64> = (0..out_len).map(|o| pad_source(border, o, before, n)).collect();
        let axis = ctx.e.ints(&[a]);
        let mut pieces = Vec::new();
        let mut o = 0usize;
        while o < src.len() {
            let step = src.get(o + 1).map(|&s| s - src[o]).filter(|d| d.abs() <= 1).unwrap_or(1);
            let mut end = o + 1;
            while end < src.len() && src[end] - src[end - 1] == step {
                end += 1;
            }
            let (o0, o1) = (o as i64, end as i64);
            let whole = o0 == 0 && o1 == out_len;
            let piece = match step {
                1 if whole => g.clone(),
                1 | 0 => {
                    let (s, e) = (ctx.e.ints(&[o0]), ctx.e.ints(&[o1]));
                    ctx.e.op("Slice", &[&g, &s, &e, &axis], vec![], "pad_run")
                }
                _ => {
                    let (s, e, st) = (ctx.e.ints(&[o1 - 1]), ctx.e.ints(&[if o0 == 0 { i64::MIN } else { o0 - 1 }]), ctx.e.ints(&[-1]));
                    ctx.e.op("Slice", &[&g, &s, &e, &axis, &st], vec![], "pad_run_reversed")
                }
            };
            let (piece, lo, len) = match step {
                0 => (ctx.e.op("ReduceSum", &[&piece, &axis], vec![attr::make_int("keepdims", 1)], "pad_run_sum"), src[o], 1),
                1 => (piece, src[o], o1 - o0),
                _ => (piece, src[end - 1], o1 - o0),
            };
            let hi = lo + len;
            pieces.push(if lo == 0 && hi == n {
                piece
            } else {
                let mut p = vec![0i64; 2 * rank];
                p[a as usize] = lo;
                p[rank + a as usize] = n - hi;
                let p = ctx.e.ints(&p);
                ctx.e.op("Pad", &[&piece, &p], vec![], "pad_run_placed")
            });
            o = end;
        }
        let refs: Vec<&str> = pieces.iter().map(|s| s.as_str()).collect();
        g = if refs.len() == 1 { pieces[0].clone() } else { ctx.e.op("Sum", &refs, vec![], "pad_grad") };
    }
    Ok(g)
}
