//! The ONNX Runtime library and the process-wide ORT environment.
//!
//! `ort` allows one environment per process and keeps only a weak reference to it, so camserve creates it once
//! here and keeps it for the life of the process. The library is found, in order, from: an explicit path
//! (config `runtime.ort_library`), `ORT_DYLIB_PATH`, then in the executable's project (its folder and up to three
//! above: `target/release/camserve` -> the checkout) `.ort-gpu/libonnxruntime.so` (`scripts/fetch-ort.sh gpu`:
//! onnxruntime-gpu, which runs on CPU too) before `.ort/libonnxruntime.so` (`scripts/fetch-ort.sh`), then
//! `libonnxruntime.so` beside the executable, then `.ort-gpu/` and `.ort/` in the current folder.

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
/// Candidate library paths, most specific first (the order in the module comment).
pub fn candidate_paths(explicit: Option<&Path>) -> Vec<PathBuf> {
    let exe = std::env::current_exe().ok();
    let cwd = std::env::current_dir().ok();
    let env = std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from);
    candidates_from(explicit, env.as_deref(), exe.as_deref().and_then(Path::parent), cwd.as_deref())
}

/// The folders `scripts/fetch-ort.sh` fills: the GPU flavour first, since whoever fetched it wants CUDA.
const FETCHED: [&str; 2] = [".ort-gpu/libonnxruntime.so", ".ort/libonnxruntime.so"];

fn candidates_from(explicit: Option<&Path>, env: Option<&Path>, exe_dir: Option<&Path>, cwd: Option<&Path>) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = explicit.into_iter().chain(env).map(Path::to_path_buf).collect();
    if let Some(dir) = exe_dir {
        // target/{debug,release}[/deps]/camserve -> project root
        for up in dir.ancestors().take(4) {
            out.extend(FETCHED.iter().map(|f| up.join(f)));
        }
        out.push(dir.join("libonnxruntime.so"));
    }
    if let Some(cwd) = cwd {
        out.extend(FETCHED.iter().map(|f| cwd.join(f)));
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

pub use crate::error::panic_message;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn library_lookup_order_is_as_documented() {
        let p = |s: &str| PathBuf::from(s);
        let got = candidates_from(
            Some(Path::new("/cfg/lib.so")),
            Some(Path::new("/env/lib.so")),
            Some(Path::new("/repo/target/release")),
            Some(Path::new("/work")),
        );
        let want = vec![
            p("/cfg/lib.so"),
            p("/env/lib.so"),
            p("/repo/target/release/.ort-gpu/libonnxruntime.so"),
            p("/repo/target/release/.ort/libonnxruntime.so"),
            p("/repo/target/.ort-gpu/libonnxruntime.so"),
            p("/repo/target/.ort/libonnxruntime.so"),
            p("/repo/.ort-gpu/libonnxruntime.so"),
            p("/repo/.ort/libonnxruntime.so"),
            p("/.ort-gpu/libonnxruntime.so"),
            p("/.ort/libonnxruntime.so"),
            p("/repo/target/release/libonnxruntime.so"),
            p("/work/.ort-gpu/libonnxruntime.so"),
            p("/work/.ort/libonnxruntime.so"),
        ];
        assert_eq!(got, want);
        assert_eq!(candidates_from(None, None, None, None), Vec::<PathBuf>::new());
    }
}
