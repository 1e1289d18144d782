//! BatchNormalization in inference mode: a per-channel scale.

use std::collections::HashMap;

use super::{dy0, norm_axis, not_differentiable, BackwardRule, RuleCtx};
use crate::onnx::proto::NodeProto;
use crate::onnx::{attr, OnnxError, Result};

pub(super) fn register(m: &mut HashMap<&'static str, BackwardRule>) {
    m.insert("BatchNormalization", batch_norm);
    m.insert("LayerNormalization", layer_norm);
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
    // y = (x - mean) * scale / sqrt(var + eps) + bias  =>  dx = dy * scale / sqrt(var + eps)
    let factor = match (ctx.const_f32(scale), ctx.const_f32(var)) {
        (Some((_, s)), Some((_, v))) if s.len() == v.len() => {
            let f: Vec<f32> = s.iter().zip(&v).map(|(s, v)| s / (v + eps).sqrt()).collect();
            let mut dims = vec![1, f.len() as i64];
            dims.resize(rank, 1);
            ctx.e.const_f32(&dims, &f)
        }
        _ => {
            let e = ctx.e.scalar(eps);
            let ve = ctx.e.op("Add", &[var, &e], vec![], "bn_var_eps");
            let sd = ctx.e.op("Sqrt", &[&ve], vec![], "bn_std");
            let f = ctx.e.op("Div", &[scale, &sd], vec![], "bn_factor");
            let mut dims = vec![1, -1];
            dims.resize(rank, 1);
            let shape = ctx.e.ints(&dims);
            ctx.e.op("Reshape", &[&f, &shape], vec![], "bn_factor_shaped")
        }
    };
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
        ctx.mul_scalar(&s, 1.0 / count as f32)
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
