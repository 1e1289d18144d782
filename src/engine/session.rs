//! Execution providers and session options.

use std::path::PathBuf;

use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use ort::session::Session;

use super::{ort_err, EngineError};

/// What the configuration asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// CUDA if its execution provider registers, else CPU (logged).
    #[default]
    Auto,
    Cpu,
    /// CUDA or fail at start.
    Cuda,
}

/// Where sessions run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    Cpu,
    Cuda,
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
        })
    }
}

#[derive(Debug, Clone, Default)]
pub struct EngineOptions {
    pub device: DeviceChoice,
    /// ONNX Runtime intra-op threads per session; 0 = ONNX Runtime's default (one per core).
    pub intra_threads: usize,
    pub ort_library: Option<PathBuf>,
    /// CUDA device id.
    pub cuda_device: i32,
    /// ONNX Runtime's CPU memory arena. Off (the default): each run's buffers come from the process heap and go
    /// back to it, so the plans of a model (one session each) share one high-water mark instead of each keeping
    /// its own peak for good (docs/OPERATIONS.md, "Memory").
    pub cpu_arena: bool,
}

fn builder(device: super::Device, options: &EngineOptions) -> Result<SessionBuilder, EngineError> {
    let env = crate::runtime::environment(options.ort_library.as_deref())?;
    let mut b = Session::builder(env).map_err(ort_err)?;
    b = b.with_optimization_level(GraphOptimizationLevel::All).map_err(ort_err)?;
    if options.intra_threads > 0 {
        b = b.with_intra_threads(options.intra_threads).map_err(ort_err)?;
    }
    let cpu = ort::ep::CPU::default().with_arena_allocator(options.cpu_arena).build();
    if device == Device::Cuda {
        let cuda = ort::ep::CUDA::default().with_device_id(options.cuda_device).build().error_on_failure();
        b = b.with_execution_providers([cuda, cpu]).map_err(|e| EngineError::Ort(format!("CUDA execution provider: {e}")))?;
    } else {
        b = b.with_execution_providers([cpu]).map_err(ort_err)?;
    }
    Ok(b)
}

/// Resolves `auto` by trying to register the CUDA execution provider once.
pub fn choose_device(options: &EngineOptions) -> Result<Device, EngineError> {
    match options.device {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda => builder(Device::Cuda, options).map(|_| Device::Cuda),
        DeviceChoice::Auto => match builder(Device::Cuda, options) {
            Ok(_) => {
                tracing::info!("device auto: the CUDA execution provider registered, running on cuda");
                Ok(Device::Cuda)
            }
            Err(e) => {
                tracing::info!(reason = %e, "device auto: CUDA unavailable, running on cpu");
                Ok(Device::Cpu)
            }
        },
    }
}

pub fn build(bytes: &[u8], device: Device, options: &EngineOptions) -> Result<Session, EngineError> {
    let mut b = builder(device, options)?;
    crate::runtime::unpanic("session", || b.commit_from_memory(bytes)).map_err(EngineError::Ort)?.map_err(ort_err)
}
