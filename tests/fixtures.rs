//! camserve's explain graphs against PyTorch autograd on the same weights and inputs.
//!
//! `tests/fixtures/make_fixtures.py` builds small versions of ResNet (basic and bottleneck), VGG-BN, SqueezeNet,
//! MobileNetV2, MobileNetV3, DenseNet and an EfficientNet-style net, exports each at opsets 13 and 17, and stores
//! PyTorch's logits, activations and gradients at the default layer and the plain, guided and deconvnet input
//! gradients for a batch of 2 with different targets. Every output must match at max|a-b|/max|b| <= 1e-4.

mod common;

use std::path::PathBuf;

use camserve::onnx::contract;
use camserve::onnx::io;
use camserve::onnx::rewrite::{ExplainPlan, PrepareOptions};
use camserve::onnx::rules::ReluRule;
use common::*;
use ndarray::ArrayD;
use ndarray_npy::NpzReader;
use ort::session::builder::GraphOptimizationLevel;

const TOLERANCE: f64 = 1e-4;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn check(arch: &str, opset: i64) {
    let dir = fixtures();
    let mut npz = NpzReader::new(std::fs::File::open(dir.join(format!("{arch}.npz"))).unwrap()).unwrap();
    let mut get = |n: &str| -> ArrayD<f32> { npz.by_name(n).unwrap_or_else(|e| panic!("{arch}.npz: {n}: {e}")) };
    let x = get("x");
    let seed = get("seed");
    let expected = [
        ("logits", get("logits")),
        (contract::ACTIVATIONS, get("activations")),
        (contract::GRADIENTS, get("gradients")),
        ("camserve.input_grad.plain", get("input_grad_plain")),
        ("camserve.input_grad.guided", get("input_grad_guided")),
        ("camserve.input_grad.deconvnet", get("input_grad_deconvnet")),
    ];
    let model = io::load_model(&dir.join(format!("{arch}_op{opset}.onnx"))).unwrap();
    let ex = camserve::backend::probe::analyse(model, &PrepareOptions::default()).unwrap();
    assert!(ex.unsupported.is_empty(), "{arch}: unsupported ops {:?}", ex.unsupported);
    let layer = ex.default_layer.clone().expect("a default layer");
    let plan = ExplainPlan::new(layer.clone(), [ReluRule::Plain, ReluRule::Guided, ReluRule::Deconvnet]);
    let explain = ex.build(&plan).unwrap();
    let names: Vec<&str> = expected.iter().map(|(n, _)| *n).collect();
    for level in [GraphOptimizationLevel::All, GraphOptimizationLevel::Disable] {
        let mut s = session(&explain, level);
        let out = run(&mut s, vec![("input", x.clone()), (contract::SEED, seed.clone())], &names);
        for ((name, want), got) in expected.iter().zip(&out) {
            assert_eq!(got.shape(), want.shape(), "{arch} opset {opset}: {name} shape (layer {layer})");
            let err = rel_err(got, want);
            eprintln!("{arch} opset {opset} {level:?}: {name}: {err:.2e}");
            assert!(err <= TOLERANCE, "{arch} opset {opset} ({level:?}): {name} differs from PyTorch by {err:.2e}");
        }
    }
    // A plan with one modified rule builds the exact layer chain separately: same gradients.
    let guided_only = ex.build(&ExplainPlan::new(layer, [ReluRule::Guided])).unwrap();
    let mut s = session(&guided_only, GraphOptimizationLevel::All);
    let out = run(&mut s, vec![("input", x.clone()), (contract::SEED, seed.clone())], &[contract::GRADIENTS, "camserve.input_grad.guided"]);
    assert!(rel_err(&out[0], &expected[2].1) <= TOLERANCE, "{arch}: layer chain gradients");
    assert!(rel_err(&out[1], &expected[4].1) <= TOLERANCE, "{arch}: guided chain alone");
}

macro_rules! fixture_tests {
    ($($name:ident: $arch:literal,)*) => {
        mod opset13 { use super::check; $( #[test] fn $name() { check($arch, 13); } )* }
        mod opset17 { use super::check; $( #[test] fn $name() { check($arch, 17); } )* }
    };
}

fixture_tests! {
    resnet_basic: "resnet_basic",
    resnet_bottleneck: "resnet_bottleneck",
    vgg_bn: "vgg_bn",
    squeezenet: "squeezenet",
    mobilenet_v2: "mobilenet_v2",
    mobilenet_v3: "mobilenet_v3",
    densenet: "densenet",
    efficientnet: "efficientnet",
}
