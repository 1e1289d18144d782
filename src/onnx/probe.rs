//! The shape probe: runs the model once through ONNX Runtime (a [`ProbeRunner`] that `backend` provides) (batch 1, zeros) with every intermediate tensor
//! exposed as an output, and records each tensor's shape, element type and, for small integer tensors, values.
//!
//! ONNX Runtime is the authority on what a model computes, so this copes with exporter shape sub-graphs
//! (Shape -> Gather -> Concat -> Reshape) without a shape-inference engine of our own.

use std::collections::HashMap;

use super::proto::{ModelProto, ValueInfoProto};
use super::{io, tensor, OnnxError, Result};

#[derive(Debug, Clone)]
pub struct ProbedTensor {
    /// Dimensions at batch size 1.
    pub dims: Vec<i64>,
    /// ONNX element type (`TensorProto.DataType`).
    pub elem: i32,
    /// Values of integer tensors with at most 64 elements (shape arithmetic).
    pub ints: Option<Vec<i64>>,
    /// The axes whose size changes with the batch size (a second run at batch size 2 tells): `[0]` for most
    /// tensors, `[1]` for timm's stacked q/k/v `[3, N, heads, T, d]`, `[]` for weights and shapes. Swin's windows
    /// `[N * windows, ...]` have the batch folded into axis 0.
    pub batch_axes: Vec<usize>,
}

#[derive(Debug, Clone, Default)]
pub struct Probe {
    pub tensors: HashMap<String, ProbedTensor>,
    /// The model failed at batch size 2: its batch is fixed at 1 inside (a static export), so it runs one image
    /// at a time.
    pub batch_fixed: bool,
}

impl Probe {
    pub fn get(&self, name: &str) -> Option<&ProbedTensor> {
        self.tensors.get(name)
    }

    pub fn dims(&self, name: &str) -> Option<&[i64]> {
        self.tensors.get(name).map(|t| t.dims.as_slice())
    }

    pub fn is_float(&self, name: &str) -> bool {
        self.tensors.get(name).is_some_and(|t| tensor::is_float_type(t.elem))
    }

    /// Whether `axis` of `name` grows with the batch size (unknown tensors: axis 0 does).
    pub fn is_batch_axis(&self, name: &str, axis: usize) -> bool {
        match self.tensors.get(name) {
            Some(t) => t.batch_axes.contains(&axis),
            None => axis == 0,
        }
    }
}

/// One output of a probe run: its shape, ONNX element type (`TensorProto.DataType`), and for integer tensors of
/// at most 64 elements their values.
#[derive(Debug, Clone)]
pub struct RunOutput {
    pub name: String,
    pub dims: Vec<i64>,
    pub elem: i32,
    pub ints: Option<Vec<i64>>,
}

/// What runs a model for the probe: ONNX Runtime, provided by `backend::probe`. This module never opens a
/// session itself.
pub trait ProbeRunner: Sync {
    /// Loads the encoded `model` once and runs it once per entry of `runs` (the image input's dims), on zeros fed
    /// to `input`. The outer error: the model could not be loaded; each run's own result: its outputs, or why it
    /// failed.
    #[allow(clippy::type_complexity)]
    fn run(&self, model: &[u8], input: &str, runs: &[Vec<i64>]) -> std::result::Result<Vec<std::result::Result<Vec<RunOutput>, String>>, String>;
}

/// Runs `model` on zeros of `input_dims` (the image input; batch 1) through `runner` and records every node output.
pub fn probe(model: &ModelProto, input_name: &str, input_dims: &[i64], runner: &dyn ProbeRunner) -> Result<Probe> {
    let mut m = model.clone();
    let graph = m.graph.as_mut().ok_or_else(|| OnnxError::Invalid("the model has no graph".into()))?;
    let existing: std::collections::HashSet<String> = graph.output.iter().map(|o| o.name().to_string()).collect();
    let names: Vec<String> = graph.node.iter().flat_map(|n| n.output.iter()).filter(|o| !o.is_empty()).cloned().collect();
    for name in &names {
        if !existing.contains(name) {
            graph.output.push(ValueInfoProto { name: Some(name.clone()), ..Default::default() });
        }
    }
    // Stale shapes in value_info can contradict the batch size we probe with.
    graph.value_info.clear();
    let bytes = io::encode_model(&m)?;
    // Batch size 2 first, for the dims only: which axes follow the batch size. A model whose batch size is
    // fixed at 1 inside (a constant Reshape) fails there; its tensors then count axis 0 as the batch axis.
    let mut d2 = input_dims.to_vec();
    d2[0] = 2;
    let mut runs = runner.run(&bytes, input_name, &[d2, input_dims.to_vec()]).map_err(OnnxError::Probe)?.into_iter();
    let (Some(at2), Some(at1)) = (runs.next(), runs.next()) else {
        return Err(OnnxError::Probe("the probe's runner returned fewer runs than asked for. This is a bug.".into()));
    };
    let batch_fixed = at2.is_err();
    let dims2: HashMap<String, Vec<i64>> = at2.map(|outs| outs.into_iter().map(|o| (o.name, o.dims)).collect()).unwrap_or_default();
    let mut tensors = HashMap::new();
    for o in at1.map_err(OnnxError::Probe)? {
        let batch_axes = match dims2.get(&o.name) {
            Some(d2) if d2.len() == o.dims.len() => (0..o.dims.len()).filter(|&k| d2[k] != o.dims[k]).collect(),
            _ => vec![0],
        };
        tensors.insert(o.name, ProbedTensor { dims: o.dims, elem: o.elem, ints: o.ints, batch_axes });
    }
    tensors.insert(input_name.to_string(), ProbedTensor { dims: input_dims.to_vec(), elem: tensor::FLOAT, ints: None, batch_axes: vec![0] });
    Ok(Probe { tensors, batch_fixed })
}

