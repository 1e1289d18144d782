//! `GraphIndex`: producers, consumers, constants and a topological order of a graph's nodes.

use std::collections::{HashMap, HashSet, VecDeque};

use super::proto::{GraphProto, NodeProto, TensorProto};
use super::{attr, tensor, OnnxError, Result};

pub struct GraphIndex {
    /// Tensor name -> index of the node that produces it.
    pub producer: HashMap<String, usize>,
    /// Tensor name -> indices of the nodes that read it (a node reading it twice appears once).
    pub consumers: HashMap<String, Vec<usize>>,
    /// Initializer name -> index in `graph.initializer`.
    pub initializers: HashMap<String, usize>,
    /// Node indices in a topological order.
    pub order: Vec<usize>,
    /// Tensors whose shape may change from run to run with the image's content, not only with the batch size:
    /// the outputs of ops whose output size depends on values (NonZero, NonMaxSuppression, Compress, Unique,
    /// TopK, If, Loop, Scan) and everything computed from them (torchvision's post-processing, Faster R-CNN's RoI
    /// head). Rules must read such sizes at run time, not from the probe.
    pub dynamic: HashSet<String>,
}

impl GraphIndex {
    pub fn new(graph: &GraphProto) -> Result<Self> {
        let mut producer = HashMap::new();
        let mut consumers: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, n) in graph.node.iter().enumerate() {
            for o in n.output.iter().filter(|o| !o.is_empty()) {
                if producer.insert(o.clone(), i).is_some() {
                    return Err(OnnxError::Invalid(format!("tensor `{o}` is produced by two nodes")));
                }
            }
            for inp in n.input.iter().filter(|s| !s.is_empty()) {
                let c = consumers.entry(inp.clone()).or_default();
                if c.last() != Some(&i) {
                    c.push(i);
                }
            }
        }
        let initializers = graph.initializer.iter().enumerate().map(|(i, t)| (t.name().to_string(), i)).collect();
        // Kahn's algorithm, stable in the file's order.
        let mut indegree: Vec<usize> = graph
            .node
            .iter()
            .map(|n| n.input.iter().filter(|s| producer.contains_key(*s)).collect::<HashSet<_>>().len())
            .collect();
        let mut ready: VecDeque<usize> = (0..graph.node.len()).filter(|&i| indegree[i] == 0).collect();
        let mut order = Vec::with_capacity(graph.node.len());
        while let Some(i) = ready.pop_front() {
            order.push(i);
            for o in graph.node[i].output.iter().filter(|o| !o.is_empty()) {
                for &c in consumers.get(o).map(|v| v.as_slice()).unwrap_or(&[]) {
                    // `indegree` counts distinct produced tensors, so each (consumer, tensor) pair once.
                    indegree[c] -= 1;
                    if indegree[c] == 0 {
                        ready.push_back(c);
                    }
                }
            }
        }
        if order.len() != graph.node.len() {
            return Err(OnnxError::Invalid("the graph has a cycle".into()));
        }
        let mut dynamic: HashSet<String> = HashSet::new();
        for &i in &order {
            let n = &graph.node[i];
            let root = matches!(n.op_type(), "NonZero" | "NonMaxSuppression" | "Compress" | "Unique" | "TopK" | "If" | "Loop" | "Scan");
            if root || n.input.iter().chain(implicit_inputs(n).iter()).any(|t| dynamic.contains(t)) {
                dynamic.extend(n.output.iter().filter(|o| !o.is_empty()).cloned());
            }
        }
        Ok(GraphIndex { producer, consumers, initializers, order, dynamic })
    }

    pub fn consumers_of(&self, tensor: &str) -> &[usize] {
        self.consumers.get(tensor).map(|v| v.as_slice()).unwrap_or(&[])
    }

    /// The value of a constant tensor: an initializer or the output of a `Constant` node.
    pub fn constant<'g>(&self, graph: &'g GraphProto, name: &str) -> Option<ConstValue<'g>> {
        if let Some(&i) = self.initializers.get(name) {
            return Some(ConstValue::Tensor(&graph.initializer[i]));
        }
        let node = &graph.node[*self.producer.get(name)?];
        if node.op_type() != "Constant" {
            return None;
        }
        constant_node_value(node)
    }

    pub fn const_f32(&self, graph: &GraphProto, name: &str) -> Option<(Vec<i64>, Vec<f32>)> {
        match self.constant(graph, name)? {
            ConstValue::Tensor(t) => Some((t.dims.clone(), tensor::to_f32(t)?)),
            ConstValue::Floats(dims, v) => Some((dims, v)),
            ConstValue::Ints(..) => None,
        }
    }

    pub fn const_i64(&self, graph: &GraphProto, name: &str) -> Option<Vec<i64>> {
        match self.constant(graph, name)? {
            ConstValue::Tensor(t) => tensor::to_i64(t),
            ConstValue::Ints(_, v) => Some(v),
            ConstValue::Floats(..) => None,
        }
    }
}

pub enum ConstValue<'g> {
    Tensor(&'g TensorProto),
    Floats(Vec<i64>, Vec<f32>),
    Ints(Vec<i64>, Vec<i64>),
}

fn constant_node_value(node: &NodeProto) -> Option<ConstValue<'_>> {
    if let Some(t) = attr::tensor(node, "value") {
        return Some(ConstValue::Tensor(t));
    }
    let a = node.attribute.first()?;
    match a.name() {
        "value_float" => Some(ConstValue::Floats(vec![], vec![a.f()])),
        "value_floats" => Some(ConstValue::Floats(vec![a.floats.len() as i64], a.floats.clone())),
        "value_int" => Some(ConstValue::Ints(vec![], vec![a.i()])),
        "value_ints" => Some(ConstValue::Ints(vec![a.ints.len() as i64], a.ints.clone())),
        _ => None,
    }
}

/// A readable label for a node in messages: its name, or its first output when it has no name.
pub fn node_label(node: &NodeProto) -> String {
    if !node.name().is_empty() {
        node.name().to_string()
    } else {
        node.output.first().map(|o| format!("-> {o}")).unwrap_or_default()
    }
}

/// The outer-scope tensors that `node`'s subgraphs (an If's branches, a Loop's or Scan's body) read without
/// declaring them: inputs as real as the listed ones, for pruning and ordering (torchvision's exports run NMS inside
/// an If whose branches read the boxes and scores from the enclosing graph).
pub fn implicit_inputs(node: &NodeProto) -> Vec<String> {
    let mut out = Vec::new();
    for a in &node.attribute {
        for g in a.g.iter().chain(a.graphs.iter()) {
            let mut defined: HashSet<&str> = g.input.iter().map(|i| i.name()).chain(g.initializer.iter().map(|t| t.name())).collect();
            for n in &g.node {
                let nested = implicit_inputs(n);
                for i in n.input.iter().map(String::as_str).chain(nested.iter().map(String::as_str)) {
                    if !i.is_empty() && !defined.contains(i) && !out.iter().any(|o: &String| o == i) {
                        out.push(i.to_string());
                    }
                }
                defined.extend(n.output.iter().map(String::as_str));
            }
        }
    }
    out
}
