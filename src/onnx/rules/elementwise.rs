//! Broadcasting arithmetic: Add, Sub, Mul, Div, Sum, Neg, Reciprocal, Pow (constant exponent), Expand.

use std::collections::HashMap;

use super::{dy0, not_differentiable, BackwardRule, RuleCtx};
use crate::onnx::proto::NodeProto;
use crate::onnx::{OnnxError, Result};

pub(super) fn register(m: &mut HashMap<&'static str, BackwardRule>) {
    m.insert("Add", add);
    m.insert("Sum", add);
    m.insert("Sub", sub);
    m.insert("Mul", mul);
    m.insert("Div", div);
    m.insert("Neg", neg);
    m.insert("Reciprocal", reciprocal);
    m.insert("Pow", pow);
    m.insert("Expand", expand);
}

type Grads = Result<Vec<Option<String>>>;

/// `g` (the output's gradient) reduced to input `i`'s shape.
fn to_input(ctx: &mut RuleCtx, node: &NodeProto, g: &str, i: usize) -> Result<String> {
    let yd = ctx.dims(&node.output[0])?;
    let x = &node.input[i];
    let xd = ctx.dims(x)?;
    Ok(ctx.unbroadcast(g, &yd, x, &xd))
}

fn add(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], needs: &[bool]) -> Grads {
    let dy = dy0(node, dy)?;
    (0..node.input.len()).map(|i| if needs[i] { to_input(ctx, node, dy, i).map(Some) } else { Ok(None) }).collect()
}

fn sub(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], needs: &[bool]) -> Grads {
    let dy = dy0(node, dy)?;
    let a = if needs[0] { Some(to_input(ctx, node, dy, 0)?) } else { None };
    let b = if needs[1] {
        let n = ctx.e.op("Neg", &[dy], vec![], "sub_neg");
        Some(to_input(ctx, node, &n, 1)?)
    } else {
        None
    };
    Ok(vec![a, b])
}

fn mul(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], needs: &[bool]) -> Grads {
    let dy = dy0(node, dy)?;
    let mut out = vec![None, None];
    for i in 0..2 {
        if needs[i] {
            let g = ctx.mul(dy, &node.input[1 - i]);
            out[i] = Some(to_input(ctx, node, &g, i)?);
        }
    }
    Ok(out)
}

fn div(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], needs: &[bool]) -> Grads {
    // y = a / b: da = dy / b, db = -dy * y / b
    let dy = dy0(node, dy)?;
    let b = node.input[1].clone();
    let a = if needs[0] {
        let g = ctx.e.op("Div", &[dy, &b], vec![], "div_da");
        Some(to_input(ctx, node, &g, 0)?)
    } else {
        None
    };
    let bg = if needs[1] {
        let t = ctx.mul(dy, &node.output[0]);
        let q = ctx.e.op("Div", &[&t, &b], vec![], "div_db");
        let n = ctx.e.op("Neg", &[&q], vec![], "div_db_neg");
        Some(to_input(ctx, node, &n, 1)?)
    } else {
        None
    };
    Ok(vec![a, bg])
}

fn neg(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], _needs: &[bool]) -> Grads {
    let dy = dy0(node, dy)?;
    Ok(vec![Some(ctx.e.op("Neg", &[dy], vec![], "neg_grad"))])
}

fn reciprocal(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], _needs: &[bool]) -> Grads {
    // y = 1/x: dx = -dy * y^2
    let dy = dy0(node, dy)?;
    let y = &node.output[0];
    let y2 = ctx.mul(y, y);
    let t = ctx.mul(dy, &y2);
    Ok(vec![Some(ctx.e.op("Neg", &[&t], vec![], "reciprocal_grad"))])
}

fn pow(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], needs: &[bool]) -> Grads {
    // y = x^p with constant scalar p: dx = dy * p * x^(p-1)
    if needs.get(1).copied().unwrap_or(false) {
        return Err(not_differentiable(node, "exponent"));
    }
    let dy = dy0(node, dy)?;
    let p = match ctx.const_f32(&node.input[1]) {
        Some((_, v)) if v.len() == 1 => v[0],
        _ => return Err(OnnxError::node(node, "Pow with a non-scalar or non-constant exponent")),
    };
    let pm1 = ctx.e.scalar(p - 1.0);
    let xp = ctx.e.op("Pow", &[&node.input[0], &pm1], vec![], "pow_d");
    let d = ctx.mul_scalar(&xp, p);
    Ok(vec![Some(ctx.mul(dy, &d)), None])
}

fn expand(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], _needs: &[bool]) -> Grads {
    let dy = dy0(node, dy)?;
    Ok(vec![Some(to_input(ctx, node, dy, 0)?), None])
}
