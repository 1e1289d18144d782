//! BatchNormalization in inference mode: a per-channel scale. LayerNormalization, InstanceNormalization and
//! GroupNormalization: exact gradients through the per-sample statistics.

use std::collections::HashMap;

use super::{dy0, norm_axis, not_differentiable, BackwardRule, RuleCtx};
use crate::onnx::proto::NodeProto;
use crate::onnx::{attr, OnnxError, Result};

pub(super) fn register(m: &mut HashMap<&'static str, BackwardRule>) {
    m.insert("BatchNormalization", batch_norm);
    m.insert("LayerNormalization", layer_norm);
    m.insert("InstanceNormalization", instance_norm);
    m.insert("GroupNormalization", group_norm);
}

fn batch_norm(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], needs: &[bool]) -> Result<Vec<Option<String>>> {
    if attr::int_or(node, "training_mode", 0) != 0 {
        return Err(OnnxError::node(node, "BatchNormalization in training mode"));
    }
    if needs.iter().skip(1).any(|&n| n) {
        return Err(not_differentiable(node, "statistics or affine parameters"));
    }
    let dy = dy0(node, dy)?;
    let eps = attr::float_or(node, "epsilon", 1e-5);
    let rank = ctx.dims(&node.input[0])?.len();
    let (scale, var) = (&node.input[1], &node.input[4]);
    // y = (x - mean) * scale / sqrt(var + eps) + bias  =>  dx = dy * scale / sqrt(var + eps). The factor is computed
    // in the graph, also where scale and var are constants (ONNX Runtime folds it to the same float32 values), so
    // that the explain graph run in float64 (scripts/float64_check.py) computes it in float64, not from a float32
    // rounding stored here.
    let e = ctx.e.scalar(eps);
    let ve = ctx.e.op("Add", &[var, &e], vec![], "bn_var_eps");
    let sd = ctx.e.op("Sqrt", &[&ve], vec![], "bn_std");
    let f = ctx.e.op("Div", &[scale, &sd], vec![], "bn_factor");
    let mut dims = vec![1, -1];
    dims.resize(rank, 1);
    let shape = ctx.e.ints(&dims);
    let factor = ctx.e.op("Reshape", &[&f, &shape], vec![], "bn_factor_shaped");
    Ok(vec![Some(ctx.mul(dy, &factor)), None, None, None, None])
}

fn layer_norm(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], needs: &[bool]) -> Result<Vec<Option<String>>> {
    // Over the normalised axes (axis..rank): xhat = (x - mean) * rstd, y = xhat * scale + bias, so with
    // g = dy * scale:  dx = rstd * (g - mean(g) - xhat * mean(g * xhat)).
    if needs.iter().skip(1).any(|&n| n) {
        return Err(not_differentiable(node, "scale or bias"));
    }
    let dy = dy0(node, dy)?;
    let x = &node.input[0];
    let xd = ctx.dims(x)?;
    let axis = norm_axis(attr::int_or(node, "axis", -1), xd.len());
    if axis <= 0 || axis as usize >= xd.len() {
        return Err(OnnxError::node(node, "LayerNormalization over the batch axis"));
    }
    let axes: Vec<i64> = (axis..xd.len() as i64).collect();
    let count: i64 = xd[axis as usize..].iter().product();
    let eps = attr::float_or(node, "epsilon", 1e-5);
    let a = ctx.e.ints(&axes);
    let mean = |ctx: &mut RuleCtx, t: &str, label: &str| {
        let s = ctx.e.op("ReduceSum", &[t, &a], vec![attr::make_int("keepdims", 1)], label);
        ctx.div_scalar(&s, count as f32)
    };
    let mu = mean(ctx, x, "ln_mean");
    let xc = ctx.e.op("Sub", &[x, &mu], vec![], "ln_centred");
    let sq = ctx.mul(&xc, &xc);
    let var = mean(ctx, &sq, "ln_var");
    let e = ctx.e.scalar(eps);
    let ve = ctx.e.op("Add", &[&var, &e], vec![], "ln_var_eps");
    let sd = ctx.e.op("Sqrt", &[&ve], vec![], "ln_std");
    let rstd = ctx.e.op("Reciprocal", &[&sd], vec![], "ln_rstd");
    let xhat = ctx.mul(&xc, &rstd);
    let g = ctx.mul(dy, &node.input[1]);
    let mg = mean(ctx, &g, "ln_mean_g");
    let gx = ctx.mul(&g, &xhat);
    let mgx = mean(ctx, &gx, "ln_mean_gx");
    let t = ctx.mul(&xhat, &mgx);
    let d1 = ctx.e.op("Sub", &[&g, &mg], vec![], "ln_d1");
    let d2 = ctx.e.op("Sub", &[&d1, &t], vec![], "ln_d2");
    Ok(vec![Some(ctx.mul(&rstd, &d2)), None, None])
}

/// The input gradient of a normalisation over `axes` (`count` elements per group): with xhat = (x - mean) * rstd
/// and g the gradient of xhat (dy times the scale),  dx = rstd * (g - mean(g) - xhat * mean(g * xhat)).
/// `x` and `g` have the same shape; the statistics are recomputed from `x` (the forward does not expose them).
fn normalized_grad(ctx: &mut RuleCtx, x: &str, g: &str, axes: &[i64], count: i64, eps: f32, label: &str) -> String {
    let a = ctx.e.ints(axes);
    let mean = |ctx: &mut RuleCtx, t: &str, what: &str| {
        let s = ctx.e.op("ReduceSum", &[t, &a], vec![attr::make_int("keepdims", 1)], &format!("{label}_{what}"));
        ctx.div_scalar(&s, count as f32)
    };
    let mu = mean(ctx, x, "mean");
    let xc = ctx.e.op("Sub", &[x, &mu], vec![], &format!("{label}_centred"));
    let sq = ctx.mul(&xc, &xc);
    let var = mean(ctx, &sq, "var");
    let e = ctx.e.scalar(eps);
    let ve = ctx.e.op("Add", &[&var, &e], vec![], &format!("{label}_var_eps"));
    let sd = ctx.e.op("Sqrt", &[&ve], vec![], &format!("{label}_std"));
    let rstd = ctx.e.op("Reciprocal", &[&sd], vec![], &format!("{label}_rstd"));
    let xhat = ctx.mul(&xc, &rstd);
    let mg = mean(ctx, g, "mean_g");
    let gx = ctx.mul(g, &xhat);
    let mgx = mean(ctx, &gx, "mean_gx");
    let t = ctx.mul(&xhat, &mgx);
    let d1 = ctx.e.op("Sub", &[g, &mg], vec![], &format!("{label}_d1"));
    let d2 = ctx.e.op("Sub", &[&d1, &t], vec![], &format!("{label}_d2"));
    ctx.mul(&rstd, &d2)
}

/// `dy * scale`, with the 1-D `scale` broadcast along axis 1 of a rank-`rank` tensor; `dy` itself when the scale
/// is a constant of ones (the exporters' GroupNorm pattern: InstanceNormalization with unit scale, then the affine).
fn times_channel_scale(ctx: &mut RuleCtx, dy: &str, scale: &str, rank: usize) -> String {
    let mut dims = vec![-1i64];
    dims.resize(rank - 1, 1);
    match ctx.const_f32(scale) {
        Some((_, s)) if s.iter().all(|&v| v == 1.0) => dy.to_string(),
        Some((_, s)) => {
            dims[0] = s.len() as i64;
            let k = ctx.e.const_f32(&dims, &s);
            ctx.mul(dy, &k)
        }
        None => {
            let shape = ctx.e.ints(&dims);
            let k = ctx.e.op("Reshape", &[scale, &shape], vec![], "norm_scale_shaped");
            ctx.mul(dy, &k)
        }
    }
}

/// The checks and inputs InstanceNormalization and GroupNormalization share: (dY, X, X's dims, scale). Only X is
/// differentiated; it is `[N, C, ...]` with at least one axis after C.
fn channel_norm_inputs<'a>(
    ctx: &RuleCtx,
    node: &'a NodeProto,
    dy: &'a [Option<String>],
    needs: &[bool],
) -> Result<(&'a str, &'a str, Vec<i64>, &'a str)> {
    if needs.iter().skip(1).any(|&n| n) {
        return Err(not_differentiable(node, "scale or bias"));
    }
    let dy = dy0(node, dy)?;
    let x = &node.input[0];
    let xd = ctx.dims(x)?;
    if xd.len() < 3 {
        return Err(OnnxError::node(node, format!("{} of a rank-{} input", node.op_type(), xd.len())));
    }
    let scale = node.input.get(1).ok_or_else(|| OnnxError::node(node, "no scale input"))?;
    Ok((dy, x, xd, scale))
}

fn instance_norm(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], needs: &[bool]) -> Result<Vec<Option<String>>> {
    // Per sample and channel, over the spatial axes 2..rank: y = xhat * scale[c] + bias[c], so with
    // g = dy * scale[c]:  dx = rstd * (g - mean(g) - xhat * mean(g * xhat))  (see `normalized_grad`).
    let (dy, x, xd, scale) = channel_norm_inputs(ctx, node, dy, needs)?;
    let axes: Vec<i64> = (2..xd.len() as i64).collect();
    let count: i64 = xd[2..].iter().product();
    let eps = attr::float_or(node, "epsilon", 1e-5);
    let g = times_channel_scale(ctx, dy, scale, xd.len());
    Ok(vec![Some(normalized_grad(ctx, x, &g, &axes, count, eps, "in")), None, None])
}

fn group_norm(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], needs: &[bool]) -> Result<Vec<Option<String>>> {
    // x [N, C, ...] viewed as [N, G, C/G * spatial]: xhat is normalised per sample and group, y = xhat * scale +
    // bias with the scale per channel (opset 21, shape [C]) or per group (opset 18, shape [G]). With g = dy * scale
    // in the grouped view:  dx = rstd * (g - mean(g) - xhat * mean(g * xhat))  (see `normalized_grad`).
    let (dy, x, xd, scale) = channel_norm_inputs(ctx, node, dy, needs)?;
    let groups = attr::int(node, "num_groups").ok_or_else(|| OnnxError::node(node, "no num_groups attribute"))?;
    let channels = xd[1];
    if groups <= 0 || channels % groups != 0 {
        return Err(OnnxError::node(node, format!("{channels} channels do not split into {groups} groups")));
    }
    let scale_len: i64 = ctx.dims(scale)?.iter().product();
    let count: i64 = xd[1..].iter().product::<i64>() / groups;
    let eps = attr::float_or(node, "epsilon", 1e-5);
    let grouped = ctx.e.ints(&[0, groups, -1]);
    let xg = ctx.e.op("Reshape", &[x, &grouped], vec![], "gn_x_grouped");
    let g = if scale_len == channels {
        let g = times_channel_scale(ctx, dy, scale, xd.len());
        ctx.e.op("Reshape", &[&g, &grouped], vec![], "gn_g_grouped")
    } else if scale_len == groups {
        let dyg = ctx.e.op("Reshape", &[dy, &grouped], vec![], "gn_dy_grouped");
        times_channel_scale(ctx, &dyg, scale, 3)
    } else {
        return Err(OnnxError::node(node, format!("a scale of {scale_len} elements for {channels} channels in {groups} groups")));
    };
    let dxg = normalized_grad(ctx, &xg, &g, &[2], count, eps, "gn");
    let dx = ctx.reshape_like(&dxg, x);
    Ok(vec![Some(dx), None, None])
}
