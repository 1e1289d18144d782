//! Activations and other pointwise ops. Relu and Clip with min 0 (ReLU6) obey the chain's `ReluRule`.

use std::collections::HashMap;

use super::{dy0, input, not_differentiable, norm_axis, BackwardRule, ReluRule, RuleCtx};
use crate::onnx::proto::NodeProto;
use crate::onnx::{attr, OnnxError, Result};

pub(super) fn register(m: &mut HashMap<&'static str, BackwardRule>) {
    m.insert("Relu", relu);
    m.insert("Clip", clip);
    m.insert("LeakyRelu", leaky_relu);
    m.insert("PRelu", prelu);
    m.insert("Sigmoid", sigmoid);
    m.insert("HardSigmoid", hard_sigmoid);
    m.insert("HardSwish", hard_swish);
    m.insert("Tanh", tanh);
    m.insert("Elu", elu);
    m.insert("Softplus", softplus);
    m.insert("Exp", exp);
    m.insert("Log", log);
    m.insert("Sqrt", sqrt);
    m.insert("Erf", erf);
    m.insert("Softmax", softmax);
    m.insert("LogSoftmax", log_softmax);
}

type Grads = Result<Vec<Option<String>>>;

/// Applies the chain's rule to a ReLU-like op whose exact derivative is `dY * mask` (`mask` 0.0 / 1.0).
fn relu_like(ctx: &mut RuleCtx, mask: &str, dy: &str) -> String {
    match ctx.relu {
        ReluRule::Plain => ctx.mul(dy, mask),
        ReluRule::Guided => {
            let pos = ctx.e.op("Relu", &[dy], vec![], "relu_grad");
            ctx.mul(&pos, mask)
        }
        ReluRule::Deconvnet => ctx.e.op("Relu", &[dy], vec![], "relu_grad"),
    }
}

fn relu(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], _needs: &[bool]) -> Grads {
    let dy = dy0(node, dy)?;
    let y = &node.output[0];
    let key = format!("ReluMask({y})");
    let mask = match ctx.memo.get(&key) {
        Some(m) => m.clone(),
        None => {
            let m = relu_mask(ctx, y);
            ctx.memo.insert(key, m.clone());
            m
        }
    };
    Ok(vec![Some(relu_like(ctx, &mask, dy))])
}

/// `[Y > 0]` as 0.0 / 1.0 for a ReLU output `Y` (>= 0), as two HardSigmoids: `min(1, 2^127 Y)` maps every
/// positive float, down to the smallest subnormal 2^-149, to at least 2^-22 (powers of two scale exactly;
/// large Y overflow to +inf and clip to 1), and `min(1, 2^23 h)` maps those to 1; 0 stays 0. The mask is
/// taken on Y (not X) so ONNX Runtime's Conv+Relu fusion stays possible, and every chain shares it.
/// Measured (ResNet-50, batch 1, guided chain): `Cast(Greater(Y, 0))` needs Y in plain NCHW layout, so ONNX
/// Runtime reorders every activation out of its blocked NCHWc layout and the masked gradient back in; HardSigmoid
/// is one of the activations its NCHWc transformer keeps blocked, so the masks and their Mul stay there: 55.0 ms
/// against 59.0 ms for the whole graph, with identical results (one HardSigmoid with alpha = FLT_MAX: 54.4 ms,
/// but not exact below 2^-128).
fn relu_mask(ctx: &mut RuleCtx, y: &str) -> String {
    let hard_sigmoid = |alpha: f32| vec![attr::make_float("alpha", alpha), attr::make_float("beta", 0.0)];
    let h = ctx.e.op("HardSigmoid", &[y], hard_sigmoid(2f32.powi(127)), "relu_mask");
    ctx.e.op("HardSigmoid", &[&h], hard_sigmoid(2f32.powi(23)), "mask")
}

fn clip(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], needs: &[bool]) -> Grads {
    if needs.iter().skip(1).any(|&n| n) {
        return Err(not_differentiable(node, "min/max inputs"));
    }
    let dy = dy0(node, dy)?;
    let x = &node.input[0];
    let min = input(node, 1).map(str::to_string);
    let max = input(node, 2).map(str::to_string);
    let mut masks = Vec::new();
    if let Some(min) = &min {
        masks.push(ctx.e.op("Greater", &[x, min], vec![], "clip_min"));
    }
    if let Some(max) = &max {
        masks.push(ctx.e.op("Less", &[x, max], vec![], "clip_max"));
    }
    let pass = match masks.as_slice() {
        [] => return Ok(vec![Some(dy.to_string())]),
        [m] => m.clone(),
        [a, b, ..] => ctx.e.op("And", &[a, b], vec![], "clip_pass"),
    };
    // Clip with min 0 is ReLU (or ReLU6 with max 6): the chain's ReLU rule applies.
    let min_is_zero = min.as_deref().and_then(|m| ctx.const_f32(m)).is_some_and(|(_, v)| v.len() == 1 && v[0] == 0.0);
    if min_is_zero {
        let mask = ctx.float_mask(&pass);
        return Ok(vec![Some(relu_like(ctx, &mask, dy))]);
    }
    Ok(vec![Some(ctx.where_else_zero(&pass, dy))])
}

fn leaky_relu(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], _needs: &[bool]) -> Grads {
    let dy = dy0(node, dy)?;
    let alpha = attr::float_or(node, "alpha", 0.01);
    let zero = ctx.e.scalar(0.0);
    let pos = ctx.e.op("Greater", &[&node.input[0], &zero], vec![], "leaky_mask");
    let neg = ctx.mul_scalar(dy, alpha);
    Ok(vec![Some(ctx.e.op("Where", &[&pos, dy, &neg], vec![], "leaky_grad"))])
}

fn prelu(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], needs: &[bool]) -> Grads {
    if needs.get(1).copied().unwrap_or(false) {
        return Err(not_differentiable(node, "slope"));
    }
    let dy = dy0(node, dy)?;
    let zero = ctx.e.scalar(0.0);
    let pos = ctx.e.op("Greater", &[&node.input[0], &zero], vec![], "prelu_mask");
    let neg = ctx.mul(dy, &node.input[1]);
    Ok(vec![Some(ctx.e.op("Where", &[&pos, dy, &neg], vec![], "prelu_grad")), None])
}

fn sigmoid(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], _needs: &[bool]) -> Grads {
    let dy = dy0(node, dy)?;
    let y = &node.output[0];
    let one = ctx.e.scalar(1.0);
    let one_minus = ctx.e.op("Sub", &[&one, y], vec![], "one_minus_y");
    let d = ctx.mul(y, &one_minus);
    Ok(vec![Some(ctx.mul(dy, &d))])
}

fn hard_sigmoid(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], _needs: &[bool]) -> Grads {
    let dy = dy0(node, dy)?;
    let alpha = attr::float_or(node, "alpha", 0.2);
    let beta = attr::float_or(node, "beta", 0.5);
    let ax = ctx.mul_scalar(&node.input[0], alpha);
    let b = ctx.e.scalar(beta);
    let v = ctx.e.op("Add", &[&ax, &b], vec![], "hsig_arg");
    let (zero, one) = (ctx.e.scalar(0.0), ctx.e.scalar(1.0));
    let above = ctx.e.op("Greater", &[&v, &zero], vec![], "hsig_lo");
    let below = ctx.e.op("Less", &[&v, &one], vec![], "hsig_hi");
    let pass = ctx.e.op("And", &[&above, &below], vec![], "hsig_pass");
    let scaled = ctx.mul_scalar(dy, alpha);
    Ok(vec![Some(ctx.where_else_zero(&pass, &scaled))])
}

fn hard_swish(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], _needs: &[bool]) -> Grads {
    // d/dx x*relu6(x+3)/6 = 0 (x < -3), x/3 + 1/2 (-3 <= x <= 3), 1 (x > 3); as PyTorch's hardswish_backward.
    let dy = dy0(node, dy)?;
    let x = &node.input[0];
    let x3 = ctx.div_scalar(x, 3.0);
    let half = ctx.e.scalar(0.5);
    let slope = ctx.e.op("Add", &[&x3, &half], vec![], "hswish_slope");
    let mid = ctx.mul(dy, &slope);
    let (three, minus_three) = (ctx.e.scalar(3.0), ctx.e.scalar(-3.0));
    let hi = ctx.e.op("Greater", &[x, &three], vec![], "hswish_hi");
    let upper = ctx.e.op("Where", &[&hi, dy, &mid], vec![], "hswish_upper");
    let lo = ctx.e.op("Less", &[x, &minus_three], vec![], "hswish_lo");
    let zero = ctx.e.scalar(0.0);
    Ok(vec![Some(ctx.e.op("Where", &[&lo, &zero, &upper], vec![], "hswish_grad"))])
}

fn tanh(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], _needs: &[bool]) -> Grads {
    let dy = dy0(node, dy)?;
    let y = &node.output[0];
    let y2 = ctx.mul(y, y);
    let one = ctx.e.scalar(1.0);
    let d = ctx.e.op("Sub", &[&one, &y2], vec![], "tanh_d");
    Ok(vec![Some(ctx.mul(dy, &d))])
}

fn elu(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], _needs: &[bool]) -> Grads {
    // y = x (x > 0), alpha*(exp(x)-1) otherwise; dy/dx = 1 or y + alpha.
    let dy = dy0(node, dy)?;
    let alpha = attr::float_or(node, "alpha", 1.0);
    let a = ctx.e.scalar(alpha);
    let yd = ctx.e.op("Add", &[&node.output[0], &a], vec![], "elu_d");
    let neg = ctx.mul(dy, &yd);
    let zero = ctx.e.scalar(0.0);
    let pos = ctx.e.op("Greater", &[&node.input[0], &zero], vec![], "elu_mask");
    Ok(vec![Some(ctx.e.op("Where", &[&pos, dy, &neg], vec![], "elu_grad"))])
}

fn softplus(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], _needs: &[bool]) -> Grads {
    let dy = dy0(node, dy)?;
    let s = ctx.e.op("Sigmoid", &[&node.input[0]], vec![], "softplus_d");
    Ok(vec![Some(ctx.mul(dy, &s))])
}

fn exp(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], _needs: &[bool]) -> Grads {
    let dy = dy0(node, dy)?;
    Ok(vec![Some(ctx.mul(dy, &node.output[0]))])
}

fn log(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], _needs: &[bool]) -> Grads {
    let dy = dy0(node, dy)?;
    Ok(vec![Some(ctx.e.op("Div", &[dy, &node.input[0]], vec![], "log_grad"))])
}

fn sqrt(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], _needs: &[bool]) -> Grads {
    let dy = dy0(node, dy)?;
    let half = ctx.mul_scalar(dy, 0.5);
    Ok(vec![Some(ctx.e.op("Div", &[&half, &node.output[0]], vec![], "sqrt_grad"))])
}

fn erf(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], _needs: &[bool]) -> Grads {
    // d/dx erf(x) = 2/sqrt(pi) * exp(-x^2)
    let dy = dy0(node, dy)?;
    let x = &node.input[0];
    let x2 = ctx.mul(x, x);
    let neg = ctx.e.op("Neg", &[&x2], vec![], "erf_arg");
    let ex = ctx.e.op("Exp", &[&neg], vec![], "erf_exp");
    let d = ctx.mul_scalar(&ex, std::f32::consts::FRAC_2_SQRT_PI);
    Ok(vec![Some(ctx.mul(dy, &d))])
}

/// The axis of a Softmax / LogSoftmax at opset 13+ semantics (one axis, default -1: the rewrite upgrades older
/// models, whose axis coerced the input to 2-D, to opset 17), any axis but the batch axis.
fn softmax_axis(ctx: &RuleCtx, node: &NodeProto) -> Result<i64> {
    let rank = ctx.dims(&node.input[0])?.len();
    let axis = norm_axis(attr::int_or(node, "axis", -1), rank);
    if axis < 0 || axis >= rank as i64 {
        return Err(OnnxError::node(node, format!("softmax axis out of range for a rank-{rank} input")));
    }
    if axis == 0 {
        return Err(OnnxError::node(node, "softmax over the batch axis: it mixes the images of a batch"));
    }
    Ok(axis)
}

fn softmax(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], _needs: &[bool]) -> Grads {
    // dx = y * (dy - sum(dy * y, axis))
    let dy = dy0(node, dy)?;
    let axis = softmax_axis(ctx, node)?;
    let y = &node.output[0];
    let dyy = ctx.mul(dy, y);
    let ax = ctx.e.ints(&[axis]);
    let s = ctx.e.op("ReduceSum", &[&dyy, &ax], vec![attr::make_int("keepdims", 1)], "softmax_sum");
    let diff = ctx.e.op("Sub", &[dy, &s], vec![], "softmax_diff");
    Ok(vec![Some(ctx.mul(y, &diff))])
}

fn log_softmax(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], _needs: &[bool]) -> Grads {
    // dx = dy - exp(y) * sum(dy, axis)
    let dy = dy0(node, dy)?;
    let axis = softmax_axis(ctx, node)?;
    let ax = ctx.e.ints(&[axis]);
    let s = ctx.e.op("ReduceSum", &[dy, &ax], vec![attr::make_int("keepdims", 1)], "logsoftmax_sum");
    let p = ctx.e.op("Exp", &[&node.output[0]], vec![], "logsoftmax_p");
    let ps = ctx.mul(&p, &s);
    Ok(vec![Some(ctx.e.op("Sub", &[dy, &ps], vec![], "logsoftmax_grad"))])
}
