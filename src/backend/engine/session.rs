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
    let env = crate::backend::runtime::environment(options.ort_library.as_deref())?;
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

/// Resolves `auto`, and checks `cuda`, by starting the CUDA execution provider once per process (per CUDA device).
pub fn choose_device(options: &EngineOptions) -> Result<Device, EngineError> {
    match options.device {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda => match probe_cuda(options) {
            Ok(()) => Ok(Device::Cuda),
            Err(reason) => Err(EngineError::Ort(format!(
                "device cuda: CUDA is unavailable ({reason}){}; set runtime.device to auto or cpu to run on the CPU",
                driver_hint(&reason)
            ))),
        },
        DeviceChoice::Auto => match probe_cuda(options) {
            Ok(()) => {
                tracing::info!("device auto: the CUDA execution provider started, running on cuda");
                Ok(Device::Cuda)
            }
            Err(reason) => {
                let reason = format!("{reason}{}", driver_hint(&reason));
                tracing::info!(%reason, "device auto: CUDA unavailable, running on cpu");
                Ok(Device::Cpu)
            }
        },
    }
}

/// What to do when the reason is the driver's library missing, the commonest case in containers.
fn driver_hint(reason: &str) -> &'static str {
    if reason.contains("libcuda.so.1") {
        ". libcuda.so.1 is the NVIDIA driver's library, which no image carries: on a GPU host the NVIDIA container \
         runtime mounts it (docker run --gpus all, or a Kubernetes pod with an nvidia.com/gpu limit)"
    } else {
        ""
    }
}

/// Registers the CUDA execution provider and opens a one-node session on it. Registering only loads
/// `libonnxruntime_providers_cuda.so` and the libraries it links (it fails when one is missing, `libcuda.so.1`
/// included: the driver's library, which the NVIDIA container runtime mounts from the host); opening a session
/// starts the provider on the device, which is where a machine with the libraries but no usable GPU fails. The
/// answer is kept for the life of the process: every model asks the same question.
fn probe_cuda(options: &EngineOptions) -> Result<(), String> {
    static PROBES: std::sync::Mutex<Vec<(i32, Result<(), String>)>> = std::sync::Mutex::new(Vec::new());
    let mut probes = PROBES.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((_, r)) = probes.iter().find(|(d, _)| *d == options.cuda_device) {
        return r.clone();
    }
    let result = (|| {
        let mut b = builder(Device::Cuda, options).map_err(|e| e.to_string())?;
        let model = crate::onnx::io::encode_model(&crate::onnx::builder::relu_model()).map_err(|e| e.to_string())?;
        crate::backend::runtime::unpanic("CUDA probe session", || b.commit_from_memory(&model))?
            .map(drop)
            .map_err(|e| format!("starting the CUDA execution provider on device {}: {e}", options.cuda_device))
    })();
    probes.push((options.cuda_device, result.clone()));
    result
}

pub fn build(bytes: &[u8], device: Device, options: &EngineOptions) -> Result<Session, EngineError> {
    let mut b = builder(device, options)?;
    crate::backend::runtime::unpanic("session", || b.commit_from_memory(bytes)).map_err(EngineError::Ort)?.map_err(ort_err)
}
