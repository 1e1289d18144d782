//! The shape probe's runner: ONNX Runtime for `onnx::probe` (which opens no session itself), and the entry points
//! that analyse and inspect a model with it.

use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::{Tensor, ValueType};

use crate::onnx::inspect::Inspection;
use crate::onnx::probe::{ProbeRunner, RunOutput};
use crate::onnx::proto::ModelProto;
use crate::onnx::rewrite::{Explainable, PrepareOptions};
use crate::onnx::{inspect as inspection, tensor, Result};

/// ONNX Runtime on the CPU, one thread, no graph optimisation: what the probe runs models with.
pub struct OrtProbe;

impl ProbeRunner for OrtProbe {
    fn run(&self, model: &[u8], input: &str, runs: &[Vec<i64>]) -> std::result::Result<Vec<std::result::Result<Vec<RunOutput>, String>>, String> {
        let env = super::runtime::environment(None).map_err(|e| e.to_string())?;
        let err = |e: &dyn std::fmt::Display| e.to_string();
        let mut builder = Session::builder(env)
            .map_err(|e| err(&e))?
            .with_optimization_level(GraphOptimizationLevel::Disable)
            .map_err(|e| err(&e))?
            .with_intra_threads(1)
            .map_err(|e| err(&e))?;
        let mut session = super::runtime::unpanic("shape probe", || builder.commit_from_memory(model))?.map_err(|e| err(&e))?;
        Ok(runs.iter().map(|dims| run_once(&mut session, input, dims)).collect())
    }
}

fn run_once(session: &mut Session, input: &str, dims: &[i64]) -> std::result::Result<Vec<RunOutput>, String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let zeros = Tensor::from_array((dims.to_vec(), vec![0f32; tensor::numel(dims)])).map_err(|e| err(&e))?;
    let outputs = session.run(ort::inputs![input => zeros]).map_err(|e| err(&e))?;
    let mut out = Vec::new();
    for (name, value) in outputs.iter() {
        let ValueType::Tensor { ty, shape, .. } = value.dtype() else { continue };
        let dims: Vec<i64> = shape.iter().copied().collect();
        let ints = if tensor::numel(&dims) <= 64 {
            match ty {
                ort::value::TensorElementType::Int64 => value.try_extract_tensor::<i64>().ok().map(|(_, v)| v.to_vec()),
                ort::value::TensorElementType::Int32 => value.try_extract_tensor::<i32>().ok().map(|(_, v)| v.iter().map(|&x| x as i64).collect()),
                _ => None,
            }
        } else {
            None
        };
        out.push(RunOutput { name: name.to_string(), elem: onnx_elem_type(*ty), dims, ints });
    }
    Ok(out)
}

/// Analyses a plain model for explaining, its shapes probed with ONNX Runtime.
pub fn analyse(model: ModelProto, opts: &PrepareOptions) -> Result<Explainable> {
    Explainable::analyse(model, opts, &OrtProbe)
}

/// `camserve inspect`'s report, its shapes probed with ONNX Runtime.
pub fn inspect(model: ModelProto, opts: &PrepareOptions) -> Result<Inspection> {
    inspection::inspect(model, opts, &OrtProbe)
}

fn onnx_elem_type(t: ort::value::TensorElementType) -> i32 {
    use crate::onnx::proto::tensor_proto::DataType as D;
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
