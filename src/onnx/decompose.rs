//! Ops the rewrite handles by spelling them out in standard ops before the analysis: the opset-23 `Attention`
//! (PyTorch's `scaled_dot_product_attention` as one node). Spelled out, its softmax is an ordinary Softmax node
//! (which the attention rollouts find) and every step has a backward rule already (design §2 in docs/DESIGN.md).

use super::attr;
use super::builder::Emitter;
use super::probe::Probe;
use super::proto::{ModelProto, NodeProto};
use super::{is_default_domain, OnnxError, Result};

/// Whether the graph has a node this module spells out.
pub fn needed(model: &ModelProto) -> bool {
    model.graph.as_ref().is_some_and(|g| g.node.iter().any(|n| is_default_domain(n.domain()) && n.op_type() == "Attention"))
}

/// Replaces each `Attention` node by MatMul, Mul, (Add of the mask), Softmax and MatMul, in place, with the
/// shapes from `probe`.
pub fn decompose(model: &mut ModelProto, probe: &Probe) -> Result<()> {
    let Some(graph) = model.graph.as_mut() else { return Ok(()) };
    let used: std::collections::HashSet<String> = graph
        .node
        .iter()
        .flat_map(|n| n.input.iter().cloned())
        .chain(graph.output.iter().map(|o| o.name().to_string()))
        .collect();
    let mut e = Emitter::new("camserve/attention/");
    let mut out_nodes = Vec::with_capacity(graph.node.len());
    for node in std::mem::take(&mut graph.node) {
        if !(is_default_domain(node.domain()) && node.op_type() == "Attention") {
            out_nodes.push(node);
            continue;
        }
        let start = e.nodes.len();
        attention(&mut e, &node, probe, &used)?;
        out_nodes.extend(e.nodes.drain(start..));
    }
    graph.node = out_nodes;
    graph.initializer.append(&mut e.initializers);
    Ok(())
}

fn input<'a>(node: &'a NodeProto, i: usize) -> Option<&'a str> {
    node.input.get(i).map(String::as_str).filter(|s| !s.is_empty())
}

/// Y = softmax(cap(Q Kᵀ · scale) (+ mask)) V, heads in [B, H, S, D] (3-D inputs [B, S, H·D] are split into heads and
/// merged back), K and V repeated over the query heads of their group (GQA), softcap as c · tanh(x / c).
fn attention(e: &mut Emitter, node: &NodeProto, probe: &Probe, used: &std::collections::HashSet<String>) -> Result<()> {
    let fail = |why: &str| OnnxError::node(node, why.to_string());
    let (q, k, v) = match (input(node, 0), input(node, 1), input(node, 2)) {
        (Some(q), Some(k), Some(v)) => (q, k, v),
        _ => return Err(fail("Attention without Q, K and V")),
    };
    if input(node, 4).is_some() || input(node, 5).is_some() || input(node, 6).is_some() {
        return Err(fail("Attention with a past key/value cache or nonpad_kv_seqlen is not supported"));
    }
    if node.output.get(3).is_some_and(|o| !o.is_empty() && used.contains(o)) {
        return Err(fail("Attention's qk_matmul_output is used; it is not supported"));
    }
    let dims = |name: &str| probe.dims(name).map(<[i64]>::to_vec).ok_or_else(|| fail(&format!("no shape for `{name}`")));
    let (qd, kd) = (dims(q)?, dims(k)?);
    if qd.len() != kd.len() || !(qd.len() == 3 || qd.len() == 4) {
        return Err(fail("Attention inputs must be all 3-D or all 4-D"));
    }
    let three_d = qd.len() == 3;
    let (q_heads, kv_heads) = if three_d {
        match (attr::int(node, "q_num_heads"), attr::int(node, "kv_num_heads")) {
            (Some(a), Some(b)) if a > 0 && b > 0 => (a, b),
            _ => return Err(fail("3-D Attention without q_num_heads and kv_num_heads")),
        }
    } else {
        (qd[1], kd[1])
    };
    if q_heads % kv_heads != 0 {
        return Err(fail("the query heads are not a multiple of the key/value heads"));
    }
    // [B, S, H·D] -> [B, H, S, D]
    let heads = |e: &mut Emitter, x: &str, h: i64, label: &str| -> String {
        if !three_d {
            return x.to_string();
        }
        let shape = e.ints(&[0, 0, h, -1]);
        let r = e.op("Reshape", &[x, &shape], vec![], &format!("{label}_heads"));
        e.op("Transpose", &[&r], vec![attr::make_ints("perm", &[0, 2, 1, 3])], &format!("{label}_bhsd"))
    };
    let (qh, kh, vh) = (heads(e, q, q_heads, "q"), heads(e, k, kv_heads, "k"), heads(e, v, kv_heads, "v"));
    let head_size = if three_d { qd[2] / q_heads } else { qd[3] };
    let kv_seq = if three_d { kd[1] } else { kd[2] };
    let q_seq = if three_d { qd[1] } else { qd[2] };
    // GQA: kv head j serves query heads j·g .. j·g + g - 1 (ONNX Runtime's layout, checked in the tests).
    let group = q_heads / kv_heads;
    let repeat = |e: &mut Emitter, x: &str, label: &str| -> String {
        if group == 1 {
            return x.to_string();
        }
        let ax = e.ints(&[2]);
        let u = e.op("Unsqueeze", &[x, &ax], vec![], &format!("{label}_u"));
        let copies: Vec<&str> = (0..group).map(|_| u.as_str()).collect();
        let c = e.op("Concat", &copies, vec![attr::make_int("axis", 2)], &format!("{label}_group"));
        // [B, H_kv, g, S_kv, D] -> [B, H_q, S_kv, D]; D may differ between K and V.
        let shape = e.ints(&[0, q_heads, kv_seq, -1]);
        e.op("Reshape", &[&c, &shape], vec![], &format!("{label}_repeated"))
    };
    let (kr, vr) = (repeat(e, &kh, "k"), repeat(e, &vh, "v"));
    let kt = e.op("Transpose", &[&kr], vec![attr::make_ints("perm", &[0, 1, 3, 2])], "kt");
    let qk = e.op("MatMul", &[&qh, &kt], vec![], "qk");
    let scale = attr::float_or(node, "scale", 1.0 / (head_size as f32).sqrt());
    let s = e.scalar(scale);
    let mut logits = e.op("Mul", &[&qk, &s], vec![], "scaled");
    // softcap before the mask, as ONNX Runtime 1.31 does (a capped -inf would no longer mask anything).
    let softcap = attr::float_or(node, "softcap", 0.0);
    if softcap > 0.0 {
        let c = e.scalar(softcap);
        let d = e.op("Div", &[&logits, &c], vec![], "softcap_div");
        let t = e.op("Tanh", &[&d], vec![], "softcap_tanh");
        logits = e.op("Mul", &[&t, &c], vec![], "softcapped");
    }
    if let Some(mask) = input(node, 3) {
        let add = if probe.is_float(mask) {
            mask.to_string()
        } else {
            // A boolean mask: true attends, false gets -inf.
            let (zero, ninf) = (e.scalar(0.0), e.scalar(f32::NEG_INFINITY));
            e.op("Where", &[mask, &zero, &ninf], vec![], "mask_bias")
        };
        logits = e.op("Add", &[&logits, &add], vec![], "masked");
    }
    if attr::int(node, "is_causal").unwrap_or(0) != 0 {
        // Upper-left aligned lower triangle: query i attends keys 0..=i.
        let bias: Vec<f32> =
            (0..q_seq).flat_map(|i| (0..kv_seq).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY })).collect();
        let c = e.const_f32(&[q_seq, kv_seq], &bias);
        logits = e.op("Add", &[&logits, &c], vec![], "causal");
    }
    let p = e.op("Softmax", &[&logits], vec![attr::make_int("axis", -1)], "probs");
    let y = &node.output[0];
    if three_d {
        let o = e.op("MatMul", &[&p, &vr], vec![], "out_bhsd");
        let t = e.op("Transpose", &[&o], vec![attr::make_ints("perm", &[0, 2, 1, 3])], "out_bshd");
        let shape = e.ints(&[0, 0, -1]);
        e.op_into("Reshape", &[&t, &shape], vec![], y);
    } else {
        e.op_into("MatMul", &[&p, &vr], vec![], y);
    }
    // present_key / present_value without a cache are K and V themselves, in heads ([B, H_kv, S, D]).
    for (i, x) in [(1usize, &kh), (2, &vh)] {
        if let Some(o) = node.output.get(i).filter(|o| !o.is_empty()) {
            e.op_into("Identity", &[x], vec![], o);
        }
    }
    Ok(())
}
