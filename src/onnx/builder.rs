//! `Emitter`: appends new nodes and initializers to a graph under unique, readable names.

use std::collections::HashMap;

use super::proto::{AttributeProto, NodeProto, TensorProto};
use super::tensor;

/// Constants with at most this many elements are shared between identical uses.
const SHARED_MAX: usize = 16;

/// Collects the nodes and initializers a rewrite adds. Names are `<prefix><label>` plus a counter when needed.
pub struct Emitter {
    pub nodes: Vec<NodeProto>,
    pub initializers: Vec<TensorProto>,
    prefix: String,
    /// Initializer names start with this (the prefix given to `new`): emitters with different prefixes never
    /// collide when their work ends up in one graph.
    const_prefix: String,
    used: HashMap<String, usize>,
    consts: HashMap<String, String>,
}

impl Emitter {
    pub fn new(prefix: &str) -> Self {
        Emitter {
            nodes: Vec::new(),
            initializers: Vec::new(),
            prefix: prefix.to_string(),
            const_prefix: format!("{prefix}const/"),
            used: HashMap::new(),
            consts: HashMap::new(),
        }
    }

    /// Changes the prefix of the names made from now on (one per backward chain).
    pub fn set_prefix(&mut self, prefix: &str) {
        self.prefix = prefix.to_string();
    }

    /// A fresh tensor name derived from `label`.
    pub fn fresh(&mut self, label: &str) -> String {
        let base = format!("{}{}", self.prefix, label);
        let n = self.used.entry(base.clone()).or_insert(0);
        *n += 1;
        if *n == 1 { base } else { format!("{base}.{}", *n - 1) }
    }

    /// Adds a node with one output and returns the output's name.
    pub fn op(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>, label: &str) -> String {
        let out = self.fresh(label);
        self.op_into(op, inputs, attrs, &out);
        out
    }

    /// Adds a node whose single output has the given exact name.
    pub fn op_into(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>, output: &str) {
        self.nodes.push(node(op, inputs, output, attrs));
    }

    /// Adds a node with several outputs.
    pub fn op_n(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>, label: &str, n: usize) -> Vec<String> {
        let outputs: Vec<String> = (0..n).map(|i| self.fresh(&format!("{label}.{i}"))).collect();
        self.nodes.push(NodeProto {
            name: Some(outputs[0].clone()),
            op_type: Some(op.to_string()),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.clone(),
            attribute: attrs,
            ..Default::default()
        });
        outputs
    }

    /// A float32 initializer; identical constants are shared.
    pub fn const_f32(&mut self, dims: &[i64], data: &[f32]) -> String {
        let key = (data.len() <= SHARED_MAX).then(|| format!("f{dims:?}{:?}", data.iter().map(|x| x.to_bits()).collect::<Vec<_>>()));
        self.constant(key, |name| tensor::f32_tensor(name, dims, data))
    }

    pub fn const_i64(&mut self, dims: &[i64], data: &[i64]) -> String {
        let key = (data.len() <= SHARED_MAX).then(|| format!("i{dims:?}{data:?}"));
        self.constant(key, |name| tensor::i64_tensor(name, dims, data))
    }

    /// A float32 scalar (rank 0).
    pub fn scalar(&mut self, v: f32) -> String {
        self.const_f32(&[], &[v])
    }

    /// A 1-D int64 tensor.
    pub fn ints(&mut self, v: &[i64]) -> String {
        self.const_i64(&[v.len() as i64], v)
    }

    /// `key` identifies small constants so that identical ones are shared; large ones are never compared.
    fn constant(&mut self, key: Option<String>, make: impl FnOnce(&str) -> TensorProto) -> String {
        if let Some(name) = key.as_ref().and_then(|k| self.consts.get(k)) {
            return name.clone();
        }
        let name = format!("{}{}", self.const_prefix, self.initializers.len());
        self.initializers.push(make(&name));
        if let Some(k) = key {
            self.consts.insert(k, name.clone());
        }
        name
    }
}

/// A node with one output, named after it.
pub fn node(op: &str, inputs: &[&str], output: &str, attrs: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        name: Some(output.to_string()),
        op_type: Some(op.to_string()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.to_string()],
        attribute: attrs,
        ..Default::default()
    }
}

/// A one-node model (`y = Relu(x)`, float `[1]`, opset 17): what the engine opens on an execution provider to
/// check that the provider starts on this machine, before any real model is placed on it.
pub fn relu_model() -> super::proto::ModelProto {
    use super::proto::{GraphProto, ModelProto, OperatorSetIdProto};
    use super::rewrite::{value_info, Dim};
    let float = super::proto::tensor_proto::DataType::Float as i32;
    ModelProto {
        ir_version: Some(8),
        opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(17) }],
        producer_name: Some("camserve".into()),
        graph: Some(GraphProto {
            name: Some("probe".into()),
            node: vec![node("Relu", &["x"], "y", vec![])],
            input: vec![value_info("x", float, &[Dim::Value(1)])],
            output: vec![value_info("y", float, &[Dim::Value(1)])],
            ..Default::default()
        }),
        ..Default::default()
    }
}
