//! camserve's explain graphs on models written by converters other than PyTorch's, against the source framework.
//!
//! `tests/fixtures/make_converter_fixtures.py` builds two small seeded CNNs and exports them with the converters
//! users run:
//!
//! - `keras_tf2onnx`: a Keras CNN on NHWC `[N, 32, 32, 3]` images (TF SAME padding with stride 2, ZeroPadding2D,
//!   `tf.pad` REFLECT and SYMMETRIC, BatchNormalization, DepthwiseConv2D, GlobalAveragePooling2D, Dense with
//!   softmax) exported by `tf2onnx.convert.from_keras` at opset 13, and `keras_tf2onnx_op17` at opset 17 (both
//!   share `keras_tf2onnx.npz`). camserve must detect the NHWC layout (and feed NCHW through its own Transpose)
//!   and strip the Softmax. tf2onnx writes SYMMETRIC padding as a constant Pad, a reflect Pad and two Compress
//!   ops whose masks come from ConstantOfShape + ScatterElements on the tensor's Shape; `keras_tf2onnx_reflect`
//!   is the same model with that pad written REFLECT (its own npz).
//! - `paddle` and `paddle_polygraphy`: a paddle.nn CNN (Conv2D, BatchNorm2D, ReLU, MaxPool2D, AdaptiveAvgPool2D,
//!   Linear, softmax) exported by paddle2onnx at opset 11 with a dynamic batch dim, without and with paddle2onnx's
//!   default Polygraphy constant folding; both share `paddle.npz`.
//!
//! `keras_tf2onnx` (opset 13) and `keras_tf2onnx_op17` carry tf2onnx's SYMMETRIC MirrorPad: a Compress along
//! H and W whose condition is built at run time with ScatterElements from the tensor's shape.
//!
//! Each `converters/<name>.npz` holds a batch of 2 images `x` (NCHW, what camserve's explain graph takes for NHWC
//! models too), one-hot `seed` rows for targets 3 and 7, and the framework's pre-softmax `logits` and
//! `input_grad_plain` = d(sum(seed * logits))/dx (NCHW), computed IN FLOAT64 (a float64 copy of each model:
//! `tf.GradientTape`, `paddle.grad`). The explain graph is float32, so the comparison is float32 against float64:
//! max|a-b|/max|b| <= 1e-4, the bound the other float64 fixtures use (the observed errors are ~1e-6 and below;
//! float32 rounding through a few convolutions, not a loose bound).

mod common;

use std::path::PathBuf;

use camserve::onnx::io;
use camserve::onnx::rewrite::{ExplainPlan, Explainable, InputLayout, PrepareOptions};
use camserve::onnx::rules::ReluRule;
use common::*;
use ndarray::ArrayD;
use ndarray_npy::NpzReader;
use ort::session::builder::GraphOptimizationLevel;

/// float32 camserve against float64 Keras / Paddle.
const TOLERANCE: f64 = 1e-4;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/converters")
}

/// max|a-b| / max|b|, in f64.
fn rel_err64(a: &ArrayD<f32>, b: &ArrayD<f64>) -> f64 {
    assert_eq!(a.shape(), b.shape(), "shapes differ");
    let d = a.iter().zip(b.iter()).fold(0f64, |m, (&x, &y)| m.max((x as f64 - y).abs()));
    d / b.iter().fold(0f64, |m, &y| m.max(y.abs())).max(1e-30)
}

fn analyse(onnx: &str) -> Explainable {
    let model = io::load_model(&dir().join(onnx)).unwrap_or_else(|e| panic!("loading {onnx}: {e}"));
    let ex = camserve::backend::probe::analyse(model, &PrepareOptions::default()).unwrap_or_else(|e| panic!("{onnx}: analyse: {e}"));
    let unsupported: Vec<String> = ex
        .unsupported
        .iter()
        .map(|u| format!("{} ({}){}", u.op, u.node, u.reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default()))
        .collect();
    assert!(unsupported.is_empty(), "{onnx}: unsupported ops: {unsupported:#?}");
    let refusals: Vec<String> = ex.refusals().iter().map(|u| format!("{} ({}): {:?}", u.op, u.node, u.reason)).collect();
    assert!(refusals.is_empty(), "{onnx}: refused: {refusals:#?}");
    assert_eq!(ex.input_dims, vec![1, 3, 32, 32], "{onnx}: input dims (NCHW)");
    assert_eq!(ex.stripped_output_op.as_deref(), Some("Softmax"), "{onnx}: the trailing Softmax is not stripped");
    ex
}

/// Builds the plain plan at the default layer and compares logits and the input gradient with the npz.
fn check(onnx: &str, npz: &str, ex: &Explainable) {
    let mut z = NpzReader::new(std::fs::File::open(dir().join(npz)).unwrap()).unwrap();
    let x: ArrayD<f32> = z.by_name("x").unwrap();
    let seed: ArrayD<f32> = z.by_name("seed").unwrap();
    let logits: ArrayD<f64> = z.by_name("logits").unwrap();
    let grad: ArrayD<f64> = z.by_name("input_grad_plain").unwrap();
    let layer = ex.default_layer.clone().unwrap_or_else(|| panic!("{onnx}: no default layer"));
    let explain = ex
        .build(&ExplainPlan::new(layer.clone(), [ReluRule::Plain]))
        .unwrap_or_else(|e| panic!("{onnx}: building the explain graph at `{layer}`: {e}"));
    let outputs = [ex.logits.as_str(), "camserve.input_grad.plain"];
    for level in [GraphOptimizationLevel::All, GraphOptimizationLevel::Disable] {
        let mut s = session(&explain, level);
        let out = run(&mut s, vec![(ex.input.as_str(), x.clone()), (camserve::onnx::contract::SEED, seed.clone())], &outputs);
        for ((what, want), got) in [("logits", &logits), ("input_grad_plain", &grad)].iter().zip(&out) {
            let err = rel_err64(got, want);
            eprintln!("{onnx} {level:?} (layer `{layer}`): {what}: {err:.2e}");
            assert!(err <= TOLERANCE, "{onnx} ({level:?}): {what} differs from the float64 reference by {err:.2e}");
        }
    }
}

/// tf2onnx's NHWC model: detected as NHWC, fed NCHW, Softmax stripped, gradients equal TF's (transposed).
#[test]
fn keras_tf2onnx() {
    let ex = analyse("keras_tf2onnx.onnx");
    assert_eq!(ex.input_layout, InputLayout::Nhwc, "tf2onnx's [N, 32, 32, 3] input is not detected as NHWC");
    check("keras_tf2onnx.onnx", "keras_tf2onnx.npz", &ex);
}

/// The same Keras model exported at opset 17, which camserve does not need to upgrade.
#[test]
fn keras_tf2onnx_op17() {
    let ex = analyse("keras_tf2onnx_op17.onnx");
    assert_eq!(ex.input_layout, InputLayout::Nhwc, "tf2onnx's [N, 32, 32, 3] input is not detected as NHWC");
    check("keras_tf2onnx_op17.onnx", "keras_tf2onnx.npz", &ex);
}

/// The Keras model with REFLECT in place of SYMMETRIC: everything else tf2onnx writes for it (NHWC input, SAME
/// pads folded into Conv, ZeroPadding2D folded into Conv's pads, reflect Pads, BatchNormalization as Mul/Add,
/// depthwise Conv, Softmax), at opset 13.
#[test]
fn keras_tf2onnx_reflect() {
    let ex = analyse("keras_tf2onnx_reflect.onnx");
    assert_eq!(ex.input_layout, InputLayout::Nhwc, "tf2onnx's [N, 32, 32, 3] input is not detected as NHWC");
    check("keras_tf2onnx_reflect.onnx", "keras_tf2onnx_reflect.npz", &ex);
}

/// paddle2onnx's output as it writes it (no constant folding).
#[test]
fn paddle() {
    let ex = analyse("paddle.onnx");
    assert_eq!(ex.input_layout, InputLayout::Nchw);
    check("paddle.onnx", "paddle.npz", &ex);
}

/// `paddle.onnx.export`'s default: paddle2onnx followed by Polygraphy's constant folding.
#[test]
fn paddle_polygraphy() {
    let ex = analyse("paddle_polygraphy.onnx");
    assert_eq!(ex.input_layout, InputLayout::Nchw);
    check("paddle_polygraphy.onnx", "paddle.npz", &ex);
}
