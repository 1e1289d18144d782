//! Backward rules: one function per forward op, registered by op type (the pattern of ONNX Runtime's
//! gradient builder), each emitting only standard ONNX ops (opset 17) that stock ONNX Runtime runs on CPU and
//! CUDA. A rule receives the gradients of the node's outputs and returns the gradients of the inputs the
//! caller asks for; the driver (`rewrite`) walks the graph, sums fan-out and never changes when a rule is added.

use std::collections::HashMap;
use std::sync::OnceLock;

use super::builder::Emitter;
use super::graph::GraphIndex;
use super::probe::Probe;
use super::proto::{GraphProto, NodeProto};
use super::{attr, OnnxError, Result};

mod activation;
mod conv;
mod elementwise;
mod indexing;
mod linalg;
mod math;
mod norm;
mod pool;
mod resample;
mod shape;

/// How the input-gradient chain treats ReLU-like ops (docs/DESIGN.md §3). Every other op keeps its exact derivative.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ReluRule {
    /// The exact derivative.
    Plain,
    /// Guided backpropagation: pass where the forward input > 0 and the gradient > 0.
    Guided,
    /// Deconvnet: pass where the gradient > 0, whatever the forward input.
    Deconvnet,
}

impl ReluRule {
    pub const ALL: [ReluRule; 3] = [ReluRule::Guided, ReluRule::Deconvnet, ReluRule::Plain];

    pub fn as_str(self) -> &'static str {
        match self {
            ReluRule::Plain => "plain",
            ReluRule::Guided => "guided",
            ReluRule::Deconvnet => "deconvnet",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl std::fmt::Display for ReluRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a rule can read and where it writes.
pub struct RuleCtx<'a> {
    pub e: &'a mut Emitter,
    pub graph: &'a GraphProto,
    pub index: &'a GraphIndex,
    pub probe: &'a Probe,
    pub relu: ReluRule,
    /// Memo of emitted helper tensors (shapes, sizes), keyed by what they compute.
    pub memo: &'a mut HashMap<String, String>,
}

/// Gradients of a node's outputs (None: no gradient reaches that output) -> gradients of its inputs
/// (None where `needs` is false).
pub type BackwardRule = fn(&mut RuleCtx, &NodeProto, &[Option<String>], &[bool]) -> Result<Vec<Option<String>>>;

fn unhinted_key(hinted: &str) -> String {
    format!("Unhinted({hinted})")
}

/// `g` itself, or the tensor behind it if `g` is a layout hint (see `RuleCtx::layout_hint`).
pub fn unhinted(memo: &HashMap<String, String>, g: &str) -> String {
    memo.get(&unhinted_key(g)).cloned().unwrap_or_else(|| g.to_string())
}

/// The registry: op type -> rule.
pub fn registry() -> &'static HashMap<&'static str, BackwardRule> {
    static REGISTRY: OnceLock<HashMap<&'static str, BackwardRule>> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        let mut m: HashMap<&'static str, BackwardRule> = HashMap::new();
        activation::register(&mut m);
        conv::register(&mut m);
        elementwise::register(&mut m);
        indexing::register(&mut m);
        linalg::register(&mut m);
        math::register(&mut m);
        norm::register(&mut m);
        pool::register(&mut m);
        resample::register(&mut m);
        shape::register(&mut m);
        m
    })
}

pub fn rule_for(op: &str) -> Option<BackwardRule> {
    registry().get(op).copied()
}

impl RuleCtx<'_> {
    /// Static dimensions of a tensor at batch size 1 (from the probe, or an initializer's dims).
    pub fn dims(&self, name: &str) -> Result<Vec<i64>> {
        if let Some(d) = self.probe.dims(name) {
            return Ok(d.to_vec());
        }
        if let Some(&i) = self.index.initializers.get(name) {
            return Ok(self.graph.initializer[i].dims.clone());
        }
        if let Some((dims, _)) = self.index.const_f32(self.graph, name) {
            return Ok(dims);
        }
        Err(OnnxError::Invalid(format!("the shape of `{name}` is unknown")))
    }

    /// Whether `axis` of tensor `name` is (or folds in) the batch axis: its size follows the batch size. Rules
    /// that bake sizes read at batch size 1 into constants must not do that along such an axis. A model whose batch
    /// is fixed at 1 has none: its explain graphs run one row at a time (the engine splits batches), so sizes read
    /// at batch 1 are the sizes at every run, and an axis 0 of size 1 (timm's packed q, k, v; a detector's decoder
    /// concatenating along axis 0) need not be the batch.
    pub fn is_batch_axis(&self, name: &str, axis: usize) -> bool {
        if self.probe.batch_fixed {
            return false;
        }
        if self.index.initializers.contains_key(name) || self.index.const_f32(self.graph, name).is_some() {
            return false;
        }
        self.probe.is_batch_axis(name, axis)
    }

    /// Values of a float constant (initializer or Constant node).
    pub fn const_f32(&self, name: &str) -> Option<(Vec<i64>, Vec<f32>)> {
        self.index.const_f32(self.graph, name)
    }

    /// Values of an integer tensor: a constant, or a small tensor whose values the probe recorded
    /// (shape arithmetic does not depend on the batch size for the axes camserve reads).
    pub fn const_i64(&self, name: &str) -> Option<Vec<i64>> {
        self.index.const_i64(self.graph, name).or_else(|| self.probe.get(name).and_then(|t| t.ints.clone()))
    }

    /// `Shape(x)`, emitted once per tensor.
    pub fn shape_of(&mut self, x: &str) -> String {
        let key = format!("Shape({x})");
        if let Some(s) = self.memo.get(&key) {
            return s.clone();
        }
        let s = self.e.op("Shape", &[x], vec![], "shape");
        self.memo.insert(key, s.clone());
        s
    }

    /// `Reshape(g, Shape(like))`.
    pub fn reshape_like(&mut self, g: &str, like: &str) -> String {
        let s = self.shape_of(like);
        self.e.op("Reshape", &[g, &s], vec![], "reshape")
    }

    /// A zero tensor with the shape of `like` (dynamic batch), emitted once per tensor.
    pub fn zeros_like(&mut self, like: &str) -> String {
        let key = format!("Zeros({like})");
        if let Some(z) = self.memo.get(&key) {
            return z.clone();
        }
        let s = self.shape_of(like);
        let z = self.e.op("ConstantOfShape", &[&s], vec![attr::make_tensor("value", super::tensor::f32_tensor("", &[1], &[0.0]))], "zeros");
        self.memo.insert(key, z.clone());
        z
    }

    /// `dx`, the 4-D gradient of the ReLU output `x`, behind an identity MaxPool (kernel 1x1) where `dx` is made
    /// by an op outside ONNX Runtime's blocked (NCHWc) CPU layout set: the interleave of a polyphase conv
    /// backward, the Expand of a global pool backward. ONNX Runtime's layout pass moves pools into that layout
    /// whatever their input, and the ReLU backward that comes next (mask Mul, residual sums that it fuses into
    /// the backward convs) can then stay blocked instead of being reordered around every op. Only behind a
    /// ReLU: ahead of other backward rules the blocked tensor is reordered straight back. Measured, guided
    /// chain, batch 1: ResNet-50 45.6 -> 44.0 ms; EfficientNet-B0 (SiLU, squeeze-excitation pools) 27.4 ->
    /// 29.2 ms with the hint everywhere, hence the condition. Graph outputs take the tensor before the hint
    /// (`unhinted`), so a hint that only an output would use is pruned.
    pub fn layout_hint(&mut self, x: &str, dx: String) -> String {
        let behind_relu = self.index.producer.get(x).is_some_and(|&i| self.graph.node[i].op_type() == "Relu");
        if !behind_relu {
            return dx;
        }
        let ones = [1i64, 1];
        let hinted = self.e.op("MaxPool", &[&dx], vec![attr::make_ints("kernel_shape", &ones)], "layout_hint");
        self.memo.insert(unhinted_key(&hinted), dx);
        hinted
    }

    pub fn mul(&mut self, a: &str, b: &str) -> String {
        self.e.op("Mul", &[a, b], vec![], "mul")
    }

    pub fn mul_scalar(&mut self, a: &str, v: f32) -> String {
        let c = self.e.scalar(v);
        self.mul(a, &c)
    }

    /// `a / n`, for a mean's count or a fraction's denominator: a Div by the integer-valued `n` is exact wherever the
    /// graph runs in higher precision and correctly rounded in float32, where a Mul by float32(1 / n) carries the
    /// reciprocal's rounding (scripts/float64_check.py, docs/COVERAGE.md).
    pub fn div_scalar(&mut self, a: &str, n: f32) -> String {
        let c = self.e.scalar(n);
        self.e.op("Div", &[a, &c], vec![], "div")
    }

    /// `a` where `cond` holds, else 0, as `a * Cast(cond)`: ONNX Runtime's Where with a broadcast scalar is about
    /// four times slower than Cast + Mul, which also stay closer to the convolutions' NCHWc layout.
    pub fn where_else_zero(&mut self, cond: &str, a: &str) -> String {
        let mask = self.float_mask(cond);
        self.mul(a, &mask)
    }

    /// A boolean tensor as 0.0 / 1.0, emitted once per tensor.
    pub fn float_mask(&mut self, cond: &str) -> String {
        let key = format!("FloatMask({cond})");
        if let Some(m) = self.memo.get(&key) {
            return m.clone();
        }
        let m = self.e.op("Cast", &[cond], vec![attr::make_int("to", super::tensor::FLOAT as i64)], "mask");
        self.memo.insert(key, m.clone());
        m
    }

    /// The transpose of a selection along `axis`: `out[.., i, ..] = g[.., idx[i] - 1, ..]`, or 0 where `idx[i]`
    /// is 0. A Gather from `g` behind one zero slab (shaped like `slab_from`'s first slice along `axis`, which
    /// must match `g` on every other axis and be non-empty, as `g` may not be): it moves values without
    /// arithmetic, so it is exact. `idx` is an int64 tensor, constant or computed at run time.
    pub fn gather_behind_zero_slab(&mut self, g: &str, slab_from: &str, axis: usize, idx: &str, label: &str) -> String {
        let ax = self.e.ints(&[axis as i64]);
        let (s0, s1) = (self.e.ints(&[0]), self.e.ints(&[1]));
        let slab = self.e.op("Slice", &[slab_from, &s0, &s1, &ax], vec![], &format!("{label}_slab"));
        let zeros = self.zeros_like(&slab);
        let ext = self.e.op("Concat", &[&zeros, g], vec![attr::make_int("axis", axis as i64)], &format!("{label}_ext"));
        self.e.op("Gather", &[&ext, idx], vec![attr::make_int("axis", axis as i64)], label)
    }

    /// Sums `g` (shaped like `g_dims`) down to the shape of `target` (`t_dims`) over NumPy-broadcast axes.
    pub fn unbroadcast(&mut self, g: &str, g_dims: &[i64], target: &str, t_dims: &[i64]) -> String {
        let (r, tr) = (g_dims.len(), t_dims.len());
        let lead = r.saturating_sub(tr);
        let axes: Vec<i64> = (0..r)
            .filter(|&i| i < lead || (t_dims[i - lead] == 1 && g_dims[i] != 1))
            .map(|i| i as i64)
            .collect();
        if axes.is_empty() && r == tr {
            return g.to_string();
        }
        let mut out = g.to_string();
        if !axes.is_empty() {
            let a = self.e.ints(&axes);
            out = self.e.op("ReduceSum", &[&out, &a], vec![attr::make_int("keepdims", 1)], "unbroadcast");
        }
        if r != tr {
            out = self.reshape_like(&out, target);
        }
        out
    }
}

/// The i-th input's name, if present and non-empty.
pub fn input(node: &NodeProto, i: usize) -> Option<&str> {
    node.input.get(i).map(|s| s.as_str()).filter(|s| !s.is_empty())
}

/// An error for a node whose weights (or another input the rule does not differentiate) are on the path.
pub fn not_differentiable(node: &NodeProto, what: &str) -> OnnxError {
    OnnxError::node(node, format!("the gradient with respect to its {what} is not supported"))
}

/// The first output's gradient, which single-output rules need.
pub fn dy0<'a>(node: &NodeProto, dy: &'a [Option<String>]) -> Result<&'a str> {
    dy.first().and_then(|d| d.as_deref()).ok_or_else(|| OnnxError::node(node, "no gradient for its output"))
}


/// Normalises a possibly negative axis against a rank.
pub fn norm_axis(axis: i64, rank: usize) -> i64 {
    if axis < 0 { axis + rank as i64 } else { axis }
}

/// Changes a forward node, where its rule needs it, before any chain is emitted (MaxPool Indices).
pub fn prepare_forward(node: &mut NodeProto, probe: &Probe) -> Result<()> {
    pool::prepare_forward(node, probe)
}
