//! The shape probe: runs the model once through ONNX Runtime (batch 1, zeros) with every intermediate tensor
//! exposed as an output, and records each tensor's shape, element type and, for small integer tensors, values.
//!
//! ONNX Runtime is the authority on what a model computes, so this copes with exporter shape sub-graphs
//! (Shape -> Gather -> Concat -> Reshape) without a shape-inference engine of our own.

use std::collections::HashMap;

use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::{Tensor, ValueType};

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

/// Runs `model` on zeros of `input_dims` (the image input; batch 1) and records every node output.
pub fn probe(model: &ModelProto, input_name: &str, input_dims: &[i64]) -> Result<Probe> {
    let env = crate::backend::runtime::environment(None).map_err(|e| OnnxError::Probe(e.to_string()))?;
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
    let perr = |e: &dyn std::fmt::Display| OnnxError::Probe(e.to_string());
    let mut builder = Session::builder(env)
        .map_err(|e| perr(&e))?
        .with_optimization_level(GraphOptimizationLevel::Disable)
        .map_err(|e| perr(&e))?
        .with_intra_threads(1)
        .map_err(|e| perr(&e))?;
    let mut session = crate::backend::runtime::unpanic("shape probe", || builder.commit_from_memory(&bytes))
        .map_err(OnnxError::Probe)?
        .map_err(|e| perr(&e))?;
    // Batch size 2 first, for the dims only: which axes follow the batch size. A model whose batch size is
    // fixed at 1 inside (a constant Reshape) fails here; its tensors then count axis 0 as the batch axis.
    let mut dims2: HashMap<String, Vec<i64>> = HashMap::new();
    let mut d2 = input_dims.to_vec();
    d2[0] = 2;
    let input = Tensor::from_array((d2.clone(), vec![0f32; tensor::numel(&d2)])).map_err(|e| perr(&e))?;
    if let Ok(outputs) = session.run(ort::inputs![input_name => input]) {
        for (name, value) in outputs.iter() {
            if let ValueType::Tensor { shape, .. } = value.dtype() {
                dims2.insert(name.to_string(), shape.iter().copied().collect());
            }
        }
    }
    let n = tensor::numel(input_dims);
    let input = Tensor::from_array((input_dims.to_vec(), vec![0f32; n])).map_err(|e| perr(&e))?;
    let outputs = session.run(ort::inputs![input_name => input]).map_err(|e| perr(&e))?;
    let mut tensors = HashMap::new();
    for (name, value) in outputs.iter() {
        let ValueType::Tensor { ty, shape, .. } = value.dtype() else { continue };
        let dims: Vec<i64> = shape.iter().copied().collect();
        let elem = onnx_elem_type(*ty);
        let ints = if tensor::numel(&dims) <= 64 {
            match ty {
                ort::value::TensorElementType::Int64 => value.try_extract_tensor::<i64>().ok().map(|(_, v)| v.to_vec()),
                ort::value::TensorElementType::Int32 => {
                    value.try_extract_tensor::<i32>().ok().map(|(_, v)| v.iter().map(|&x| x as i64).collect())
                }
                _ => None,
            }
        } else {
            None
        };
        let batch_axes = match dims2.get(name) {
            Some(d2) if d2.len() == dims.len() => (0..dims.len()).filter(|&k| d2[k] != dims[k]).collect(),
            _ => vec![0],
        };
        tensors.insert(name.to_string(), ProbedTensor { dims, elem, ints, batch_axes });
    }
    tensors.insert(input_name.to_string(), ProbedTensor { dims: input_dims.to_vec(), elem: tensor::FLOAT, ints: None, batch_axes: vec![0] });
    Ok(Probe { tensors })
}

fn onnx_elem_type(t: ort::value::TensorElementType) -> i32 {
    use super::proto::tensor_proto::DataType as D;
    use ort::value::TensorElementType as T;
    (match t {
        T::Float32 => D::Float,
        T::Float64 => D::Double,
        T::Float16 => D::Float16,
        T::Bfloat16 => D::Bfloat16,
        T::Int64 => D::Int64,
        T::Int32 => D::Int32,
        T::Int16 => D::Int16,
        T::Int8 => D::Int8,
        T::Uint8 => D::Uint8,
        T::Uint16 => D::Uint16,
        T::Uint32 => D::Uint32,
        T::Uint64 => D::Uint64,
        T::Bool => D::Bool,
        T::String => D::String,
        _ => D::Undefined,
    }) as i32
}
