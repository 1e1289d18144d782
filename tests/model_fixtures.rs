//! camserve's explain graphs on transformer-era and BatchNorm-free models against PyTorch autograd.
//!
//! `tests/fixtures/make_model_fixtures.py` builds small versions of a ViT (square and non-square grid), a DeiT
//! with a distillation token, a Swin transformer (shifted windows, relative-position bias), a ConvNeXt exported by
//! the dynamo exporter (opset 20, weights in a `.onnx.data` file), a GroupNorm CNN, an FPN/HRNet-style net with
//! nearest and bilinear `F.interpolate`, and the ViT again exported by dynamo with every tensor in external data.
//! Each `tests/fixtures/models/<name>.json` names the ONNX file, the target layer's tensor (found in the exported
//! graph from the PyTorch module path, e.g. `blocks.1.norm1`), its grid and prefix tokens; `<name>.npz` holds a
//! batch of 2 images with targets 3 and 7 and PyTorch's results, computed IN FLOAT64 (model.double()).
//!
//! For each fixture the test loads the model (external data included), analyses it, builds the plain plan at the
//! JSON's layer, runs it with ONNX Runtime (all graph optimisations, then none) and compares the logits, the
//! layer's activations and gradients on its grid `[N, C, h, w]` (token layers `[N, T, C]` drop their prefix
//! tokens and read the rest row by row; NHWC layers are transposed; the npz's `*_grid` arrays) and the plain input
//! gradient. The comparison is float32 camserve against float64 PyTorch: every output must match at
//! max|a-b|/max|b| <= 1e-4. Where the npz has `gradcam_grid` (ViT, Swin), Grad-CAM computed from camserve's grid
//! outputs must match it too, which checks the token-to-grid mapping the way pytorch-grad-cam's
//! `reshape_transform` defines it. A second test per fixture checks that the module path names the same layer.

mod common;

use std::path::{Path, PathBuf};

use camserve::onnx::contract;
use camserve::onnx::io;
use camserve::onnx::rewrite::{ExplainPlan, Explainable, PrepareOptions};
use camserve::onnx::rules::ReluRule;
use common::*;
use ndarray::{ArrayD, Axis, Ix4};
use ndarray_npy::NpzReader;
use ort::session::builder::GraphOptimizationLevel;

/// float32 camserve against float64 PyTorch.
const TOLERANCE: f64 = 1e-4;

fn models_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models")
}

/// The sidecar `<name>.json`.
struct Meta {
    onnx: String,
    layer: String,
    module: String,
}

fn meta(dir: &Path, name: &str) -> Meta {
    let text = std::fs::read_to_string(dir.join(format!("{name}.json"))).unwrap_or_else(|e| panic!("{name}.json: {e}"));
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}.json: {e}"));
    let field = |k: &str| v[k].as_str().unwrap_or_else(|| panic!("{name}.json: no string `{k}`")).to_string();
    Meta { onnx: field("onnx"), layer: field("layer"), module: field("module") }
}

/// max|a-b| / max|b|, in f64.
fn rel_err64(a: &ArrayD<f32>, b: &ArrayD<f64>) -> f64 {
    assert_eq!(a.shape(), b.shape(), "shapes differ");
    let d = a.iter().zip(b.iter()).fold(0f64, |m, (&x, &y)| m.max((x as f64 - y).abs()));
    d / b.iter().fold(0f64, |m, &y| m.max(y.abs())).max(1e-30)
}

/// relu(sum_c mean_hw(dA) * A) for grid arrays `[N, C, h, w]`: `[N, h, w]`.
fn gradcam_grid(a: &ArrayD<f64>, g: &ArrayD<f64>) -> ArrayD<f64> {
    let a = a.view().into_dimensionality::<Ix4>().expect("4-D activations");
    let g = g.view().into_dimensionality::<Ix4>().expect("4-D gradients");
    let (n, c, h, w) = a.dim();
    let mut cam = ndarray::Array3::<f64>::zeros((n, h, w));
    for i in 0..n {
        for k in 0..c {
            let weight = g.index_axis(Axis(0), i).index_axis(Axis(0), k).mean().unwrap_or(0.0);
            let mut out = cam.index_axis_mut(Axis(0), i);
            out.scaled_add(weight, &a.index_axis(Axis(0), i).index_axis(Axis(0), k));
        }
    }
    cam.mapv_inplace(|v| v.max(0.0));
    cam.into_dyn()
}

fn analyse(name: &str) -> (Meta, Explainable) {
    let dir = models_dir();
    let m = meta(&dir, name);
    let model = io::load_model(&dir.join(&m.onnx)).unwrap_or_else(|e| panic!("{name}: loading {}: {e}", m.onnx));
    let ex = camserve::backend::probe::analyse(model, &PrepareOptions::default()).unwrap_or_else(|e| panic!("{name}: analyse: {e}"));
    (m, ex)
}

fn check(name: &str) {
    let dir = models_dir();
    let mut npz = NpzReader::new(std::fs::File::open(dir.join(format!("{name}.npz"))).unwrap()).unwrap();
    let names = npz.names().unwrap();
    let x: ArrayD<f32> = npz.by_name("x").unwrap();
    let seed: ArrayD<f32> = npz.by_name("seed").unwrap();
    let mut get = |n: &str| -> ArrayD<f64> { npz.by_name(n).unwrap_or_else(|e| panic!("{name}.npz: {n}: {e}")) };
    let has = |n: &str| names.iter().any(|k| k == n || k == &format!("{n}.npy"));
    let grid = |n: &str| if has(&format!("{n}_grid")) { format!("{n}_grid") } else { n.to_string() };
    let expected = [
        ("logits", get("logits")),
        (contract::ACTIVATIONS, get(&grid("activations"))),
        (contract::GRADIENTS, get(&grid("gradients"))),
        ("camserve.input_grad.plain", get("input_grad_plain")),
    ];
    let cam_want = has("gradcam_grid").then(|| get("gradcam_grid"));

    let (m, ex) = analyse(name);
    let unsupported: Vec<String> = ex
        .unsupported
        .iter()
        .map(|u| format!("{} ({}){}", u.op, u.node, u.reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default()))
        .collect();
    assert!(unsupported.is_empty(), "{name}: unsupported ops: {unsupported:#?}");
    let info = ex.layer(&m.layer).unwrap_or_else(|| {
        let cands: Vec<String> = ex.layers.iter().map(|l| format!("{} {:?}", l.name, l.native_dims)).collect();
        panic!("{name}: `{}` is not a candidate layer; the {} candidates: {cands:#?}", m.layer, cands.len())
    });
    assert_eq!(info.name, m.layer, "{name}: the layer lookup found another tensor");
    let explain = ex
        .build(&ExplainPlan::new(m.layer.clone(), [ReluRule::Plain]))
        .unwrap_or_else(|e| panic!("{name}: building the explain graph at `{}`: {e}", m.layer));
    let outputs: Vec<&str> = [ex.logits.as_str()].into_iter().chain(expected[1..].iter().map(|(n, _)| *n)).collect();
    for level in [GraphOptimizationLevel::All, GraphOptimizationLevel::Disable] {
        let mut s = session(&explain, level);
        let out = run(&mut s, vec![(ex.input.as_str(), x.clone()), (contract::SEED, seed.clone())], &outputs);
        for ((what, want), got) in expected.iter().zip(&out) {
            assert_eq!(got.shape(), want.shape(), "{name} ({level:?}): {what} shape (layer {})", m.layer);
            let err = rel_err64(got, want);
            eprintln!("{name} {level:?}: {what}: {err:.2e}");
            assert!(err <= TOLERANCE, "{name} ({level:?}): {what} differs from PyTorch (float64) by {err:.2e}");
        }
        if let Some(want) = &cam_want {
            let (a, g) = (out[1].mapv(f64::from), out[2].mapv(f64::from));
            let cam = gradcam_grid(&a, &g);
            // Relative to the map's maximum: the ReLU zeroes whole cells, so an elementwise ratio is meaningless.
            let err = cam.iter().zip(want.iter()).fold(0f64, |m, (a, b)| m.max((a - b).abs()))
                / want.iter().fold(0f64, |m, b| m.max(b.abs())).max(1e-30);
            eprintln!("{name} {level:?}: gradcam_grid: {err:.2e}");
            assert!(err <= TOLERANCE, "{name} ({level:?}): Grad-CAM on camserve's grid differs by {err:.2e}");
        }
    }
}

/// The PyTorch module path (`blocks.1.norm1`) names the same layer as its tensor name.
fn check_module_path(name: &str) {
    let (m, ex) = analyse(name);
    let found = ex.layer(&m.module).map(|l| l.name.clone());
    assert_eq!(found.as_deref(), Some(m.layer.as_str()), "{name}: module `{}` names another layer", m.module);
}

macro_rules! fixture_tests {
    ($($name:ident,)*) => {
        mod numeric { use super::check; $( #[test] fn $name() { check(stringify!($name)); } )* }
        mod module_path { use super::check_module_path; $( #[test] fn $name() { check_module_path(stringify!($name)); } )* }
    };
}

fixture_tests! {
    vit,
    vit_rect,
    deit_dist,
    swin,
    convnext_dynamo,
    groupnorm,
    fpn,
    vit_dynamo_ext,
}
