//! Element-wise maths, reductions, softmax over inner axes and Einsum (src/onnx/rules/math.rs, the Reduce*
//! axes forms in pool.rs, the softmax axes in activation.rs).

use super::*;
use camserve::onnx::rewrite::{ExplainPlan, PrepareOptions};
use camserve::onnx::rules::ReluRule;

/// A rank-0 int64 initializer (CumSum's axis).
fn int_scalar(g: &mut G, v: i64) -> String {
    let name = format!("axis_scalar_{}", g.inits.len());
    g.inits.push(camserve::onnx::tensor::i64_tensor(&name, &[], &[v]));
    name
}

/// The error the rewrite gives for a graph built by `f` on DIMS.
fn refused(f: impl FnOnce(&mut G) -> String) -> String {
    let mut g = G::new(&dims_i64(&DIMS), 11);
    let y = f(&mut g);
    let model = g.finish(&y);
    let ex = camserve::backend::probe::analyse(model, &PrepareOptions::default()).expect("analyse");
    match ex.build(&ExplainPlan::new("x_id", [ReluRule::Plain])) {
        Ok(_) => panic!("the rewrite accepted the graph"),
        Err(e) => e.to_string(),
    }
}

fn smooth(x: ArrayD<f32>, f: impl FnOnce(&mut G) -> String) -> f64 {
    check(&DIMS, x, 1e-2, SMOOTH, f)
}

// ---------------------------------------------------------------- pointwise

#[test]
fn gelu_exact() {
    // approximate = "none" is the default.
    smooth(uniform(&mut rng(11), &DIMS, -3.0, 3.0), |g| {
        g.opset = 20;
        let x = g.x();
        g.op("Gelu", &[&x], vec![])
    });
}

#[test]
fn gelu_tanh() {
    smooth(uniform(&mut rng(12), &DIMS, -3.0, 3.0), |g| {
        g.opset = 20;
        let x = g.x();
        g.op("Gelu", &[&x], vec![a_s("approximate", "tanh")])
    });
}

#[test]
fn abs() {
    // |x| has its kink at 0: inputs at least 0.1 away, step 0.05.
    check(&DIMS, away_from_zero(&mut rng(13), &DIMS, 0.1), 0.05, LINEAR, |g| {
        let x = g.x();
        let a = g.op("Abs", &[&x], vec![]);
        let k = g.rand(&[1, 2, 7, 7], 1.0);
        g.op("Mul", &[&a, &k], vec![])
    });
}

#[test]
fn sin_and_cos() {
    smooth(uniform(&mut rng(14), &DIMS, -3.0, 3.0), |g| {
        let x = g.x();
        let s = g.op("Sin", &[&x], vec![]);
        let k = g.rand(&[2, 1, 1], 2.0);
        let m = g.op("Mul", &[&x, &k], vec![]);
        let c = g.op("Cos", &[&m], vec![]);
        g.op("Add", &[&s, &c], vec![])
    });
}

/// Max / Min of x, a = x + s (s = +-1 per position) and q = x[..., 0:1] + 0.025 (broadcast over W), with x
/// distinct multiples of 0.05: every pair of operands is at least 0.025 apart, more than the step 0.01, so no
/// tie and no kink lies within the step; which operand wins varies with the position.
fn max_min(op: &str) -> f64 {
    check(&DIMS, distinct(&mut rng(15), &DIMS, 0.05), 0.01, LINEAR, |g| {
        let x = g.x();
        let signs: Vec<f32> = (0..49).map(|i| if (i * 7 + i / 3) % 2 == 0 { 1.0 } else { -1.0 }).collect();
        let s = g.init(&[1, 1, 7, 7], signs);
        let a = g.op("Add", &[&x, &s], vec![]);
        let (st, en, ax) = (g.ints(&[0]), g.ints(&[1]), g.ints(&[-1]));
        let first = g.op("Slice", &[&x, &st, &en, &ax], vec![]);
        let d = g.scalar(0.025);
        let q = g.op("Add", &[&first, &d], vec![]);
        // A constant that never wins (no gradient needed for it).
        let far = g.scalar(if op == "Max" { -100.0 } else { 100.0 });
        g.op(op, &[&x, &a, &far, &q], vec![])
    })
}

#[test]
fn max_variadic_broadcast() {
    max_min("Max");
}

#[test]
fn min_variadic_broadcast() {
    max_min("Min");
}

#[test]
fn max_ties_split_evenly() {
    // Max(x, x): every element is a tie; like torch.maximum each operand gets half, so dx = dy.
    let dims = [2, 1, 2, 2];
    let mut g = G::new(&dims_i64(&dims), 1);
    let x = g.x();
    let k = g.init(&[1, 1, 2, 2], vec![1.0, 2.0, 3.0, 4.0]);
    let a = g.op("Mul", &[&x, &k], vec![]);
    let b = g.op("Mul", &[&x, &k], vec![]);
    let m = g.op("Max", &[&a, &b], vec![]);
    let model = g.finish(&m);
    let explain = explain_model(&model, &[ReluRule::Plain]);
    let mut s = session(&explain, ort::session::builder::GraphOptimizationLevel::All);
    let xin = ArrayD::from_elem(ndarray::IxDyn(&dims), 0.5f32);
    let seed = ArrayD::from_shape_vec(ndarray::IxDyn(&[2, 4]), vec![1.0, -1.0, 0.5, 2.0, 0.25, 1.0, -2.0, 4.0]).unwrap();
    let out = run(&mut s, vec![("x", xin), (camserve::onnx::contract::SEED, seed.clone())], &[camserve::onnx::contract::GRADIENTS]);
    let got: Vec<f32> = out[0].iter().copied().collect();
    let want: Vec<f32> = seed.iter().enumerate().map(|(i, v)| v * (1 + i % 4) as f32).collect();
    assert_eq!(got, want);
}

#[test]
fn cum_sum_exclusive_reverse_negative_axis() {
    linear(|g| {
        let x = g.x();
        let last = int_scalar(g, -1);
        let c1 = g.op("CumSum", &[&x, &last], vec![a_i("exclusive", 1)]);
        let one = int_scalar(g, 1);
        let c2 = g.op("CumSum", &[&x, &one], vec![a_i("reverse", 1)]);
        let two = int_scalar(g, 2);
        let c3 = g.op("CumSum", &[&x, &two], vec![a_i("exclusive", 1), a_i("reverse", 1)]);
        let k = g.rand(&[1, 2, 7, 7], 1.0);
        let c4 = g.op("CumSum", &[&k, &two], vec![]);
        let m = g.op("Mul", &[&c3, &c4], vec![]);
        g.op("Sum", &[&c1, &c2, &m], vec![])
    });
}

#[test]
fn cum_sum_batch_axis_refused() {
    let e = refused(|g| {
        let x = g.x();
        let zero = int_scalar(g, 0);
        g.op("CumSum", &[&x, &zero], vec![])
    });
    assert!(e.contains("batch axis"), "{e}");
}

// ---------------------------------------------------------------- reductions

/// Distinct inputs (step 0.05) and step 0.01: no tie between elements within the step.
fn extreme(f: impl FnOnce(&mut G) -> String) -> f64 {
    check(&DIMS, distinct(&mut rng(16), &DIMS, 0.05), 0.01, LINEAR, f)
}

#[test]
fn reduce_max_axes_attribute_opset17() {
    extreme(|g| { let x = g.x(); g.op("ReduceMax", &[&x], vec![a_is("axes", &[2, -1]), a_i("keepdims", 1)]) });
}

#[test]
fn reduce_max_axes_input_opset20() {
    extreme(|g| {
        g.opset = 20;
        let x = g.x();
        let a = g.ints(&[-1]);
        g.op("ReduceMax", &[&x, &a], vec![a_i("keepdims", 0)])
    });
}

#[test]
fn reduce_min_axes_attribute_opset17() {
    extreme(|g| { let x = g.x(); g.op("ReduceMin", &[&x], vec![a_is("axes", &[1]), a_i("keepdims", 0)]) });
}

#[test]
fn reduce_min_axes_input_opset18() {
    extreme(|g| {
        g.opset = 18;
        let x = g.x();
        let a = g.ints(&[3, 1]);
        g.op("ReduceMin", &[&x, &a], vec![])
    });
}

#[test]
fn reduce_max_ties_split_evenly() {
    // All four elements tie: each gets a quarter of the gradient, as PyTorch's amax.
    let dims = [2, 1, 2, 2];
    let mut g = G::new(&dims_i64(&dims), 1);
    let x = g.x();
    let m = g.op("ReduceMax", &[&x], vec![a_is("axes", &[2, 3]), a_i("keepdims", 0)]);
    let model = g.finish(&m);
    let explain = explain_model(&model, &[ReluRule::Plain]);
    let mut s = session(&explain, ort::session::builder::GraphOptimizationLevel::All);
    let xin = ArrayD::from_elem(ndarray::IxDyn(&dims), 0.5f32);
    let seed = ArrayD::from_shape_vec(ndarray::IxDyn(&[2, 1]), vec![1.0, -2.0]).unwrap();
    let out = run(&mut s, vec![("x", xin), (camserve::onnx::contract::SEED, seed)], &[camserve::onnx::contract::GRADIENTS]);
    let got: Vec<f32> = out[0].iter().copied().collect();
    assert_eq!(got, vec![0.25, 0.25, 0.25, 0.25, -0.5, -0.5, -0.5, -0.5]);
}

#[test]
fn reduce_l2_axes_attribute_opset17() {
    smooth(uniform(&mut rng(17), &DIMS, -1.0, 1.0), |g| {
        let x = g.x();
        g.op("ReduceL2", &[&x], vec![a_is("axes", &[1, 3]), a_i("keepdims", 1)])
    });
}

#[test]
fn reduce_l2_axes_input_opset20() {
    smooth(uniform(&mut rng(18), &DIMS, -1.0, 1.0), |g| {
        g.opset = 20;
        let x = g.x();
        let a = g.ints(&[-2]);
        g.op("ReduceL2", &[&x, &a], vec![a_i("keepdims", 0)])
    });
}

#[test]
fn reduce_l2_of_zeros_is_finite() {
    // y = 0: the gradient is 0 (as PyTorch's norm), not NaN.
    let dims = [2, 1, 2, 2];
    let mut g = G::new(&dims_i64(&dims), 1);
    let x = g.x();
    let m = g.op("ReduceL2", &[&x], vec![a_is("axes", &[2, 3])]);
    let model = g.finish(&m);
    let explain = explain_model(&model, &[ReluRule::Plain]);
    let mut s = session(&explain, ort::session::builder::GraphOptimizationLevel::All);
    let xin = ArrayD::from_elem(ndarray::IxDyn(&dims), 0.0f32);
    let seed = ArrayD::from_shape_vec(ndarray::IxDyn(&[2, 1]), vec![1.0, -2.0]).unwrap();
    let out = run(&mut s, vec![("x", xin), (camserve::onnx::contract::SEED, seed)], &[camserve::onnx::contract::GRADIENTS]);
    assert!(out[0].iter().all(|&v| v == 0.0), "{:?}", out[0]);
}

#[test]
fn reduce_log_sum_exp_axes_attribute_opset17() {
    smooth(uniform(&mut rng(19), &DIMS, -2.0, 2.0), |g| {
        let x = g.x();
        g.op("ReduceLogSumExp", &[&x], vec![a_is("axes", &[-1]), a_i("keepdims", 0)])
    });
}

#[test]
fn reduce_log_sum_exp_axes_input_opset20() {
    smooth(uniform(&mut rng(20), &DIMS, -2.0, 2.0), |g| {
        g.opset = 20;
        let x = g.x();
        let a = g.ints(&[1, 2]);
        g.op("ReduceLogSumExp", &[&x, &a], vec![a_i("keepdims", 1)])
    });
}

#[test]
fn reduce_mean_axes_input_opset20() {
    linear(|g| {
        g.opset = 20;
        let x = g.x();
        let a = g.ints(&[2, -1]);
        g.op("ReduceMean", &[&x, &a], vec![a_i("keepdims", 0)])
    });
}

#[test]
fn reduce_mean_and_sum_noop_with_empty_axes_opset18() {
    // noop_with_empty_axes and no axes (missing, or an empty axes input): the identity.
    linear(|g| {
        g.opset = 18;
        let x = g.x();
        let m = g.op("ReduceMean", &[&x], vec![a_i("noop_with_empty_axes", 1)]);
        let empty = g.ints(&[]);
        let s = g.op("ReduceSum", &[&m, &empty], vec![a_i("noop_with_empty_axes", 1), a_i("keepdims", 0)]);
        let k = g.rand(&[1, 2, 7, 7], 1.0);
        g.op("Mul", &[&s, &k], vec![])
    });
}

#[test]
fn reduce_sum_repeated_axis() {
    // A repeated axis (-1 and 3) counts once.
    linear(|g| {
        let x = g.x();
        let a = g.ints(&[3, -1, 1]);
        g.op("ReduceSum", &[&x, &a], vec![a_i("keepdims", 1)])
    });
}

#[test]
fn reductions_over_all_axes_refused() {
    // Missing axes mean all axes, the batch axis included.
    for op in ["ReduceMean", "ReduceSum", "ReduceMax", "ReduceL2", "ReduceLogSumExp"] {
        let e = refused(|g| { let x = g.x(); g.op(op, &[&x], vec![a_i("keepdims", 1)]) });
        assert!(e.contains("batch axis"), "{op}: {e}");
    }
    let e = refused(|g| {
        g.opset = 18;
        let x = g.x();
        let a = g.ints(&[0, 1]);
        g.op("ReduceMin", &[&x, &a], vec![])
    });
    assert!(e.contains("batch axis"), "{e}");
}

// ---------------------------------------------------------------- softmax over inner axes

#[test]
fn softmax_last_axis_attention_scores() {
    // x as [N, heads, T, T] attention logits; axis -1 (the opset 13+ default).
    smooth(uniform(&mut rng(21), &DIMS, -2.0, 2.0), |g| {
        let x = g.x();
        let p = g.op("Softmax", &[&x], vec![]);
        let k = g.rand(&[1, 2, 7, 7], 1.0);
        g.op("Mul", &[&p, &k], vec![])
    });
}

#[test]
fn softmax_axis_1_and_2() {
    smooth(uniform(&mut rng(22), &DIMS, -2.0, 2.0), |g| {
        let x = g.x();
        let a = g.op("Softmax", &[&x], vec![a_i("axis", 1)]);
        let b = g.op("Softmax", &[&x], vec![a_i("axis", -2)]);
        let k = g.rand(&[1, 2, 7, 7], 1.0);
        let m = g.op("Mul", &[&b, &k], vec![]);
        g.op("Add", &[&a, &m], vec![])
    });
}

#[test]
fn log_softmax_axis_1_and_2() {
    smooth(uniform(&mut rng(23), &DIMS, -2.0, 2.0), |g| {
        let x = g.x();
        let a = g.op("LogSoftmax", &[&x], vec![a_i("axis", 1)]);
        let b = g.op("LogSoftmax", &[&x], vec![a_i("axis", 2)]);
        let k = g.rand(&[1, 2, 7, 7], 1.0);
        let m = g.op("Mul", &[&b, &k], vec![]);
        g.op("Add", &[&a, &m], vec![])
    });
}

#[test]
fn softmax_batch_axis_refused() {
    let e = refused(|g| { let x = g.x(); g.op("Softmax", &[&x], vec![a_i("axis", 0)]) });
    assert!(e.contains("batch axis"), "{e}");
}

// ---------------------------------------------------------------- Einsum

fn einsum(g: &mut G, eq: &str, inputs: &[&str]) -> String {
    g.op("Einsum", inputs, vec![a_s("equation", eq)])
}

/// Two different x-dependent operands, [N, heads, T, D] = [2, 2, 7, 7]: x * w and x + b.
fn two_operands(g: &mut G) -> (String, String) {
    let x = g.x();
    let w = g.rand(&[1, 2, 7, 7], 1.0);
    let a = g.op("Mul", &[&x, &w], vec![]);
    let b0 = g.rand(&[1, 2, 7, 7], 1.0);
    let b = g.op("Add", &[&x, &b0], vec![]);
    (a, b)
}

#[test]
fn einsum_attention_scores() {
    smooth(uniform(&mut rng(24), &DIMS, -1.0, 1.0), |g| {
        let (q, k) = two_operands(g);
        einsum(g, "bhid,bhjd->bhij", &[&q, &k])
    });
}

#[test]
fn einsum_attention_values() {
    smooth(uniform(&mut rng(25), &DIMS, -1.0, 1.0), |g| {
        let (p, v) = two_operands(g);
        einsum(g, "bhij,bhjd->bhid", &[&p, &v])
    });
}

#[test]
fn einsum_attention_block() {
    // softmax(q k^T / sqrt(d)) v, all three from x, with spaces in the equations.
    smooth(uniform(&mut rng(26), &DIMS, -1.0, 1.0), |g| {
        let (q, k) = two_operands(g);
        let s = einsum(g, "bhid, bhjd -> bhij", &[&q, &k]);
        let scale = g.scalar(0.5);
        let s = g.op("Mul", &[&s, &scale], vec![]);
        let p = g.op("Softmax", &[&s], vec![a_i("axis", -1)]);
        let x = g.x();
        einsum(g, "bhij,bhjd->bhid", &[&p, &x])
    });
}

#[test]
fn einsum_batched_matmul() {
    smooth(uniform(&mut rng(27), &DIMS, -1.0, 1.0), |g| {
        let (a, b) = two_operands(g);
        let (s1, s2) = (g.ints(&[0, 14, 7]), g.ints(&[0, 7, 14]));
        let a = g.op("Reshape", &[&a, &s1], vec![]);
        let b = g.op("Reshape", &[&b, &s2], vec![]);
        einsum(g, "bij,bjk->bik", &[&a, &b])
    });
}

#[test]
fn einsum_matrix_product_explicit_and_implicit() {
    linear(|g| {
        let x = g.x();
        let f = g.op("Flatten", &[&x], vec![a_i("axis", 1)]);
        let w = g.rand(&[98, 3], 0.3);
        let a = einsum(g, "ij,jk->ik", &[&f, &w]);
        let w2 = g.rand(&[98, 3], 0.3);
        let b = einsum(g, "ij,jk", &[&f, &w2]);
        g.op("Add", &[&a, &b], vec![])
    });
}

#[test]
fn einsum_channel_mixing() {
    linear(|g| {
        let x = g.x();
        let w = g.rand(&[3, 2], 0.5);
        einsum(g, "nchw,kc->nkhw", &[&x, &w])
    });
}

#[test]
fn einsum_summed_out_index_and_constant_first() {
    // w appears only in x's subscripts: the forward sums it out, the backward expands it back.
    linear(|g| {
        let x = g.x();
        let w = g.rand(&[3, 2], 0.5);
        einsum(g, "kc,nchw->nkh", &[&w, &x])
    });
}

#[test]
fn einsum_single_operand_permute_and_sum() {
    linear(|g| { let x = g.x(); einsum(g, "nchw->nhc", &[&x]) });
}

#[test]
fn einsum_ellipsis() {
    smooth(uniform(&mut rng(28), &DIMS, -1.0, 1.0), |g| {
        let (a, b) = two_operands(g);
        einsum(g, "...id,...jd->...ij", &[&a, &b])
    });
}

#[test]
fn einsum_same_tensor_twice() {
    // x x^T over the last axis: both operands are x, the two contributions add up.
    smooth(uniform(&mut rng(29), &DIMS, -1.0, 1.0), |g| {
        let x = g.x();
        einsum(g, "nchw,ncvw->nchv", &[&x, &x])
    });
}

#[test]
fn einsum_diagonal_refused() {
    let e = refused(|g| { let x = g.x(); einsum(g, "nchh->nch", &[&x]) });
    assert!(e.contains("repeated index"), "{e}");
}

// ---------------------------------------------------------------- RMSNormalization (opset 23)

#[test]
fn rms_norm_last_axis() {
    smooth(uniform(&mut rng(30), &DIMS, -1.0, 1.0), |g| {
        g.opset = 23;
        let x = g.x();
        let scale = g.rand(&[7], 1.0);
        let y = g.op("RMSNormalization", &[&x, &scale], vec![]);
        let k = g.rand(&[1, 2, 7, 7], 1.0);
        g.op("Mul", &[&y, &k], vec![])
    });
}

#[test]
fn rms_norm_channels_and_spatial() {
    // axis 1: the mean of squares over C, H, W; a broadcast scale; a larger epsilon.
    smooth(uniform(&mut rng(31), &DIMS, -1.0, 1.0), |g| {
        g.opset = 23;
        let x = g.x();
        let scale = g.rand(&[2, 1, 7], 1.0);
        let y = g.op("RMSNormalization", &[&x, &scale], vec![a_i("axis", -3), a_f("epsilon", 1e-2)]);
        let k = g.rand(&[1, 2, 7, 7], 1.0);
        g.op("Mul", &[&y, &k], vec![])
    });
}

// ---------------------------------------------------------------- Attention (opset 23), spelled out

/// Tokens [N, 49, 2] from x [N, 2, 7, 7], projected to `width` features: the q, k or v input of a ViT block.
fn tokens(g: &mut G, width: i64) -> String {
    let x = g.x();
    let s = g.ints(&[0, 2, 49]);
    let r = g.op("Reshape", &[&x, &s], vec![]);
    let t = g.op("Transpose", &[&r], vec![a_is("perm", &[0, 2, 1])]);
    let w = g.rand(&[2, width], 1.0);
    g.op("MatMul", &[&t, &w], vec![])
}

#[test]
fn attention_3d_grouped_query_heads() {
    // PyTorch's scaled_dot_product_attention as one node: [B, S, H*D] inputs, 4 query heads sharing 2 key/value
    // heads (GQA), the default scale 1/sqrt(D). The FD reference runs ONNX Runtime's own Attention kernel, and
    // check_gradients also holds the spelled-out forward to it (logits within 1e-5).
    smooth(uniform(&mut rng(40), &DIMS, -1.0, 1.0), |g| {
        g.opset = 23;
        // Head size 4 for q and k, 6 for v (the output is [B, S, 4 * 6]).
        let (q, k, v) = (tokens(g, 16), tokens(g, 8), tokens(g, 12));
        let y = g.op("Attention", &[&q, &k, &v], vec![a_i("q_num_heads", 4), a_i("kv_num_heads", 2)]);
        let w = g.rand(&[24, 3], 1.0);
        g.op("MatMul", &[&y, &w], vec![])
    });
}

#[test]
fn attention_4d_masks_scale_and_softcap() {
    // [B, H, S, D] inputs, a boolean mask (every query keeps key 0), the causal triangle, an explicit scale and a
    // softcap, with present_key and present_value outputs left unused.
    smooth(uniform(&mut rng(41), &DIMS, -1.0, 1.0), |g| {
        g.opset = 23;
        let heads = |g: &mut G| {
            let t = tokens(g, 8);
            let s = g.ints(&[0, 49, 2, 4]);
            let r = g.op("Reshape", &[&t, &s], vec![]);
            g.op("Transpose", &[&r], vec![a_is("perm", &[0, 2, 1, 3])])
        };
        let (q, k, v) = (heads(g), heads(g), heads(g));
        let bits: Vec<i32> = (0..49 * 49).map(|i| (i % 49 == 0 || (i * 7) % 5 != 0) as i32).collect();
        let name = format!("mask{}", g.inits.len());
        g.inits.push(camserve::onnx::TensorProto {
            name: Some(name.clone()),
            dims: vec![49, 49],
            data_type: Some(camserve::onnx::tensor::BOOL),
            int32_data: bits,
            ..Default::default()
        });
        let outs = g.op_n(
            "Attention",
            &[&q, &k, &v, &name],
            vec![a_i("is_causal", 1), a_f("scale", 0.3), a_f("softcap", 2.0)],
            3,
        );
        outs[0].clone()
    });
}
