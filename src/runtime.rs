//! The ONNX Runtime library and the process-wide ORT environment.
//!
//! `ort` allows one environment per process and keeps only a weak reference to it, so camserve creates it once
//! here and keeps it for the life of the process. The library is found, in order, from: an explicit path
//! (config `runtime.ort_library`), `ORT_DYLIB_PATH`, `.ort/libonnxruntime.so` next to the executable's project
//! (where `scripts/fetch-ort.sh` puts it) or in the current folder, and `libonnxruntime.so` beside the executable.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::environment::Environment;

#[derive(Debug, Clone, thiserror::Error)]
pub enum RuntimeError {
    #[error(
        "the ONNX Runtime library was not found (looked in: {0}); run `scripts/fetch-ort.sh` or set ORT_DYLIB_PATH"
    )]
    NotFound(String),
    #[error("cannot load ONNX Runtime from {path}: {reason}")]
    Load { path: PathBuf, reason: String },
}

struct Loaded {
    env: Environment,
    path: PathBuf,
}

static RUNTIME: OnceLock<Result<Loaded, RuntimeError>> = OnceLock::new();
/// Candidate library paths, most specific first.
pub fn candidate_paths(explicit: Option<&Path>) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(p) = explicit {
        out.push(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        out.push(PathBuf::from(p));
    }
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent() {
            // target/{debug,release}[/deps]/camserve -> project root
            for up in dir.ancestors().take(4) {
                out.push(up.join(".ort/libonnxruntime.so"));
            }
            out.push(dir.join("libonnxruntime.so"));
        }
    if let Ok(cwd) = std::env::current_dir() {
        out.push(cwd.join(".ort/libonnxruntime.so"));
    }
    out
}

/// The process's ORT environment, created on first use from the first library path that exists.
/// Later calls return the same environment whatever path they pass.
pub fn environment(explicit: Option<&Path>) -> Result<&'static Environment, RuntimeError> {
    let loaded = RUNTIME.get_or_init(|| {
        let candidates = candidate_paths(explicit);
        let Some(path) = candidates.iter().find(|p| p.is_file()).cloned() else {
            let looked = candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
            return Err(RuntimeError::NotFound(looked));
        };
        let load_err = |e: &dyn std::fmt::Display| RuntimeError::Load { path: path.clone(), reason: e.to_string() };
        let builder = ort::init_from(&path).map_err(|e| load_err(&e))?;
        let env = builder.with_name("camserve").with_telemetry(false).build().map_err(|e| load_err(&e))?;
        tracing::info!(library = %path.display(), "ONNX Runtime loaded");
        Ok(Loaded { env, path })
    });
    loaded.as_ref().map(|l| &l.env).map_err(Clone::clone)
}

/// The library path the environment was loaded from, once loaded.
pub fn library_path() -> Option<&'static Path> {
    RUNTIME.get().and_then(|r| r.as_ref().ok()).map(|l| l.path.as_path())
}

/// Runs `f` (an `ort` call on a model file we did not write) and turns a panic inside the `ort` crate into an
/// error. `ort` panics ("infallible") when ONNX Runtime infers a shape it refuses to hand back, e.g. negative
/// dimensions from a corrupt initializer (found by tests/fuzz.rs).
pub fn unpanic<T>(what: &str, f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .map_err(|p| format!("{what}: ONNX Runtime could not describe the model ({})", panic_message(&*p)))
}

/// The text of a caught panic's payload (`panic!` with a literal or with a formatted message).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "no message".into())
}
