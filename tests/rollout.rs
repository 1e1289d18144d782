//! Attention rollout and gradient rollout against PyTorch.
//!
//! `tests/fixtures/make_rollout_fixtures.py` rebuilds the tiny ViT of `tests/fixtures/models/vit.onnx` (2 blocks,
//! 2 heads, class token + 4x4 grid: attention [N, 2, 17, 17]), runs it IN FLOAT64 with hooks on the attention
//! softmax for `vit.npz`'s batch (2 images, targets 3 and 7) and stores in `models/rollout_vit.npz` each block's
//! attention probabilities and their gradients d(sum(seed*logits))/dA, and both rollouts [N, 4, 4] as Chefer et
//! al.'s code computes them.
//!
//! Here camserve analyses `vit.onnx`, builds the attention plan (`ExplainPlan::with_attention`), runs it with ONNX
//! Runtime (all graph optimisations, then none) and computes the rollouts from the graph's outputs with
//! `camserve::maths::rollout`, one run for the batch, each row with its own target. The comparison is float32
//! camserve against float64 PyTorch: every array (attention, attention gradients, both maps) must match at
//! max|a-b|/max|b| <= 1e-4. The same holds for the three ways the exact chain can start (at the default layer
//! `blocks.1.norm1`, which lies after the first block's attention: the chain starts there; at an earlier layer that
//! has every block below it; at the input when the plan also asks for the plain input gradient), through the
//! engine (target selection on), and over HTTP (responses checked against openapi.yaml).

mod common;
#[path = "support/server.rs"]
mod server;

use std::path::PathBuf;

use camserve::backend::engine::{Batch, DeviceChoice, EngineOptions, ModelRunner, ModelSpec, PlanKey};
use camserve::maths::rollout::{self, TokenGrid};
use camserve::onnx::contract;
use camserve::onnx::io;
use camserve::onnx::rewrite::{ExplainPlan, Explainable, LayerLayout, PrepareOptions};
use camserve::onnx::rules::ReluRule;
use ndarray::{Array2, Array4, ArrayD, Axis, Ix2, Ix4};
use ndarray_npy::NpzReader;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::Tensor;
use serde_json::{json, Value};

/// float32 camserve against float64 PyTorch.
const TOLERANCE: f64 = 1e-4;
const GRID: TokenGrid = TokenGrid { prefix: 1, h: 4, w: 4 };

fn models_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models")
}

struct Fixture {
    x: ArrayD<f32>,
    seed: ArrayD<f32>,
    attention: Vec<(ArrayD<f64>, ArrayD<f64>)>,
    attention_rollout: ArrayD<f64>,
    gradient_rollout: ArrayD<f64>,
}

fn fixture() -> Fixture {
    let mut npz = NpzReader::new(std::fs::File::open(models_dir().join("rollout_vit.npz")).unwrap()).unwrap();
    let mut get = |n: &str| -> ArrayD<f64> { npz.by_name(n).unwrap_or_else(|e| panic!("rollout_vit.npz: {n}: {e}")) };
    let attention = (0..2).map(|i| (get(&format!("attention_{i}")), get(&format!("attention_grad_{i}")))).collect();
    let (attention_rollout, gradient_rollout) = (get("attention_rollout"), get("gradient_rollout"));
    let x: ArrayD<f32> = npz.by_name("x").unwrap();
    let seed: ArrayD<f32> = npz.by_name("seed").unwrap();
    Fixture { x, seed, attention, attention_rollout, gradient_rollout }
}

/// max|a-b| / max|b|, in f64.
fn rel_err(a: &ArrayD<f32>, b: &ArrayD<f64>) -> f64 {
    assert_eq!(a.shape(), b.shape(), "shapes differ");
    let d = a.iter().zip(b.iter()).fold(0f64, |m, (&x, &y)| m.max((x as f64 - y).abs()));
    d / b.iter().fold(0f64, |m, &y| m.max(y.abs())).max(1e-30)
}

fn analyse(name: &str) -> Explainable {
    let model = io::load_model(&models_dir().join(format!("{name}.onnx"))).unwrap();
    camserve::backend::probe::analyse(model, &PrepareOptions::default()).unwrap_or_else(|e| panic!("{name}: analyse: {e}"))
}

/// Both rollouts of every row from per-block `(attention, gradient)` arrays `[N, heads, T, T]`: `[N, h, w]` each.
fn rollouts(blocks: &[(Array4<f32>, Array4<f32>)]) -> (ArrayD<f32>, ArrayD<f32>) {
    let n = blocks[0].0.len_of(Axis(0));
    let (mut roll, mut grad_roll) = (vec![], vec![]);
    for row in 0..n {
        let views: Vec<_> = blocks.iter().map(|(a, g)| (a.index_axis(Axis(0), row), g.index_axis(Axis(0), row))).collect();
        let probs: Vec<_> = views.iter().map(|v| v.0.clone()).collect();
        roll.push(rollout::attention_rollout(&probs, GRID).unwrap());
        grad_roll.push(rollout::gradient_rollout(&views, GRID).unwrap());
    }
    let stack = |maps: Vec<Array2<f32>>| {
        let v: Vec<_> = maps.iter().map(|m| m.view()).collect();
        ndarray::stack(Axis(0), &v).unwrap().into_dyn()
    };
    (stack(roll), stack(grad_roll))
}

/// Compares blocks and maps with the fixture; returns the largest error.
fn compare(what: &str, blocks: &[(Array4<f32>, Array4<f32>)], f: &Fixture) -> f64 {
    assert_eq!(blocks.len(), f.attention.len(), "{what}: attention blocks");
    let mut worst = 0f64;
    let mut report = |name: String, err: f64| {
        eprintln!("{what}: {name}: {err:.2e}");
        assert!(err <= TOLERANCE, "{what}: {name} differs from PyTorch (float64) by {err:.2e}");
        worst = worst.max(err);
    };
    for (i, ((a, g), (wa, wg))) in blocks.iter().zip(&f.attention).enumerate() {
        report(format!("attention.{i}"), rel_err(&a.clone().into_dyn(), wa));
        report(format!("attention_grad.{i}"), rel_err(&g.clone().into_dyn(), wg));
    }
    let (roll, grad_roll) = rollouts(blocks);
    report("attention_rollout".into(), rel_err(&roll, &f.attention_rollout));
    report("gradient_rollout".into(), rel_err(&grad_roll, &f.gradient_rollout));
    worst
}

fn run_plan(ex: &Explainable, plan: &ExplainPlan, f: &Fixture, level: GraphOptimizationLevel) -> Vec<(Array4<f32>, Array4<f32>)> {
    let model = ex.build(plan).unwrap_or_else(|e| panic!("building {plan:?}: {e}"));
    let outputs: Vec<String> = model.graph.as_ref().unwrap().output.iter().map(|o| o.name().to_string()).collect();
    for i in 0..2 {
        assert!(outputs.contains(&contract::attention_name(i)) && outputs.contains(&contract::attention_grad_name(i)), "{outputs:?}");
    }
    let mut s = common::session(&model, level);
    let inputs: Vec<(String, ort::value::DynValue)> = vec![
        (ex.input.clone(), Tensor::from_array(f.x.clone()).unwrap().into_dyn()),
        (contract::SEED.into(), Tensor::from_array(f.seed.clone()).unwrap().into_dyn()),
    ];
    let out = s.run(inputs).expect("ONNX Runtime run failed");
    let get = |n: String| out[n.as_str()].try_extract_array::<f32>().unwrap().to_owned().into_dimensionality::<Ix4>().unwrap();
    (0..2).map(|i| (get(contract::attention_name(i)), get(contract::attention_grad_name(i)))).collect()
}

#[test]
fn vit_attention_is_found() {
    let ex = analyse("vit");
    let a = ex.attention.clone().expect("vit has attention");
    assert_eq!(a.outputs.len(), 2, "{a:?}");
    assert_eq!((a.heads.clone(), a.tokens, a.prefix, a.grid), (vec![2, 2], 17, 1, (4, 4)));
    // DeiT: class + distillation token, the grid after both.
    let deit = analyse("deit_dist").attention.expect("deit_dist has attention");
    assert_eq!((deit.outputs.len(), deit.tokens, deit.prefix, deit.grid), (2, 18, 2, (4, 4)));
    // Swin's windowed attention ([windows * N, heads, 9, 9]) is not attention over the token grid.
    let swin = analyse("swin");
    assert_eq!(swin.attention, None);
    let err = swin.build(&ExplainPlan::new(swin.default_layer.clone().unwrap(), []).with_attention()).unwrap_err();
    assert!(err.to_string().contains("no attention blocks"), "{err}");
}

#[test]
fn vit_rollouts_match_pytorch() {
    let f = fixture();
    let ex = analyse("vit");
    let default = ex.default_layer.clone().unwrap();
    assert_eq!(default, "/blocks/blocks.1/norm1/LayerNormalization_output_0");
    // A token layer before the first block's attention: every block lies below it.
    let early = ex.layers.iter().find(|l| matches!(l.layout, LayerLayout::Tokens { .. })).unwrap().name.clone();
    let plans = [
        ("default layer", ExplainPlan::new(default.clone(), []).with_attention()),
        ("early layer", ExplainPlan::new(early, []).with_attention()),
        ("with the plain input gradient", ExplainPlan::new(default.clone(), [ReluRule::Plain, ReluRule::Guided]).with_attention()),
    ];
    let mut worst = 0f64;
    for (what, plan) in &plans {
        for level in [GraphOptimizationLevel::All, GraphOptimizationLevel::Disable] {
            let blocks = run_plan(&ex, plan, &f, level);
            worst = worst.max(compare(&format!("{what} ({level:?})"), &blocks, &f));
        }
    }
    eprintln!("largest error against PyTorch (float64): {worst:.2e}");
    // Without the flag there are no attention outputs.
    let plain = ex.build(&ExplainPlan::new(default, [])).unwrap();
    assert!(!plain.graph.unwrap().output.iter().any(|o| o.name().starts_with(contract::ATTENTION_PREFIX)));
}

#[test]
fn vit_rollouts_through_the_engine() {
    let f = fixture();
    let spec = ModelSpec::new("vit", models_dir().join("vit.onnx"), [0.5; 3], [0.25; 3]);
    let mut r = ModelRunner::load(&spec, &EngineOptions { device: DeviceChoice::Cpu, ..Default::default() }).unwrap();
    assert!(r.info().attention.is_some());
    let plan = ExplainPlan::new(r.info().default_layer.clone(), []).with_attention().with_target_selection();
    let batch = Batch {
        images: f.x.clone().into_dimensionality::<Ix4>().unwrap(),
        seeds: f.seed.clone().into_dimensionality::<Ix2>().unwrap(),
        ranks: ndarray::Array1::from_elem(2, -1),
    };
    let out = r.run(&PlanKey::Explain(plan), &batch).unwrap();
    assert_eq!(out.targets.as_deref(), Some(&[3, 7][..]));
    compare("engine", &out.attention, &f);
    // Row slicing keeps each row's blocks.
    let second = out.rows(1..2);
    assert_eq!(second.attention[1].1, out.attention[1].1.slice(ndarray::s![1..2, .., .., ..]));
}

async fn json_of(r: reqwest::Response, path: &str) -> (u16, Value) {
    let status = r.status().as_u16();
    let ct = r.headers().get("content-type").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    let body: Value = r.json().await.unwrap();
    server::check_response(path, "post", status, &ct, &body);
    (status, body)
}

/// Over HTTP: listed for the ViT only, one run for both rollouts and Grad-CAM, maps on the 4x4 grid; a model
/// without attention answers 422 naming it.
#[tokio::test]
async fn rollouts_over_http() {
    use server::*;
    let mut s = Server::start(demo_and_vit_config()).await;
    let models: Value = s.client.get(s.url("/v1/models")).send().await.unwrap().json().await.unwrap();
    let methods = |name: &str| -> Vec<String> {
        let m = models["models"].as_array().unwrap().iter().find(|m| m["name"] == name).unwrap();
        m["methods"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect()
    };
    assert!(methods("vit").iter().any(|m| m == "attention_rollout") && methods("vit").iter().any(|m| m == "gradient_rollout"));
    assert!(!methods("demo").iter().any(|m| m.ends_with("_rollout")));
    let img = image_bytes("008.jpg");
    let url = s.url("/v1/models/vit/explain?methods=attention_rollout,gradient_rollout,gradcam&outputs=raw,heatmap,overlay,mask&top_k=2");
    let (st, b) = json_of(s.client.post(url).header("content-type", "image/jpeg").body(img.clone()).send().await.unwrap(), "/v1/models/{model}/explain").await;
    assert_eq!(st, 200, "{b}");
    let ex = b["explanations"].as_array().unwrap();
    assert_eq!(ex.len(), 6);
    for e in ex {
        assert_eq!(e["raw"]["shape"], json!([4, 4]), "{}", e["method"]);
        if e["method"].as_str().unwrap().ends_with("_rollout") {
            assert!(e.get("layer").is_none(), "rollouts read no layer");
        }
    }
    let (st, b) = json_of(
        s.client.post(s.url("/v1/models/demo/explain?methods=gradient_rollout")).header("content-type", "image/jpeg").body(img).send().await.unwrap(),
        "/v1/models/{model}/explain",
    )
    .await;
    assert_eq!(st, 422, "{b}");
    let detail = b["detail"].as_str().unwrap();
    assert!(detail.contains("gradient_rollout") && detail.contains("attention"), "{detail}");
    s.stop().await.unwrap();
}
