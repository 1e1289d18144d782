//! A finite-difference test for every backward rule, through ONNX Runtime.
//!
//! Each test builds a small graph `x -> Identity -> <op under test> -> Flatten -> logits`, rewrites it into an
//! explain graph and compares the input gradient of sum(seed * logits) with central differences, element by
//! element, for a batch of 2 with different seed rows (see `common::check_gradients`).
//!
//! Tolerances (max|analytic - fd| / max|fd|): 1e-4 for ops that are linear, or piecewise linear with inputs
//! chosen so that no kink lies within the step (then central differences are exact up to f32 rounding);
//! 5e-4 for smooth non-linear ops, where the O(h^2) truncation error of the difference quotient dominates.

mod common;

use camserve::onnx::proto::ModelProto;
use common::*;
use ndarray::ArrayD;

// New rules, one file per family (tests/backward_rules/).
#[path = "backward_rules/indexing.rs"]
mod indexing;
#[path = "backward_rules/math.rs"]
mod math;
#[path = "backward_rules/resample.rs"]
mod resample;

const LINEAR: f64 = 1e-4;
const SMOOTH: f64 = 5e-4;

const DIMS: [usize; 4] = [2, 2, 7, 7];

fn dims_i64(d: &[usize]) -> Vec<i64> {
    d.iter().map(|&v| v as i64).collect()
}

/// Builds a graph on an input of `dims` with `f`, then checks it on `x`.
fn check(dims: &[usize], x: ArrayD<f32>, h: f32, tol: f64, f: impl FnOnce(&mut G) -> String) -> f64 {
    let mut g = G::new(&dims_i64(dims), 11);
    let y = f(&mut g);
    let model: ModelProto = g.finish(&y);
    check_gradients(&model, &x, h, tol)
}

fn linear(f: impl FnOnce(&mut G) -> String) -> f64 {
    check_dims(&DIMS, f)
}

fn check_dims(dims: &[usize], f: impl FnOnce(&mut G) -> String) -> f64 {
    let x = uniform(&mut rng(1), dims, -1.0, 1.0);
    check(dims, x, 0.5, LINEAR, f)
}

fn conv(g: &mut G, x: &str, cin: i64, cout: i64, k: i64, attrs: Vec<camserve::onnx::proto::AttributeProto>, group: i64) -> String {
    let w = g.rand(&[cout, cin / group, k, k], 0.5);
    let mut attrs = attrs;
    attrs.push(a_i("group", group));
    g.op("Conv", &[x, &w], attrs)
}

// ---------------------------------------------------------------- Conv

#[test]
fn conv_3x3_same_size() {
    linear(|g| { let x = g.x(); conv(g, &x, 2, 3, 3, vec![a_is("pads", &[1, 1, 1, 1])], 1) });
}

#[test]
fn conv_with_bias() {
    linear(|g| {
        let x = g.x();
        let w = g.rand(&[3, 2, 3, 3], 0.5);
        let b = g.rand(&[3], 0.5);
        g.op("Conv", &[&x, &w, &b], vec![])
    });
}

#[test]
fn conv_stride2_odd_size() {
    linear(|g| { let x = g.x(); conv(g, &x, 2, 3, 3, vec![a_is("strides", &[2, 2]), a_is("pads", &[1, 1, 1, 1])], 1) });
}

#[test]
fn conv_stride2_even_size() {
    check_dims(&[2, 2, 8, 8], |g| {
        let x = g.x();
        conv(g, &x, 2, 3, 3, vec![a_is("strides", &[2, 2]), a_is("pads", &[1, 1, 1, 1])], 1)
    });
}

// Convolutions with 16 or more input channels take the polyphase path (stride-1 convs per output phase).

#[test]
fn conv_stride2_polyphase_odd_and_even() {
    for size in [7, 8] {
        check_dims(&[2, 16, size, size], |g| {
            let x = g.x();
            conv(g, &x, 16, 4, 3, vec![a_is("strides", &[2, 2]), a_is("pads", &[1, 1, 1, 1])], 1)
        });
    }
}

#[test]
fn conv_stride2_polyphase_1x1_and_7x7() {
    check_dims(&[2, 16, 9, 9], |g| {
        let x = g.x();
        let a = conv(g, &x, 16, 16, 1, vec![a_is("strides", &[2, 2])], 1);
        let w = g.rand(&[16, 16, 7, 7], 0.2);
        let b = g.op("Conv", &[&x, &w], vec![a_is("strides", &[2, 2]), a_is("pads", &[3, 3, 3, 3])]);
        g.op("Add", &[&a, &b], vec![])
    });
}

#[test]
fn polyphase_conv_and_global_pool_behind_relu() {
    // Behind a ReLU both gradients go through the layout hint (an identity MaxPool, rules::RuleCtx::layout_hint).
    let dims = [2, 16, 8, 8];
    check(&dims, away_from_zero(&mut rng(5), &dims, 0.1), 0.05, LINEAR, |g| {
        let x = g.x();
        let r = g.op("Relu", &[&x], vec![]);
        let a = conv(g, &r, 16, 16, 3, vec![a_is("strides", &[2, 2]), a_is("pads", &[1, 1, 1, 1])], 1);
        let p = g.op("GlobalAveragePool", &[&r], vec![]);
        g.op("Add", &[&a, &p], vec![])
    });
}

#[test]
fn conv_stride3_polyphase_depthwise_asymmetric() {
    check_dims(&[2, 16, 10, 11], |g| {
        let x = g.x();
        let w = g.rand(&[16, 1, 4, 3], 0.5);
        g.op("Conv", &[&x, &w], vec![a_i("group", 16), a_is("strides", &[3, 2]), a_is("pads", &[2, 0, 1, 1])])
    });
}

#[test]
fn conv_stride3_unused_border() {
    // 8 = 3*2 + 2: the last column is never read by a 1x1 stride-3 conv: its gradient must be 0.
    check_dims(&[2, 2, 8, 8], |g| { let x = g.x(); conv(g, &x, 2, 2, 1, vec![a_is("strides", &[3, 3])], 1) });
}

#[test]
fn conv_dilated() {
    linear(|g| {
        let x = g.x();
        conv(g, &x, 2, 2, 3, vec![a_is("dilations", &[2, 2]), a_is("pads", &[2, 1, 2, 1])], 1)
    });
}

#[test]
fn conv_grouped() {
    check_dims(&[2, 4, 5, 5], |g| { let x = g.x(); conv(g, &x, 4, 6, 3, vec![a_is("pads", &[1, 1, 1, 1])], 2) });
}

#[test]
fn conv_depthwise_stride2() {
    check_dims(&[2, 3, 7, 7], |g| {
        let x = g.x();
        conv(g, &x, 3, 3, 3, vec![a_is("pads", &[1, 1, 1, 1]), a_is("strides", &[2, 2])], 3)
    });
}

#[test]
fn conv_depthwise_stride1_dilated() {
    check_dims(&[2, 3, 7, 7], |g| {
        let x = g.x();
        conv(g, &x, 3, 3, 3, vec![a_is("pads", &[2, 2, 2, 2]), a_is("dilations", &[2, 2])], 3)
    });
}

#[test]
fn conv_grouped_1x1_stride1_unpadded_asymmetric() {
    check_dims(&[2, 4, 6, 5], |g| {
        let x = g.x();
        let w = g.rand(&[6, 2, 2, 3], 0.5);
        g.op("Conv", &[&x, &w], vec![a_i("group", 2), a_is("pads", &[0, 1, 1, 0])])
    });
}

#[test]
fn conv_same_upper_stride2() {
    linear(|g| { let x = g.x(); conv(g, &x, 2, 2, 3, vec![a_s("auto_pad", "SAME_UPPER"), a_is("strides", &[2, 2])], 1) });
}

#[test]
fn conv_same_lower_even_kernel() {
    linear(|g| { let x = g.x(); conv(g, &x, 2, 2, 2, vec![a_s("auto_pad", "SAME_LOWER")], 1) });
}

#[test]
fn conv_asymmetric_pads_rect_kernel() {
    linear(|g| {
        let x = g.x();
        let w = g.rand(&[3, 2, 1, 3], 0.5);
        g.op("Conv", &[&x, &w], vec![a_is("pads", &[0, 2, 1, 0]), a_is("strides", &[1, 2])])
    });
}

// ---------------------------------------------------------------- pooling

fn pool_input(dims: &[usize]) -> ArrayD<f32> {
    distinct(&mut rng(3), dims, 0.05)
}

fn maxpool(dims: &[usize], attrs: Vec<camserve::onnx::proto::AttributeProto>) -> f64 {
    check(dims, pool_input(dims), 0.01, LINEAR, |g| { let x = g.x(); g.op("MaxPool", &[&x], attrs) })
}

#[test]
fn maxpool_2x2_stride2() {
    maxpool(&DIMS, vec![a_is("kernel_shape", &[2, 2]), a_is("strides", &[2, 2])]);
}

#[test]
fn maxpool_3x3_stride2_overlapping_pads() {
    maxpool(&[2, 2, 8, 8], vec![a_is("kernel_shape", &[3, 3]), a_is("strides", &[2, 2]), a_is("pads", &[1, 1, 1, 1])]);
}

#[test]
fn maxpool_3x3_stride2_ceil_mode() {
    maxpool(&[2, 2, 8, 8], vec![a_is("kernel_shape", &[3, 3]), a_is("strides", &[2, 2]), a_i("ceil_mode", 1)]);
}

#[test]
fn maxpool_dilated_asymmetric_pads() {
    maxpool(&DIMS, vec![a_is("kernel_shape", &[2, 2]), a_is("dilations", &[2, 2]), a_is("pads", &[1, 0, 0, 1])]);
}

#[test]
fn global_max_pool() {
    check(&DIMS, pool_input(&DIMS), 0.01, LINEAR, |g| { let x = g.x(); g.op("GlobalMaxPool", &[&x], vec![]) });
}

#[test]
fn global_max_pool_ties_go_to_one_element() {
    // A dead channel (all zeros after ReLU) has ties everywhere: the gradient must go to one element only,
    // as in PyTorch, not to all 49.
    let dims = [2, 1, 7, 7];
    let mut g = G::new(&dims_i64(&dims), 1);
    let x = g.x();
    let r = g.op("Relu", &[&x], vec![]);
    let y = g.op("GlobalMaxPool", &[&r], vec![]);
    let model = g.finish(&y);
    let explain = explain_model(&model, &[camserve::onnx::rules::ReluRule::Plain]);
    let mut s = session(&explain, ort::session::builder::GraphOptimizationLevel::All);
    let xin = ArrayD::from_elem(ndarray::IxDyn(&dims), -1.0f32);
    let seed = ArrayD::from_elem(ndarray::IxDyn(&[2, 1]), 1.0f32);
    let out = run(&mut s, vec![("x", xin), ("camserve.seed", seed)], &["camserve.gradients"]);
    // The gradient w.r.t. the Identity output goes through Relu (x < 0: zero), so look at the ReLU output
    // instead: build the same graph targeting the ReLU output.
    assert!(out[0].iter().all(|&v| v == 0.0));
    let ex = camserve::backend::probe::analyse(model, &Default::default()).unwrap();
    let m2 = ex.build(&camserve::onnx::rewrite::ExplainPlan::new(r.clone(), [])).unwrap();
    let mut s2 = session(&m2, ort::session::builder::GraphOptimizationLevel::All);
    let xin = ArrayD::from_elem(ndarray::IxDyn(&dims), -1.0f32);
    let seed = ArrayD::from_elem(ndarray::IxDyn(&[2, 1]), 1.0f32);
    let out = run(&mut s2, vec![("x", xin), ("camserve.seed", seed)], &["camserve.gradients"]);
    for b in 0..2 {
        let item = out[0].index_axis(ndarray::Axis(0), b);
        assert_eq!(item.iter().filter(|&&v| v != 0.0).count(), 1);
        assert_eq!(item[[0, 0, 0]], 1.0, "PyTorch gives the first maximum the gradient");
    }
}

fn avgpool(dims: &[usize], attrs: Vec<camserve::onnx::proto::AttributeProto>) -> f64 {
    check_dims(dims, |g| { let x = g.x(); g.op("AveragePool", &[&x], attrs) })
}

#[test]
fn avgpool_2x2_stride2() {
    avgpool(&DIMS, vec![a_is("kernel_shape", &[2, 2]), a_is("strides", &[2, 2])]);
}

#[test]
fn avgpool_3x3_pads_exclude_pad() {
    avgpool(&DIMS, vec![a_is("kernel_shape", &[3, 3]), a_is("pads", &[1, 1, 1, 1]), a_i("count_include_pad", 0)]);
}

#[test]
fn avgpool_3x3_pads_include_pad() {
    avgpool(&DIMS, vec![a_is("kernel_shape", &[3, 3]), a_is("pads", &[1, 1, 1, 1]), a_i("count_include_pad", 1)]);
}

#[test]
fn avgpool_ceil_mode_exclude_pad() {
    avgpool(&[2, 2, 8, 8], vec![
        a_is("kernel_shape", &[3, 3]), a_is("strides", &[2, 2]), a_is("pads", &[1, 1, 1, 1]), a_i("ceil_mode", 1),
    ]);
}

#[test]
fn avgpool_ceil_mode_include_pad() {
    avgpool(&[2, 2, 8, 8], vec![
        a_is("kernel_shape", &[3, 3]), a_is("strides", &[2, 2]), a_is("pads", &[1, 1, 1, 1]), a_i("ceil_mode", 1),
        a_i("count_include_pad", 1),
    ]);
}

#[test]
fn avgpool_same_upper() {
    avgpool(&DIMS, vec![a_is("kernel_shape", &[2, 2]), a_is("strides", &[2, 2]), a_s("auto_pad", "SAME_UPPER")]);
}

#[test]
fn global_average_pool() {
    linear(|g| { let x = g.x(); g.op("GlobalAveragePool", &[&x], vec![]) });
}

#[test]
fn reduce_mean_spatial_keepdims() {
    linear(|g| { let x = g.x(); g.op("ReduceMean", &[&x], vec![a_is("axes", &[2, 3]), a_i("keepdims", 1)]) });
}

#[test]
fn reduce_mean_spatial_no_keepdims() {
    linear(|g| { let x = g.x(); g.op("ReduceMean", &[&x], vec![a_is("axes", &[-1, 2]), a_i("keepdims", 0)]) });
}

#[test]
fn reduce_sum_axes_input() {
    linear(|g| {
        let x = g.x();
        let a = g.ints(&[1, 3]);
        g.op("ReduceSum", &[&x, &a], vec![a_i("keepdims", 0)])
    });
}

// ---------------------------------------------------------------- normalisation

#[test]
fn batch_norm_inference() {
    linear(|g| {
        let x = g.x();
        let scale = g.rand(&[2], 2.0);
        let bias = g.rand(&[2], 1.0);
        let mean = g.rand(&[2], 1.0);
        let var = g.init(&[2], vec![0.5, 2.0]);
        g.op("BatchNormalization", &[&x, &scale, &bias, &mean, &var], vec![a_f("epsilon", 1e-3)])
    });
}

#[test]
fn layer_norm_last_axis() {
    check(&DIMS, uniform(&mut rng(4), &DIMS, -1.0, 1.0), 1e-2, SMOOTH, |g| {
        let x = g.x();
        let scale = g.rand(&[7], 1.0);
        let bias = g.rand(&[7], 1.0);
        let y = g.op("LayerNormalization", &[&x, &scale, &bias], vec![a_f("epsilon", 1e-3)]);
        let k = g.rand(&[1, 2, 7, 7], 1.0);
        g.op("Mul", &[&y, &k], vec![])
    });
}

#[test]
fn layer_norm_channels_and_spatial() {
    check(&DIMS, uniform(&mut rng(4), &DIMS, -1.0, 1.0), 1e-2, SMOOTH, |g| {
        let x = g.x();
        let scale = g.rand(&[2, 7, 7], 1.0);
        let y = g.op("LayerNormalization", &[&x, &scale], vec![a_i("axis", 1)]);
        let k = g.rand(&[1, 2, 7, 7], 1.0);
        g.op("Mul", &[&y, &k], vec![])
    });
}

// ---------------------------------------------------------------- activations

/// Inputs at least `margin` away from every kink in `kinks`, within [-range, range].
fn avoiding(kinks: &[f32], range: f32, margin: f32, seed: u64) -> ArrayD<f32> {
    let mut r = rng(seed);
    let mut x = uniform(&mut r, &DIMS, -range, range);
    x.mapv_inplace(|v| {
        let mut v = v;
        for &k in kinks {
            if (v - k).abs() < margin {
                v = if v >= k { k + margin } else { k - margin };
            }
        }
        v
    });
    x
}

fn pointwise(op: &str, attrs: Vec<camserve::onnx::proto::AttributeProto>, x: ArrayD<f32>, h: f32, tol: f64) -> f64 {
    check(&DIMS, x, h, tol, |g| { let x = g.x(); g.op(op, &[&x], attrs) })
}

#[test]
fn relu() {
    pointwise("Relu", vec![], away_from_zero(&mut rng(4), &DIMS, 0.1), 0.05, LINEAR);
}

/// Edge values for the ReLU mask: [y > 0] must come out exactly 0 or 1 for each.
const MASK_EDGES: [f32; 12] = [
    0.0,
    -0.0,
    -1.0,
    f32::from_bits(1), // 2^-149, the smallest subnormal
    1.0e-42,
    f32::MIN_POSITIVE / 2.0,
    f32::MIN_POSITIVE, // 2^-126
    1e-30,
    1.0,
    3.0e38,
    f32::MAX,
    f32::INFINITY,
];

/// Runs `x -> [Conv 1x1 to `channels` with weights 1] -> Relu -> logits` through the plain and guided chains on
/// the edge values and checks the input gradients exactly. With 16 channels ONNX Runtime keeps the ReLU output
/// and its mask in its blocked NCHWc layout (fused Conv+Relu), with 1 (no Conv) in plain NCHW.
fn check_relu_mask_edges(channels: i64) {
    let dims = [2, 1, 3, 4];
    let mut g = G::new(&dims_i64(&dims), 1);
    let x = g.x();
    let pre = if channels == 1 {
        x
    } else {
        let w = g.init(&[channels, 1, 1, 1], vec![1.0; channels as usize]);
        g.op("Conv", &[&x, &w], vec![])
    };
    let r = g.op("Relu", &[&pre], vec![]);
    let model = g.finish(&r);
    let rules = [camserve::onnx::rules::ReluRule::Plain, camserve::onnx::rules::ReluRule::Guided];
    let explain = explain_model(&model, &rules);
    let mut s = session(&explain, ort::session::builder::GraphOptimizationLevel::All);
    let mut data = MASK_EDGES.to_vec();
    data.extend(MASK_EDGES.iter().rev());
    let xin = ArrayD::from_shape_vec(ndarray::IxDyn(&dims), data.clone()).unwrap();
    // Seeds of both signs (the guided rule also drops negative gradients), dyadic so that sums are exact.
    let k = 12 * channels as usize;
    let seed: Vec<f32> = (0..2 * k).map(|i| if i % 3 == 0 { -0.5 } else { 0.25 * (1 + i % 4) as f32 }).collect();
    let names = rules.map(camserve::onnx::contract::input_grad_name);
    let seed_arr = ArrayD::from_shape_vec(ndarray::IxDyn(&[2, k]), seed.clone()).unwrap();
    let out = run(&mut s, vec![("x", xin), ("camserve.seed", seed_arr)], &[&names[0], &names[1]]);
    for (i, &v) in data.iter().enumerate() {
        let (b, e) = (i / 12, i % 12);
        let pass = if v > 0.0 { 1.0 } else { 0.0 };
        let seeds = (0..channels as usize).map(|c| seed[b * k + c * 12 + e]);
        let plain: f32 = seeds.clone().sum::<f32>() * pass;
        let guided: f32 = seeds.map(|s| s.max(0.0)).sum::<f32>() * pass;
        assert_eq!(out[0].as_slice().unwrap()[i], plain, "plain rule at x = {v:e}, {channels} channels");
        assert_eq!(out[1].as_slice().unwrap()[i], guided, "guided rule at x = {v:e}, {channels} channels");
    }
}

#[test]
fn relu_mask_is_exact_from_subnormals_to_infinity() {
    check_relu_mask_edges(1);
    check_relu_mask_edges(16);
}

#[test]
fn leaky_relu() {
    pointwise("LeakyRelu", vec![a_f("alpha", 0.1)], away_from_zero(&mut rng(4), &DIMS, 0.1), 0.05, LINEAR);
}

#[test]
fn prelu() {
    check(&DIMS, away_from_zero(&mut rng(4), &DIMS, 0.1), 0.05, LINEAR, |g| {
        let x = g.x();
        let slope = g.init(&[2, 1, 1], vec![0.25, -0.5]);
        g.op("PRelu", &[&x, &slope], vec![])
    });
}

#[test]
fn clip_relu6() {
    check(&DIMS, avoiding(&[0.0, 6.0], 8.0, 0.2, 5), 0.1, LINEAR, |g| {
        let x = g.x();
        let (lo, hi) = (g.scalar(0.0), g.scalar(6.0));
        g.op("Clip", &[&x, &lo, &hi], vec![])
    });
}

#[test]
fn clip_min_only_and_max_only() {
    check(&DIMS, avoiding(&[-0.5, 0.5], 1.0, 0.1, 6), 0.05, LINEAR, |g| {
        let x = g.x();
        let lo = g.scalar(-0.5);
        let a = g.op("Clip", &[&x, &lo], vec![]);
        let hi = g.scalar(0.5);
        g.op("Clip", &[&a, "", &hi], vec![])
    });
}

#[test]
fn sigmoid() {
    pointwise("Sigmoid", vec![], uniform(&mut rng(4), &DIMS, -3.0, 3.0), 1e-2, SMOOTH);
}

#[test]
fn hard_sigmoid() {
    // kinks where alpha*x + beta is 0 or 1: x = -2.5, 2.5 for alpha 0.2, beta 0.5
    pointwise("HardSigmoid", vec![], avoiding(&[-2.5, 2.5], 4.0, 0.2, 7), 0.1, LINEAR);
}

#[test]
fn hard_swish() {
    pointwise("HardSwish", vec![], avoiding(&[-3.0, 3.0], 5.0, 0.2, 8), 0.05, SMOOTH);
}

#[test]
fn tanh() {
    pointwise("Tanh", vec![], uniform(&mut rng(4), &DIMS, -2.0, 2.0), 1e-2, SMOOTH);
}

#[test]
fn elu() {
    pointwise("Elu", vec![a_f("alpha", 0.7)], avoiding(&[0.0], 2.0, 0.1, 9), 1e-2, SMOOTH);
}

#[test]
fn softplus() {
    pointwise("Softplus", vec![], uniform(&mut rng(4), &DIMS, -3.0, 3.0), 1e-2, SMOOTH);
}

#[test]
fn exp() {
    pointwise("Exp", vec![], uniform(&mut rng(4), &DIMS, -1.0, 1.0), 1e-2, SMOOTH);
}

#[test]
fn log() {
    pointwise("Log", vec![], uniform(&mut rng(4), &DIMS, 0.5, 2.0), 3e-3, SMOOTH);
}

#[test]
fn sqrt() {
    pointwise("Sqrt", vec![], uniform(&mut rng(4), &DIMS, 0.5, 2.0), 1e-2, SMOOTH);
}

#[test]
fn erf() {
    pointwise("Erf", vec![], uniform(&mut rng(4), &DIMS, -2.0, 2.0), 1e-2, SMOOTH);
}

#[test]
fn neg_and_reciprocal() {
    check(&DIMS, uniform(&mut rng(4), &DIMS, 0.5, 2.0), 3e-3, SMOOTH, |g| {
        let x = g.x();
        let r = g.op("Reciprocal", &[&x], vec![]);
        g.op("Neg", &[&r], vec![])
    });
}

#[test]
fn pow_constant_exponent() {
    check(&DIMS, uniform(&mut rng(4), &DIMS, 0.5, 2.0), 1e-2, SMOOTH, |g| {
        let x = g.x();
        let p = g.scalar(3.0);
        g.op("Pow", &[&x, &p], vec![])
    });
}

#[test]
fn softmax_inner() {
    check(&DIMS, uniform(&mut rng(4), &DIMS, -2.0, 2.0), 1e-2, SMOOTH, |g| {
        let x = g.x();
        g.op("Softmax", &[&x], vec![a_i("axis", 1)])
    });
}

#[test]
fn log_softmax_inner() {
    check(&DIMS, uniform(&mut rng(4), &DIMS, -2.0, 2.0), 1e-2, SMOOTH, |g| {
        let x = g.x();
        g.op("LogSoftmax", &[&x], vec![a_i("axis", -1)])
    });
}

// ---------------------------------------------------------------- arithmetic

#[test]
fn add_fan_out_and_broadcast() {
    // x is read three times (residual); the [N,C,1,1] operand is broadcast over H, W.
    linear(|g| {
        let x = g.x();
        let c = conv(g, &x, 2, 2, 3, vec![a_is("pads", &[1, 1, 1, 1])], 1);
        let pooled = g.op("GlobalAveragePool", &[&x], vec![]);
        let s = g.op("Add", &[&c, &x], vec![]);
        g.op("Add", &[&s, &pooled], vec![])
    });
}

#[test]
fn sub_both_sides() {
    linear(|g| {
        let x = g.x();
        let pooled = g.op("GlobalAveragePool", &[&x], vec![]);
        let k = g.rand(&[1, 2, 7, 7], 1.0);
        let a = g.op("Sub", &[&x, &pooled], vec![]);
        g.op("Sub", &[&k, &a], vec![])
    });
}

#[test]
fn mul_squeeze_excitation() {
    // x * sigmoid(conv(GAP(x))): both operands on the path, one broadcast.
    check(&DIMS, uniform(&mut rng(4), &DIMS, -1.0, 1.0), 1e-2, SMOOTH, |g| {
        let x = g.x();
        let p = g.op("GlobalAveragePool", &[&x], vec![]);
        let c = conv(g, &p, 2, 2, 1, vec![], 1);
        let s = g.op("Sigmoid", &[&c], vec![]);
        g.op("Mul", &[&x, &s], vec![])
    });
}

#[test]
fn mul_by_itself_and_constant() {
    check(&DIMS, uniform(&mut rng(4), &DIMS, -1.0, 1.0), 1e-2, SMOOTH, |g| {
        let x = g.x();
        let sq = g.op("Mul", &[&x, &x], vec![]);
        let k = g.rand(&[2, 1, 1], 1.0);
        g.op("Mul", &[&k, &sq], vec![])
    });
}

#[test]
fn silu_as_mul_sigmoid() {
    check(&DIMS, uniform(&mut rng(4), &DIMS, -3.0, 3.0), 1e-2, SMOOTH, |g| {
        let x = g.x();
        let s = g.op("Sigmoid", &[&x], vec![]);
        g.op("Mul", &[&x, &s], vec![])
    });
}

#[test]
fn div_by_constant() {
    linear(|g| {
        let x = g.x();
        let k = g.init(&[1, 2, 1, 1], vec![2.0, -4.0]);
        g.op("Div", &[&x, &k], vec![])
    });
}

#[test]
fn div_by_activation() {
    check(&DIMS, uniform(&mut rng(4), &DIMS, -1.0, 1.0), 1e-2, SMOOTH, |g| {
        let x = g.x();
        let sq = g.op("Mul", &[&x, &x], vec![]);
        let one = g.scalar(1.0);
        let d = g.op("Add", &[&sq, &one], vec![]);
        g.op("Div", &[&x, &d], vec![])
    });
}

#[test]
fn sum_variadic_broadcast() {
    linear(|g| {
        let x = g.x();
        let p = g.op("GlobalAveragePool", &[&x], vec![]);
        let k = g.rand(&[7], 1.0);
        g.op("Sum", &[&x, &p, &k, &x], vec![])
    });
}

#[test]
fn expand() {
    linear(|g| {
        let x = g.x();
        let p = g.op("GlobalAveragePool", &[&x], vec![]);
        let shape = g.ints(&[1, 2, 3, 4]);
        g.op("Expand", &[&p, &shape], vec![])
    });
}

// ---------------------------------------------------------------- linear algebra

#[test]
fn gemm_classifier_trans_b() {
    linear(|g| {
        let x = g.x();
        let f = g.op("Flatten", &[&x], vec![a_i("axis", 1)]);
        let w = g.rand(&[5, 98], 0.3);
        let b = g.rand(&[5], 0.3);
        g.op("Gemm", &[&f, &w, &b], vec![a_i("transB", 1), a_f("alpha", 0.7), a_f("beta", 0.3)])
    });
}

#[test]
fn gemm_no_trans_no_bias() {
    linear(|g| {
        let x = g.x();
        let f = g.op("Flatten", &[&x], vec![a_i("axis", 1)]);
        let w = g.rand(&[98, 4], 0.3);
        g.op("Gemm", &[&f, &w], vec![])
    });
}

#[test]
fn matmul_2d() {
    linear(|g| {
        let x = g.x();
        let f = g.op("Flatten", &[&x], vec![a_i("axis", 1)]);
        let w = g.rand(&[98, 3], 0.3);
        g.op("MatMul", &[&f, &w], vec![])
    });
}

#[test]
fn matmul_batched_broadcast_weight() {
    linear(|g| {
        let x = g.x();
        let w = g.rand(&[7, 3], 0.3);
        g.op("MatMul", &[&x, &w], vec![])
    });
}

#[test]
fn matmul_two_activations() {
    check(&DIMS, uniform(&mut rng(4), &DIMS, -1.0, 1.0), 1e-2, SMOOTH, |g| {
        let x = g.x();
        let t = g.op("Transpose", &[&x], vec![a_is("perm", &[0, 1, 3, 2])]);
        g.op("MatMul", &[&x, &t], vec![])
    });
}

// ---------------------------------------------------------------- data movement

#[test]
fn reshape_with_copied_batch_dim() {
    linear(|g| {
        let x = g.x();
        let s = g.ints(&[0, 14, 7]);
        let r = g.op("Reshape", &[&x, &s], vec![]);
        let w = g.rand(&[7, 2], 0.5);
        g.op("MatMul", &[&r, &w], vec![])
    });
}

#[test]
fn squeeze_unsqueeze() {
    linear(|g| {
        let x = g.x();
        let a = g.ints(&[2]);
        let u = g.op("Unsqueeze", &[&x, &a], vec![]);
        let k = g.rand(&[1, 2, 1, 7, 7], 1.0);
        let m = g.op("Mul", &[&u, &k], vec![]);
        g.op("Squeeze", &[&m, &a], vec![])
    });
}

#[test]
fn transpose_nhwc() {
    linear(|g| {
        let x = g.x();
        let t = g.op("Transpose", &[&x], vec![a_is("perm", &[0, 2, 3, 1])]);
        let w = g.rand(&[2, 3], 0.5);
        g.op("MatMul", &[&t, &w], vec![])
    });
}

#[test]
fn concat_channels_fire_module() {
    linear(|g| {
        let x = g.x();
        let a = conv(g, &x, 2, 2, 1, vec![], 1);
        let b = conv(g, &x, 2, 3, 3, vec![a_is("pads", &[1, 1, 1, 1])], 1);
        let k = g.rand(&[1, 2, 7, 7], 1.0);
        let c = g.op("Mul", &[&x, &k], vec![]);
        g.op("Concat", &[&a, &c, &b], vec![a_i("axis", -3)])
    });
}

#[test]
fn split_with_unused_output() {
    check_dims(&[2, 3, 5, 5], |g| {
        let x = g.x();
        let s = g.ints(&[1, 2]);
        let parts = g.op_n("Split", &[&x, &s], vec![a_i("axis", 1)], 2);
        let k = g.rand(&[1, 2, 5, 5], 1.0);
        g.op("Mul", &[&parts[1], &k], vec![])
    });
}

#[test]
fn split_both_outputs_used() {
    check_dims(&[2, 4, 5, 5], |g| {
        let x = g.x();
        let parts = g.op_n("Split", &[&x], vec![a_i("axis", -1)], 1);
        let parts2 = g.op_n("Split", &[&parts[0]], vec![a_i("axis", 1)], 2);
        let k = g.rand(&[1, 2, 5, 5], 1.0);
        let m = g.op("Mul", &[&parts2[0], &k], vec![]);
        g.op("Add", &[&m, &parts2[1]], vec![])
    });
}

#[test]
fn slice_channels_and_spatial() {
    check_dims(&[2, 4, 6, 6], |g| {
        let x = g.x();
        let (st, en, ax) = (g.ints(&[1, 1, -5]), g.ints(&[3, -1, 1000]), g.ints(&[1, 2, 3]));
        g.op("Slice", &[&x, &st, &en, &ax], vec![])
    });
}

#[test]
fn slice_with_steps_swin_patch_merging() {
    // Swin's patch merging: x[:, :, 0::2, 1::2] and x[:, :, 1::2, 0::2] on odd (7) and even (6) extents, the
    // second with ends past the extent; concatenated so both reach the logits.
    for d in [7usize, 6] {
        check_dims(&[2, 2, d, d], |g| {
            let x = g.x();
            let (st, en, ax, sp) = (g.ints(&[0, 1]), g.ints(&[i64::MAX, i64::MAX]), g.ints(&[2, 3]), g.ints(&[2, 2]));
            let a = g.op("Slice", &[&x, &st, &en, &ax, &sp], vec![]);
            let (st, en) = (g.ints(&[1, 0]), g.ints(&[100, 100]));
            let b = g.op("Slice", &[&x, &st, &en, &ax, &sp], vec![]);
            let fa = g.op("Flatten", &[&a], vec![a_i("axis", 1)]);
            let fb = g.op("Flatten", &[&b], vec![a_i("axis", 1)]);
            g.op("Concat", &[&fa, &fb], vec![a_i("axis", 1)])
        });
    }
}

#[test]
fn slice_with_negative_and_mixed_steps() {
    // Channels reversed (step -1 to INT64_MIN), rows from -2 down to 1 by -3 (indices 5, 2), columns 1..6 by 1
    // (a Pad), all in one node; then every third column from -6 (a step of 3 with a negative start).
    check_dims(&[2, 3, 7, 7], |g| {
        let x = g.x();
        let (st, en, ax, sp) = (g.ints(&[-1, -2, 1]), g.ints(&[i64::MIN, 0, 6]), g.ints(&[1, -2, 3]), g.ints(&[-1, -3, 1]));
        let a = g.op("Slice", &[&x, &st, &en, &ax, &sp], vec![]);
        let (st, en, ax, sp) = (g.ints(&[-6]), g.ints(&[7]), g.ints(&[3]), g.ints(&[3]));
        let b = g.op("Slice", &[&x, &st, &en, &ax, &sp], vec![]);
        let fa = g.op("Flatten", &[&a], vec![a_i("axis", 1)]);
        let fb = g.op("Flatten", &[&b], vec![a_i("axis", 1)]);
        g.op("Concat", &[&fa, &fb], vec![a_i("axis", 1)])
    });
}

#[test]
fn slice_with_steps_along_the_batch_axis_is_refused() {
    // With a probe batch of 1, x[0::2] keeps the one item, yet it drops every other item of a served batch.
    let mut g = G::new(&dims_i64(&DIMS), 11);
    let x = g.x();
    let (st, en, ax, sp) = (g.ints(&[0]), g.ints(&[i64::MAX]), g.ints(&[0]), g.ints(&[2]));
    let y = g.op("Slice", &[&x, &st, &en, &ax, &sp], vec![]);
    let model = g.finish(&y);
    let err = match camserve::backend::probe::analyse(model, &Default::default()) {
        Err(e) => e.to_string(),
        Ok(ex) => ex
            .build(&camserve::onnx::rewrite::ExplainPlan::new("x_id", [camserve::onnx::rules::ReluRule::Plain]))
            .expect_err("a strided slice of the batch must be refused")
            .to_string(),
    };
    assert!(err.contains("batch axis"), "{err}");
}

#[test]
fn pad_constant() {
    linear(|g| {
        let x = g.x();
        let p = g.ints(&[0, 0, 1, 2, 0, 1, 0, 3]);
        let v = g.scalar(0.5);
        g.op("Pad", &[&x, &p, &v], vec![a_s("mode", "constant")])
    });
}

#[test]
fn identity_dropout_cast() {
    linear(|g| {
        let x = g.x();
        let d = g.op("Dropout", &[&x], vec![]);
        let c = g.op("Cast", &[&d], vec![a_i("to", 1)]);
        g.op("Identity", &[&c], vec![])
    });
}
