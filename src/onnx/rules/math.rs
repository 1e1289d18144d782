//! Element-wise maths and reductions: Gelu, Abs, Max, Min, Sin, Cos, CumSum, ReduceMax, ReduceMin, ReduceL2,
//! ReduceLogSumExp, Einsum, RMSNormalization (opset 23). (ReduceMean and ReduceSum live with the pools, whose axes helpers these share.)

use std::collections::{HashMap, HashSet};

use super::pool::{keep_reduced, reduce_axes};
use super::{dy0, input, norm_axis, not_differentiable, BackwardRule, RuleCtx};
use crate::onnx::proto::NodeProto;
use crate::onnx::{attr, OnnxError, Result};

pub(super) fn register(m: &mut HashMap<&'static str, BackwardRule>) {
    m.insert("Gelu", gelu);
    m.insert("Abs", abs);
    m.insert("Max", max_min);
    m.insert("Min", max_min);
    m.insert("Sin", sin);
    m.insert("Cos", cos);
    m.insert("CumSum", cum_sum);
    m.insert("ReduceMax", reduce_extreme);
    m.insert("ReduceMin", reduce_extreme);
    m.insert("ReduceL2", reduce_l2);
    m.insert("ReduceLogSumExp", reduce_log_sum_exp);
    m.insert("Einsum", einsum);
    m.insert("RMSNormalization", rms_normalization);
}

type Grads = Result<Vec<Option<String>>>;

// ---------------------------------------------------------------- pointwise

fn gelu(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], _needs: &[bool]) -> Grads {
    let dy = dy0(node, dy)?;
    let x = node.input[0].clone();
    let approximate = attr::string(node, "approximate").unwrap_or_else(|| "none".into());
    let one = ctx.e.scalar(1.0);
    let d = match approximate.as_str() {
        "none" => {
            // y = x Phi(x) with Phi(x) = (1 + erf(x / sqrt 2)) / 2: dy/dx = Phi(x) + x exp(-x^2 / 2) / sqrt(2 pi)
            let s = ctx.mul_scalar(&x, std::f32::consts::FRAC_1_SQRT_2);
            let erf = ctx.e.op("Erf", &[&s], vec![], "gelu_erf");
            let e1 = ctx.e.op("Add", &[&erf, &one], vec![], "gelu_cdf2");
            let cdf = ctx.mul_scalar(&e1, 0.5);
            let x2 = ctx.mul(&x, &x);
            let arg = ctx.mul_scalar(&x2, -0.5);
            let ex = ctx.e.op("Exp", &[&arg], vec![], "gelu_exp");
            let pdf = ctx.mul_scalar(&ex, (0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2) as f32);
            let xpdf = ctx.mul(&x, &pdf);
            ctx.e.op("Add", &[&cdf, &xpdf], vec![], "gelu_d")
        }
        "tanh" => {
            // y = x (1 + t) / 2, t = tanh(u), u = c (x + k x^3), c = sqrt(2 / pi), k = 0.044715:
            // dy/dx = (1 + t) / 2 + x (1 - t^2) c (1 + 3 k x^2) / 2
            const K: f32 = 0.044715;
            let c = (2.0 / std::f64::consts::PI).sqrt() as f32;
            let x2 = ctx.mul(&x, &x);
            let kx2 = ctx.mul_scalar(&x2, K);
            let inner = ctx.e.op("Add", &[&kx2, &one], vec![], "gelu_inner");
            let xi = ctx.mul(&x, &inner);
            let u = ctx.mul_scalar(&xi, c);
            let t = ctx.e.op("Tanh", &[&u], vec![], "gelu_tanh");
            let t1 = ctx.e.op("Add", &[&t, &one], vec![], "gelu_t1");
            let first = ctx.mul_scalar(&t1, 0.5);
            let t2 = ctx.mul(&t, &t);
            let sech2 = ctx.e.op("Sub", &[&one, &t2], vec![], "gelu_sech2");
            let kx2_3 = ctx.mul_scalar(&x2, 3.0 * K);
            let du = ctx.e.op("Add", &[&kx2_3, &one], vec![], "gelu_du");
            let xs = ctx.mul(&x, &sech2);
            let xsd = ctx.mul(&xs, &du);
            let second = ctx.mul_scalar(&xsd, 0.5 * c);
            ctx.e.op("Add", &[&first, &second], vec![], "gelu_d")
        }
        other => return Err(OnnxError::node(node, format!("Gelu with approximate=\"{other}\""))),
    };
    Ok(vec![Some(ctx.mul(dy, &d))])
}

fn abs(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], _needs: &[bool]) -> Grads {
    // dx = dy * sign(x) (0 at x = 0, as PyTorch)
    let dy = dy0(node, dy)?;
    let s = ctx.e.op("Sign", &[&node.input[0]], vec![], "abs_sign");
    Ok(vec![Some(ctx.mul(dy, &s))])
}

fn max_min(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], needs: &[bool]) -> Grads {
    // y = max(x_0, x_1, ...) (NumPy broadcasting): dx_i = dy * [x_i == y] / #{j : x_j == y}, summed over x_i's
    // broadcast axes. Ties split the gradient evenly between the inputs that hold the extreme, as PyTorch's
    // torch.maximum / torch.minimum do (grad / 2 on ties); Min likewise.
    let dy = dy0(node, dy)?;
    let n = node.input.len();
    if n == 1 {
        return Ok(vec![Some(dy.to_string())]);
    }
    if node.input.iter().any(|s| s.is_empty()) {
        return Err(OnnxError::node(node, "an empty input name"));
    }
    let y = node.output[0].clone();
    let yd = ctx.dims(&y)?;
    let masks: Vec<String> = (0..n)
        .map(|j| {
            let eq = ctx.e.op("Equal", &[&node.input[j], &y], vec![], "max_eq");
            ctx.float_mask(&eq)
        })
        .collect();
    let refs: Vec<&str> = masks.iter().map(|s| s.as_str()).collect();
    let count = ctx.e.op("Sum", &refs, vec![], "max_count");
    let share = ctx.e.op("Div", &[dy, &count], vec![], "max_share");
    let mut out = vec![None; n];
    for i in 0..n {
        if needs[i] {
            let g = ctx.mul(&share, &masks[i]);
            let x = node.input[i].clone();
            let xd = ctx.dims(&x)?;
            out[i] = Some(ctx.unbroadcast(&g, &yd, &x, &xd));
        }
    }
    Ok(out)
}

fn sin(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], _needs: &[bool]) -> Grads {
    // dx = dy * cos(x)
    let dy = dy0(node, dy)?;
    let c = ctx.e.op("Cos", &[&node.input[0]], vec![], "sin_d");
    Ok(vec![Some(ctx.mul(dy, &c))])
}

fn cos(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], _needs: &[bool]) -> Grads {
    // dx = -dy * sin(x)
    let dy = dy0(node, dy)?;
    let s = ctx.e.op("Sin", &[&node.input[0]], vec![], "cos_d");
    let g = ctx.mul(dy, &s);
    Ok(vec![Some(ctx.e.op("Neg", &[&g], vec![], "cos_grad"))])
}

fn cum_sum(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], needs: &[bool]) -> Grads {
    // y_j = sum over i <= j (i < j if exclusive; i >= j, i > j if reverse) of x_i: dx_i is the sum of dy_j over
    // the same j, i.e. the CumSum of dy with the same `exclusive` and the opposite `reverse`.
    if needs.get(1).copied().unwrap_or(false) {
        return Err(not_differentiable(node, "axis"));
    }
    let dy = dy0(node, dy)?;
    let axis_name = input(node, 1).ok_or_else(|| OnnxError::node(node, "no axis input"))?;
    let axis = match ctx.const_i64(axis_name).as_deref() {
        Some([a]) => *a,
        _ => return Err(OnnxError::node(node, "its axis is not a constant scalar")),
    };
    let rank = ctx.dims(&node.input[0])?.len();
    if norm_axis(axis, rank) == 0 {
        return Err(OnnxError::node(node, "CumSum over the batch axis: it mixes the images of a batch"));
    }
    let exclusive = attr::int_or(node, "exclusive", 0);
    let reverse = attr::int_or(node, "reverse", 0);
    let attrs = vec![attr::make_int("exclusive", exclusive), attr::make_int("reverse", i64::from(reverse == 0))];
    Ok(vec![Some(ctx.e.op("CumSum", &[dy, axis_name], attrs, "cumsum_grad")), None])
}

// ---------------------------------------------------------------- reductions

/// Reduce* rules share this start: the input, its reduced axes, and dy and y with those axes kept (size 1).
/// `None` where the node is the identity (`noop_with_empty_axes` with no axes).
struct Reduced {
    x: String,
    axes: Vec<i64>,
    dy: String,
    y: String,
}

fn reduced(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], needs: &[bool]) -> Result<Option<Reduced>> {
    if needs.get(1).copied().unwrap_or(false) {
        return Err(not_differentiable(node, "axes"));
    }
    let dy = dy0(node, dy)?;
    let x = node.input[0].clone();
    let rank = ctx.dims(&x)?.len();
    let axes = reduce_axes(ctx, node, rank)?;
    if axes.is_empty() {
        return Ok(None);
    }
    let dy = keep_reduced(ctx, node, dy, &axes);
    let y = keep_reduced(ctx, node, &node.output[0], &axes);
    Ok(Some(Reduced { x, axes, dy, y }))
}

/// The gradient of a reduction that reduces nothing.
fn identity(node: &NodeProto, dy: &[Option<String>]) -> Grads {
    Ok(vec![Some(dy0(node, dy)?.to_string()), None])
}

fn reduce_extreme(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], needs: &[bool]) -> Grads {
    // ReduceMax / ReduceMin: dx = dy * [x == y] / #{x == y over the reduced axes}: ties split the gradient evenly,
    // as PyTorch's amax / amin.
    let Some(r) = reduced(ctx, node, dy, needs)? else { return identity(node, dy) };
    let eq = ctx.e.op("Equal", &[&r.x, &r.y], vec![], "reduce_extreme_eq");
    let mask = ctx.float_mask(&eq);
    let axes = ctx.e.ints(&r.axes);
    let count = ctx.e.op("ReduceSum", &[&mask, &axes], vec![attr::make_int("keepdims", 1)], "reduce_extreme_count");
    let share = ctx.e.op("Div", &[&r.dy, &count], vec![], "reduce_extreme_share");
    Ok(vec![Some(ctx.mul(&mask, &share)), None])
}

fn reduce_l2(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], needs: &[bool]) -> Grads {
    // y = sqrt(sum x^2): dx = dy * x / y, and 0 where y = 0 (then x = 0 or its squares underflow), as PyTorch's norm.
    let Some(r) = reduced(ctx, node, dy, needs)? else {
        // Runtimes disagree on whether ReduceL2 with noop_with_empty_axes and no axes gives x or |x|.
        return Err(OnnxError::node(node, "ReduceL2 with noop_with_empty_axes and no axes"));
    };
    let zero = ctx.e.scalar(0.0);
    let one = ctx.e.scalar(1.0);
    let is_zero = ctx.e.op("Equal", &[&r.y, &zero], vec![], "reduce_l2_zero");
    let den = ctx.e.op("Where", &[&is_zero, &one, &r.y], vec![], "reduce_l2_den");
    let q = ctx.e.op("Div", &[&r.dy, &den], vec![], "reduce_l2_q");
    Ok(vec![Some(ctx.mul(&r.x, &q)), None])
}

fn reduce_log_sum_exp(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], needs: &[bool]) -> Grads {
    // y = log(sum exp(x)): dx = dy * exp(x - y) (the softmax over the reduced axes).
    let Some(r) = reduced(ctx, node, dy, needs)? else { return identity(node, dy) };
    let d = ctx.e.op("Sub", &[&r.x, &r.y], vec![], "lse_arg");
    let p = ctx.e.op("Exp", &[&d], vec![], "lse_softmax");
    Ok(vec![Some(ctx.mul(&r.dy, &p)), None])
}

// ---------------------------------------------------------------- Einsum

/// An Einsum equation with every ellipsis replaced by letters: one subscript list per operand and the output's.
#[derive(Debug)]
struct Equation {
    inputs: Vec<Vec<char>>,
    output: Vec<char>,
}

/// A term of the equation: letters, with at most one `...` (kept as `None`).
fn parse_term(node: &NodeProto, term: &str) -> Result<Vec<Option<char>>> {
    let mut out = Vec::new();
    let mut rest = term;
    while let Some(c) = rest.chars().next() {
        if let Some(r) = rest.strip_prefix("...") {
            if out.contains(&None) {
                return Err(OnnxError::node(node, format!("two ellipses in the Einsum term `{term}`")));
            }
            out.push(None);
            rest = r;
        } else if c.is_ascii_alphabetic() {
            out.push(Some(c));
            rest = &rest[1..];
        } else {
            return Err(OnnxError::node(node, format!("unexpected `{c}` in the Einsum equation")));
        }
    }
    Ok(out)
}

fn parse_einsum(ctx: &RuleCtx, node: &NodeProto) -> Result<Equation> {
    let eq: String = attr::string(node, "equation")
        .ok_or_else(|| OnnxError::node(node, "Einsum without an equation"))?
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    let (lhs, rhs) = match eq.split_once("->") {
        Some((l, r)) => (l, Some(r)),
        None => (eq.as_str(), None),
    };
    let terms: Vec<Vec<Option<char>>> = lhs.split(',').map(|t| parse_term(node, t)).collect::<Result<_>>()?;
    if terms.len() != node.input.len() {
        return Err(OnnxError::node(node, format!("the equation `{eq}` has {} operands, the node {}", terms.len(), node.input.len())));
    }
    let used: HashSet<char> = terms.iter().flatten().flatten().copied().collect();
    // Ellipses: all operands that have one must cover the same number of dims with the same sizes (no
    // broadcasting between them), and no constant may have one over its first axis (a size-1 dim there would
    // broadcast against the batch, which the probe at batch size 1 cannot see).
    let mut ell: Option<(usize, Vec<i64>)> = None;
    for (j, t) in terms.iter().enumerate() {
        let Some(pos) = t.iter().position(Option::is_none) else { continue };
        let dims = ctx.dims(&node.input[j])?;
        let e = dims.len().checked_sub(t.len() - 1).ok_or_else(|| OnnxError::node(node, "operand rank below its subscripts"))?;
        let ed = dims[pos..pos + e].to_vec();
        if pos == 0 && e > 0 && ctx.const_f32(&node.input[j]).is_some() {
            return Err(OnnxError::node(node, "Einsum with an ellipsis over a constant's first axis"));
        }
        match &ell {
            None => ell = Some((e, ed)),
            Some((_, d)) if *d == ed => {}
            Some(_) => return Err(OnnxError::node(node, "Einsum whose ellipsis dims differ (broadcast) between operands")),
        }
    }
    let fresh: Vec<char> = ('A'..='Z').chain('a'..='z').filter(|c| !used.contains(c)).collect();
    let ell_letters: Vec<char> = match &ell {
        Some((e, _)) if *e > fresh.len() => return Err(OnnxError::node(node, "Einsum with too many dims")),
        Some((e, _)) => fresh[..*e].to_vec(),
        None => vec![],
    };
    let expand = |t: &[Option<char>]| -> Vec<char> {
        t.iter().flat_map(|s| match s {
            Some(c) => vec![*c],
            None => ell_letters.clone(),
        }).collect()
    };
    let inputs: Vec<Vec<char>> = terms.iter().map(|t| expand(t)).collect();
    let output = match rhs {
        Some(r) => {
            let t = parse_term(node, r)?;
            if t.contains(&None) && ell.is_none() {
                return Err(OnnxError::node(node, "an ellipsis in the Einsum output only"));
            }
            expand(&t)
        }
        None => {
            // Implicit output: the ellipsis dims, then the letters used once, in alphabetical order; only
            // unambiguous when the letters are all lower or all upper case.
            if !(used.iter().all(char::is_ascii_lowercase) || used.iter().all(char::is_ascii_uppercase)) {
                return Err(OnnxError::node(node, "an implicit Einsum equation mixing lower and upper case"));
            }
            let mut once: Vec<char> = used.iter().copied().filter(|c| inputs.iter().flatten().filter(|d| *d == c).count() == 1).collect();
            once.sort_unstable();
            ell_letters.iter().copied().chain(once).collect()
        }
    };
    for (j, t) in inputs.iter().enumerate() {
        let rank = ctx.dims(&node.input[j])?.len();
        if t.len() != rank {
            return Err(OnnxError::node(node, format!("operand {j} has rank {rank}, its subscripts {}", t.len())));
        }
        if t.iter().collect::<HashSet<_>>().len() != t.len() {
            return Err(OnnxError::node(node, "Einsum with a repeated index in one operand (trace or diagonal)"));
        }
    }
    if output.iter().collect::<HashSet<_>>().len() != output.len() {
        return Err(OnnxError::node(node, "Einsum with a repeated output index"));
    }
    if let Some(c) = output.iter().find(|c| !inputs.iter().flatten().any(|d| d == *c)) {
        return Err(OnnxError::node(node, format!("the Einsum output index `{c}` is in no operand")));
    }
    let out_rank = ctx.dims(&node.output[0])?.len();
    if output.len() != out_rank {
        return Err(OnnxError::node(node, format!("the Einsum output has rank {out_rank}, its subscripts {}", output.len())));
    }
    Ok(Equation { inputs, output })
}

fn einsum(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], needs: &[bool]) -> Grads {
    // y[out] = sum over the other indices of prod_j A_j[s_j]. For operand k:
    // dA_k[s_k] = Einsum("out,s_j (j != k)->s_k", dy, A_j ...): dy times the other operands, summed over every
    // index not in s_k. Indices of s_k found nowhere else were summed out in the forward pass: dA_k is
    // constant along them, so they leave the equation and come back by Unsqueeze + Expand.
    let dy = dy0(node, dy)?;
    let eq = parse_einsum(ctx, node)?;
    let string = |s: &[char]| s.iter().collect::<String>();
    let mut out = vec![None; node.input.len()];
    for k in 0..node.input.len() {
        if !needs[k] {
            continue;
        }
        let sk = &eq.inputs[k];
        if sk.first().is_some_and(|b| !eq.output.contains(b)) {
            return Err(OnnxError::node(node, "Einsum summing over the batch axis: it mixes the images of a batch"));
        }
        let others: Vec<usize> = (0..node.input.len()).filter(|&j| j != k).collect();
        let elsewhere: HashSet<char> = eq.output.iter().chain(others.iter().flat_map(|&j| eq.inputs[j].iter())).copied().collect();
        let kept: Vec<char> = sk.iter().copied().filter(|c| elsewhere.contains(c)).collect();
        let dropped: Vec<i64> = (0..sk.len()).filter(|&p| !elsewhere.contains(&sk[p])).map(|p| p as i64).collect();
        let mut g = if others.is_empty() && kept == eq.output {
            dy.to_string()
        } else {
            let lhs: Vec<String> = std::iter::once(string(&eq.output)).chain(others.iter().map(|&j| string(&eq.inputs[j]))).collect();
            let equation = format!("{}->{}", lhs.join(","), string(&kept));
            let mut inputs: Vec<&str> = vec![dy];
            inputs.extend(others.iter().map(|&j| node.input[j].as_str()));
            ctx.e.op("Einsum", &inputs, vec![attr::make_string("equation", &equation)], "einsum_grad")
        };
        if !dropped.is_empty() {
            let a = ctx.e.ints(&dropped);
            let u = ctx.e.op("Unsqueeze", &[&g, &a], vec![], "einsum_unsqueeze");
            let shape = ctx.shape_of(&node.input[k]);
            g = ctx.e.op("Expand", &[&u, &shape], vec![], "einsum_expand");
        }
        out[k] = Some(g);
    }
    Ok(out)
}

// ---------------------------------------------------------------- RMSNormalization

fn rms_normalization(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], needs: &[bool]) -> Grads {
    // y = x r s with r = (mean(x^2) + eps)^(-1/2) over the axes [axis, rank): with g = dy s,
    // dx = r g - x r^3 mean(g x). The mean is ReduceSum / count: ReduceMean's axes form depends on the opset.
    if needs.get(1).copied().unwrap_or(false) {
        return Err(not_differentiable(node, "scale"));
    }
    let dy = dy0(node, dy)?;
    let x = node.input[0].clone();
    let scale = input(node, 1).ok_or_else(|| OnnxError::node(node, "no scale input"))?.to_string();
    let xd = ctx.dims(&x)?;
    let rank = xd.len();
    let axis = norm_axis(attr::int_or(node, "axis", -1), rank);
    if axis < 0 || axis >= rank as i64 {
        return Err(OnnxError::node(node, format!("axis out of range for a rank-{rank} input")));
    }
    if axis == 0 {
        return Err(OnnxError::node(node, "RMSNormalization over the batch axis: it mixes the images of a batch"));
    }
    let eps = attr::float_or(node, "epsilon", 1e-5);
    let axes: Vec<i64> = (axis..rank as i64).collect();
    let count = xd[axis as usize..].iter().product::<i64>() as f32;
    let ax = ctx.e.ints(&axes);
    let keep = || vec![attr::make_int("keepdims", 1)];
    let x2 = ctx.mul(&x, &x);
    let ss = ctx.e.op("ReduceSum", &[&x2, &ax], keep(), "rms_sumsq");
    let ms = ctx.div_scalar(&ss, count);
    let e = ctx.e.scalar(eps);
    let v = ctx.e.op("Add", &[&ms, &e], vec![], "rms_var");
    let sd = ctx.e.op("Sqrt", &[&v], vec![], "rms_sd");
    let r = ctx.e.op("Reciprocal", &[&sd], vec![], "rms_r");
    let g = ctx.mul(dy, &scale);
    let gx = ctx.mul(&g, &x);
    let sgx = ctx.e.op("ReduceSum", &[&gx, &ax], keep(), "rms_sum_gx");
    let mgx = ctx.div_scalar(&sgx, count);
    let r2 = ctx.mul(&r, &r);
    let r3 = ctx.mul(&r2, &r);
    let c = ctx.mul(&r3, &mgx);
    let xc = ctx.mul(&x, &c);
    let rg = ctx.mul(&r, &g);
    Ok(vec![Some(ctx.e.op("Sub", &[&rg, &xc], vec![], "rms_grad")), None])
}
