//! BatchNormalization in inference mode: a per-channel scale.

use std::collections::HashMap;

use super::{dy0, not_differentiable, BackwardRule, RuleCtx};
use crate::onnx::proto::NodeProto;
use crate::onnx::{attr, OnnxError, Result};

pub(super) fn register(m: &mut HashMap<&'static str, BackwardRule>) {
    m.insert("BatchNormalization", batch_norm);
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
