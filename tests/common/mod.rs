//! Test helpers: small ONNX graphs built in Rust, ONNX Runtime sessions, and the finite-difference check.
#![allow(dead_code)]

use camserve::onnx::proto::{
    tensor_shape_proto, type_proto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorShapeProto,
    TypeProto, ValueInfoProto,
};
use camserve::onnx::proto::AttributeProto;
use camserve::onnx::rewrite::{ExplainPlan, PrepareOptions};
use camserve::onnx::rules::ReluRule;
use camserve::onnx::{attr, contract, io, tensor};
use ndarray::{ArrayD, IxDyn};
use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

pub fn a_i(name: &str, v: i64) -> AttributeProto {
    attr::make_int(name, v)
}
pub fn a_is(name: &str, v: &[i64]) -> AttributeProto {
    attr::make_ints(name, v)
}
pub fn a_f(name: &str, v: f32) -> AttributeProto {
    attr::make_float(name, v)
}
pub fn a_s(name: &str, v: &str) -> AttributeProto {
    attr::make_string(name, v)
}

/// A small graph under construction. The image input is `x` with shape `[N, C, H, W]` (N dynamic), and
/// the first node is `Identity(x) -> x_id`, a 4-D layer the explain graph can target.
pub struct G {
    pub nodes: Vec<NodeProto>,
    pub inits: Vec<camserve::onnx::TensorProto>,
    pub rng: ChaCha8Rng,
    pub opset: i64,
    n: usize,
    input_dims: Vec<i64>,
}

impl G {
    pub fn new(input_dims: &[i64], seed: u64) -> G {
        let mut g = G { nodes: vec![], inits: vec![], rng: rng(seed), opset: 17, n: 0, input_dims: input_dims.to_vec() };
        g.nodes.push(node("Identity", &["x"], &["x_id"], vec![]));
        g
    }

    pub fn x(&self) -> String {
        "x_id".into()
    }

    pub fn init(&mut self, dims: &[i64], data: Vec<f32>) -> String {
        self.n += 1;
        let name = format!("w{}", self.n);
        self.inits.push(tensor::f32_tensor(&name, dims, &data));
        name
    }

    /// A weight with values uniform in [-scale, scale].
    pub fn rand(&mut self, dims: &[i64], scale: f32) -> String {
        let n = tensor::numel(dims);
        let data = (0..n).map(|_| self.rng.random_range(-scale..scale)).collect();
        self.init(dims, data)
    }

    pub fn ints(&mut self, v: &[i64]) -> String {
        self.n += 1;
        let name = format!("c{}", self.n);
        self.inits.push(tensor::i64_tensor(&name, &[v.len() as i64], v));
        name
    }

    /// An int64 initializer of `n` zeros (RoiAlign's batch indices).
    pub fn int64_zeros(&mut self, n: usize) -> String {
        self.n += 1;
        let name = format!("z{}", self.n);
        self.inits.push(tensor::i64_tensor(&name, &[n as i64], &vec![0; n]));
        name
    }

    pub fn scalar(&mut self, v: f32) -> String {
        self.init(&[], vec![v])
    }

    pub fn op(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>) -> String {
        self.n += 1;
        let out = format!("t{}_{}", self.n, op);
        self.nodes.push(node(op, inputs, &[&out], attrs));
        out
    }

    pub fn op_n(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>, n: usize) -> Vec<String> {
        self.n += 1;
        let outs: Vec<String> = (0..n).map(|i| format!("t{}_{}_{i}", self.n, op)).collect();
        let refs: Vec<&str> = outs.iter().map(|s| s.as_str()).collect();
        self.nodes.push(node(op, inputs, &refs, attrs));
        outs
    }

    /// Flattens `y` to `[N, D]` and makes it the model's output `logits`.
    pub fn finish(mut self, y: &str) -> ModelProto {
        self.nodes.push(node("Flatten", &[y], &["logits"], vec![a_i("axis", 1)]));
        let mut dims: Vec<Option<i64>> = self.input_dims.iter().map(|&d| Some(d)).collect();
        dims[0] = None;
        ModelProto {
            ir_version: Some(8),
            opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(self.opset) }],
            producer_name: Some("camserve-tests".into()),
            graph: Some(GraphProto {
                name: Some("test".into()),
                node: self.nodes,
                initializer: self.inits,
                input: vec![value_info("x", &dims)],
                output: vec![value_info("logits", &[None, None])],
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

pub fn node(op: &str, inputs: &[&str], outputs: &[&str], attrs: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        name: Some(format!("{op}:{}", outputs.first().copied().unwrap_or(""))),
        op_type: Some(op.into()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        attribute: attrs,
        ..Default::default()
    }
}

pub fn value_info(name: &str, dims: &[Option<i64>]) -> ValueInfoProto {
    use tensor_shape_proto::{dimension::Value, Dimension};
    let dim = dims
        .iter()
        .enumerate()
        .map(|(i, d)| Dimension {
            value: Some(match d {
                Some(v) => Value::DimValue(*v),
                None => Value::DimParam(format!("d{i}")),
            }),
            ..Default::default()
        })
        .collect();
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(tensor::FLOAT),
                shape: Some(TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn session(model: &ModelProto, level: GraphOptimizationLevel) -> Session {
    let env = camserve::backend::runtime::environment(None).expect("ONNX Runtime library (run scripts/fetch-ort.sh)");
    let bytes = io::encode_model(model).expect("encode");
    Session::builder(env)
        .expect("builder")
        .with_optimization_level(level)
        .unwrap_or_else(|e| e.recover())
        .with_intra_threads(1)
        .unwrap_or_else(|e| e.recover())
        .commit_from_memory(&bytes)
        .expect("ONNX Runtime rejected the model")
}

/// Runs a session on named f32 inputs and returns the named outputs.
pub fn run(session: &mut Session, inputs: Vec<(&str, ArrayD<f32>)>, outputs: &[&str]) -> Vec<ArrayD<f32>> {
    let vals: Vec<(String, ort::value::DynValue)> = inputs
        .into_iter()
        .map(|(n, a)| (n.to_string(), Tensor::from_array(a).expect("tensor").into_dyn()))
        .collect();
    let out = session.run(vals).expect("ONNX Runtime run failed");
    outputs
        .iter()
        .map(|name| out[*name].try_extract_array::<f32>().expect("f32 output").to_owned().into_dyn())
        .collect()
}

pub fn uniform(rng: &mut ChaCha8Rng, dims: &[usize], lo: f32, hi: f32) -> ArrayD<f32> {
    ArrayD::from_shape_simple_fn(IxDyn(dims), || rng.random_range(lo..hi))
}

/// Values whose magnitudes lie in [margin, 1] with random signs: no ReLU kink within `margin`.
pub fn away_from_zero(rng: &mut ChaCha8Rng, dims: &[usize], margin: f32) -> ArrayD<f32> {
    ArrayD::from_shape_simple_fn(IxDyn(dims), || {
        let m = rng.random_range(margin..1.0);
        if rng.random_bool(0.5) { m } else { -m }
    })
}

/// A random permutation of `step * (0..n)` minus an offset: all values distinct, `step` apart
/// (no max-pooling tie within `step / 2`).
pub fn distinct(rng: &mut ChaCha8Rng, dims: &[usize], step: f32) -> ArrayD<f32> {
    let n: usize = dims.iter().product();
    let mut idx: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        idx.swap(i, rng.random_range(0..=i));
    }
    let off = step * n as f32 / 2.0;
    ArrayD::from_shape_vec(IxDyn(dims), idx.into_iter().map(|i| i as f32 * step - off).collect()).expect("shape")
}

pub fn max_abs(a: &ArrayD<f32>) -> f64 {
    a.iter().fold(0f64, |m, &v| m.max((v as f64).abs()))
}

/// max|a - b| / max|b|
pub fn rel_err(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f64 {
    assert_eq!(a.shape(), b.shape(), "shapes differ");
    let d = a.iter().zip(b.iter()).fold(0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs()));
    d / max_abs(b).max(1e-30)
}

/// Builds the explain graph (plain rule) for `model`, targeting `x_id`.
pub fn explain_model(model: &ModelProto, rules: &[ReluRule]) -> ModelProto {
    let ex = camserve::backend::probe::analyse(model.clone(), &PrepareOptions::default()).expect("analyse");
    ex.build(&ExplainPlan::new("x_id", rules.iter().copied())).expect("build")
}

/// The finite-difference check of a rule (or a chain of rules): the input gradient of the explain graph
/// against central differences of sum(seed * logits), one element at a time, for a batch of 2 with different
/// seed rows. `h` is the step; `tol` bounds max|fd - analytic| / max|analytic|. Returns the observed error.
pub fn check_gradients(model: &ModelProto, x: &ArrayD<f32>, h: f32, tol: f64) -> f64 {
    assert_eq!(x.shape()[0], 2, "the check uses a batch of 2");
    let explain = explain_model(model, &[ReluRule::Plain]);
    let mut plain = session(model, GraphOptimizationLevel::Disable);
    let logits = &run(&mut plain, vec![("x", x.clone())], &["logits"])[0];
    let k = logits.shape()[1];
    let mut r = rng(7);
    let seed = uniform(&mut r, &[2, k], -1.0, 1.0);

    let mut sx = session(&explain, GraphOptimizationLevel::All);
    let out = run(
        &mut sx,
        vec![("x", x.clone()), (contract::SEED, seed.clone())],
        &["logits", contract::GRADIENTS, &contract::input_grad_name(ReluRule::Plain)],
    );
    assert!(rel_err(&out[0], logits) < 1e-5, "explain-graph logits differ from the plain model's");
    // The layer is Identity(x), so its gradient equals the input gradient.
    assert!(rel_err(&out[1], &out[2]) < 1e-6, "layer gradient != input gradient through Identity");
    let analytic = &out[2];
    assert!(max_abs(analytic) > 1e-6, "the analytic gradient is all zeros: the test would prove nothing");

    // All perturbations in one batch: item (2 * (b * d + i) + s) is x[b] with element i moved by -h or +h.
    let d: usize = x.shape()[1..].iter().product();
    let flat = x.as_standard_layout().to_owned().into_raw_vec_and_offset().0;
    let mut batch = Vec::with_capacity(4 * d * d);
    for b in 0..2 {
        for i in 0..d {
            for s in [-h, h] {
                let mut item = flat[b * d..(b + 1) * d].to_vec();
                item[i] += s;
                batch.extend(item);
            }
        }
    }
    let mut shape = x.shape().to_vec();
    shape[0] = 4 * d;
    let xb = ArrayD::from_shape_vec(IxDyn(&shape), batch).expect("shape");
    let lb = &run(&mut plain, vec![("x", xb)], &["logits"])[0];
    let f = |j: usize, b: usize| -> f64 { (0..k).map(|c| seed[[b, c]] as f64 * lb[[j, c]] as f64).sum() };
    let mut fd = ArrayD::<f32>::zeros(x.shape());
    {
        let fd_flat = fd.as_slice_mut().expect("contiguous");
        for b in 0..2 {
            for i in 0..d {
                let j = 2 * (b * d + i);
                fd_flat[b * d + i] = ((f(j + 1, b) - f(j, b)) / (2.0 * h as f64)) as f32;
            }
        }
    }
    let err = rel_err(analytic, &fd);
    if std::env::var_os("CAMSERVE_FD_DEBUG").is_some() {
        let m = max_abs(&fd);
        let bad: Vec<(usize, f32, f32)> = analytic.iter().zip(fd.iter()).enumerate()
            .filter(|(_, (a, f))| ((**a - **f) as f64).abs() > tol * m).map(|(i, (a, f))| (i, *a, *f)).collect();
        eprintln!("{} of {} elements off: {:?}", bad.len(), fd.len(), &bad[..bad.len().min(10)]);
    }
    eprintln!("finite differences: max|analytic - fd| / max|fd| = {err:.2e} (tolerance {tol:.0e})");
    assert!(err <= tol, "finite differences disagree: max|analytic - fd| / max|fd| = {err:.3e} > {tol:.0e}");
    err
}
