//! Configuration (docs/DESIGN.md §6): built-in defaults, then a TOML file, then `CAMSERVE_SECTION__KEY` environment
//! variables, then command-line flags. Unknown keys and invalid values fail at start with the key's name.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

use crate::backend::engine::DeviceChoice;
use crate::onnx::rewrite::InputLayout;
use crate::preprocess::{ChannelOrder, ResizePolicy};

pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub runtime: RuntimeConfig,
    pub batching: BatchingConfig,
    pub jobs: JobsConfig,
    pub models: Vec<ModelConfig>,
}

/// API keys. Their `Debug` says how many there are and never what they are, so that a logged or panicking
/// configuration cannot leak them (docs/SECURITY.md).
#[derive(Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(transparent)]
pub struct ApiKeys(pub Vec<String>);

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} redacted)", self.0.len())
    }
}

impl From<Vec<String>> for ApiKeys {
    fn from(keys: Vec<String>) -> Self {
        ApiKeys(keys)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on.
    pub bind: String,
    /// Largest request body accepted, in bytes (413 above).
    pub body_limit_bytes: usize,
    /// Largest image accepted, in pixels (width * height, read from the header before decoding; 413 above).
    pub max_image_pixels: u64,
    /// Largest image width or height accepted.
    pub max_image_dimension: u32,
    /// A request that has not been answered after this long gets 504.
    pub request_timeout_ms: u64,
    /// The request body must have arrived this long after the headers (408 otherwise): a client that trickles
    /// its upload cannot hold a connection and its task forever.
    pub body_timeout_ms: u64,
    /// A request's headers must arrive within this long after the connection is ready for them; this is also
    /// how long an idle keep-alive connection stays open. Keep it above the load balancer's upstream keep-alive
    /// timeout (nginx: 60 s).
    pub header_timeout_ms: u64,
    /// API keys; when any is set, /v1 routes need `Authorization: Bearer <key>` or `X-API-Key: <key>`.
    pub api_keys: ApiKeys,
    /// A file with one API key per line (added to `api_keys`).
    pub api_keys_file: Option<PathBuf>,
    /// Operational routes reachable without a key when keys are set: any of "healthz", "readyz", "metrics".
    pub open_endpoints: Vec<String>,
    /// Origins allowed by CORS (`*` for any).
    pub cors_origins: Vec<String>,
    /// Limits per request.
    pub max_top_k: usize,
    pub max_targets: usize,
    pub max_methods: usize,
    /// The most forward-equivalents one explain request may cost: its explain pass, each multi-pass method's
    /// batches and each metric's, for every target (docs/METHODS.md gives the costs). Over it: 422 with the cost.
    pub max_forward_passes: u64,
    /// Score-CAM's channel cap (the highest-variance channels first); a request's `channels` may lower it. Unset:
    /// every channel of the layer.
    pub scorecam_max_channels: Option<usize>,
    /// On SIGTERM, readyz turns 503 and the server keeps accepting for this long, so load balancers see it
    /// before connections are refused.
    pub drain_delay_ms: u64,
    /// Then, how long in-flight and queued requests may take before the process exits.
    pub shutdown_grace_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Path of libonnxruntime.so; default: ORT_DYLIB_PATH, then .ort/ beside the project (scripts/fetch-ort.sh).
    pub ort_library: Option<PathBuf>,
    /// auto (CUDA when its execution provider registers, else CPU), cpu, or cuda (fail if unavailable).
    pub device: DeviceChoice,
    /// ONNX Runtime intra-op threads per session; 0 = one per core.
    pub threads: usize,
    pub cuda_device: i32,
    /// ONNX Runtime's CPU memory arena (default off: the plans of a model share the process heap's high-water
    /// mark instead of each keeping its own peak; see docs/OPERATIONS.md, "Memory").
    pub cpu_arena: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BatchingConfig {
    /// Most rows (image x target) in one ONNX Runtime run.
    pub max_batch: usize,
    /// How long the first request of a batch waits for others when the worker is free. 0 (the default, as in
    /// Triton's dynamic batcher): run at once; batches still form from the requests that arrive during a run.
    pub max_wait_ms: u64,
    /// Rows waiting per model beyond which requests get 429.
    pub queue_capacity: usize,
}

/// Asynchronous jobs (`Prefer: respond-async`, `?async=true`; `core::jobs`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct JobsConfig {
    /// A job's own deadline (its estimate must fit it; its batches stop there).
    pub timeout_ms: u64,
    /// Jobs queued or running at once, over all models and keys (429 with Retry-After above).
    pub max_running: usize,
    /// Jobs kept (running or finished with their results) at once; the oldest finished ones go first, and with none
    /// to drop a new job is a 503 with Retry-After.
    pub max_kept: usize,
    /// How long a finished job's result is kept (410 after).
    pub ttl_ms: u64,
}

impl Default for JobsConfig {
    fn default() -> Self {
        JobsConfig { timeout_ms: 600_000, max_running: 4, max_kept: 64, ttl_ms: 600_000 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub name: String,
    pub path: PathBuf,
    /// A text file with one class label per line.
    #[serde(default)]
    pub labels: Option<PathBuf>,
    /// Normalisation, per channel: `(pixel * scale - mean) / std`. Unset: the task's default (ImageNet's for a
    /// classifier; 0 and 1 for an Ultralytics detector, which takes pixels / 255).
    #[serde(default)]
    pub mean: Option<[f32; 3]>,
    #[serde(default)]
    pub std: Option<[f32; 3]>,
    /// Target layer when a request names none (default: the last 4-D tensor with spatial size > 1).
    #[serde(default)]
    pub default_layer: Option<String>,
    /// [height, width] for models whose input size is dynamic.
    #[serde(default)]
    pub input_size: Option<[i64; 2]>,
    /// The image input's layout, `nchw` or `nhwc` (default: detected from the declared shape; `[N, H, W, 3]` is
    /// NHWC). camserve always feeds NCHW: an NHWC model gets a leading Transpose.
    #[serde(default)]
    pub layout: Option<InputLayout>,
    /// The channel order the model was trained on: `rgb`, or `bgr` (Caffe-style and many Keras models).
    #[serde(default)]
    pub channel_order: ChannelOrder,
    /// The pixel range `mean` and `std` apply to: 1 (pixels in [0, 1], torchvision) or 255 (pixels in [0, 255],
    /// Caffe/Keras `preprocess_input`): the input is `(pixel * scale - mean) / std` per channel, in the model's
    /// channel order.
    #[serde(default = "one")]
    pub scale: f32,
    /// How an upload is brought to the input size: `stretch` (both sides scaled), `shorter_side_then_center_crop`
    /// (torchvision's `Resize(s)` + `CenterCrop`, the usual ImageNet evaluation), `letterbox` (Ultralytics') or
    /// `scale_fill` (Ultralytics' stretch, OpenCV's bilinear). Unset: the task's default (`stretch` for a classifier
    /// and a DETR, `letterbox` for an Ultralytics YOLO, `scale_fill` for an Ultralytics RT-DETR).
    #[serde(default)]
    pub resize: Option<ResizePolicy>,
    /// The shorter side before the centre crop (default: the input's larger side x 256 / 224, e.g. 256 for 224).
    #[serde(default)]
    pub resize_shorter_side: Option<u32>,
    /// What the model's outputs are: `classification`, `detection`, `segmentation` or `multilabel`. Unset: read
    /// from the file (Ultralytics' `task` metadata; a `[N, classes, h, w]` output is a segmentation; a `[N, K]`
    /// output made by a Sigmoid is a multi-label classifier), else classification.
    #[serde(default)]
    pub task: Option<TaskName>,
    /// Detectors: the output layout, where the file does not say it (an export without Ultralytics' metadata):
    /// `ultralytics` (raw head [N, 4 + classes, anchors]), `ultralytics_end2end` ([N, rows, 6] in input pixels),
    /// `ultralytics_rtdetr` ([N, rows, 6] normalised centre boxes) or `detr` (outputs `logits` and `pred_boxes`).
    /// Implies `task = "detection"`. Unset: recognised from the file.
    #[serde(default)]
    pub detection_format: Option<FormatName>,
    /// Detectors: the score a detection needs (default: the exporter's own, Ultralytics' 0.25). Multi-label
    /// classifiers: the sigmoid score a class needs to be explained by default (default 0.5).
    #[serde(default)]
    pub score_threshold: Option<f32>,
    /// Detectors: the IoU above which NMS drops the weaker of two boxes of a class (default 0.7).
    #[serde(default)]
    pub iou_threshold: Option<f32>,
    /// Detectors: the most detections per image (default 300).
    #[serde(default)]
    pub max_detections: Option<usize>,
}

/// The `task` key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskName {
    Classification,
    Detection,
    Segmentation,
    Multilabel,
    Embedding,
}

/// The `detection_format` key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FormatName {
    Ultralytics,
    #[serde(rename = "ultralytics_end2end")]
    UltralyticsEndToEnd,
    UltralyticsRtdetr,
    Detr,
    DetrSigmoid,
    Torchvision,
}

fn one() -> f32 {
    1.0
}

impl ModelConfig {
    /// A model file with the defaults a `[[models]]` table gets for the keys it leaves out: no labels, ImageNet's
    /// mean and std on [0, 1] RGB pixels, stretched to the input size, the default layer.
    pub fn new(name: impl Into<String>, path: impl Into<PathBuf>) -> ModelConfig {
        ModelConfig {
            name: name.into(),
            path: path.into(),
            labels: None,
            mean: None,
            std: None,
            default_layer: None,
            input_size: None,
            layout: None,
            channel_order: ChannelOrder::Rgb,
            scale: 1.0,
            resize: None,
            resize_shorter_side: None,
            task: None,
            detection_format: None,
            score_threshold: None,
            iou_threshold: None,
            max_detections: None,
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            bind: "0.0.0.0:8080".into(),
            body_limit_bytes: 20 << 20,
            max_image_pixels: 40_000_000,
            max_image_dimension: 16_384,
            request_timeout_ms: 30_000,
            body_timeout_ms: 30_000,
            header_timeout_ms: 75_000,
            api_keys: ApiKeys::default(),
            api_keys_file: None,
            open_endpoints: vec!["healthz".into(), "readyz".into(), "metrics".into()],
            cors_origins: vec![],
            max_top_k: 10,
            max_targets: 10,
            max_methods: 22,
            // A full Score-CAM on ResNet-50's last layer (2,048 masked forwards + the explain pass) with room for a
            // deletion and an insertion curve (2 x 225).
            max_forward_passes: 4096,
            scorecam_max_channels: None,
            drain_delay_ms: 1_000,
            shutdown_grace_ms: 30_000,
        }
    }
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig { ort_library: None, device: DeviceChoice::Auto, threads: 0, cuda_device: 0, cpu_arena: false }
    }
}

impl Default for BatchingConfig {
    fn default() -> Self {
        BatchingConfig { max_batch: 8, max_wait_ms: 0, queue_capacity: 64 }
    }
}

impl Default for Config {
    /// Serves the bundled models: `imagenet` (EfficientNet-Lite0, ImageNet-1k), `demo` (six shapes), `shapes` (a
    /// detector of the same shapes; its task, labels and preprocessing come from the file) and `segmenter` (a semantic
    /// segmenter of the same scenes; its task from the output's shape) and `embedder` (an embedder of the demo's pictures; its
    /// task from its output's name, `embedding`) and `multilabel` (which of the shapes a scene holds; its task from its
    /// final Sigmoid).
    fn default() -> Self {
        Config {
            server: ServerConfig::default(),
            runtime: RuntimeConfig::default(),
            batching: BatchingConfig::default(),
            jobs: JobsConfig::default(),
            models: vec![
                ModelConfig {
                    labels: Some("models/imagenet.labels.txt".into()),
                    mean: Some([127.0 / 255.0; 3]),
                    std: Some([128.0 / 255.0; 3]),
                    resize: Some(ResizePolicy::ShorterSideThenCenterCrop),
                    ..ModelConfig::new("imagenet", "models/imagenet.onnx")
                },
                ModelConfig {
                    labels: Some("models/demo.labels.txt".into()),
                    mean: Some(IMAGENET_MEAN),
                    std: Some(IMAGENET_STD),
                    ..ModelConfig::new("demo", "models/demo.onnx")
                },
                ModelConfig::new("shapes", "models/shapes_detector.onnx"),
                ModelConfig { labels: Some("models/shapes_segmenter.labels.txt".into()), ..ModelConfig::new("segmenter", "models/shapes_segmenter.onnx") },
                ModelConfig { mean: Some(IMAGENET_MEAN), std: Some(IMAGENET_STD), ..ModelConfig::new("embedder", "models/shapes_embedder.onnx") },
                ModelConfig { labels: Some("models/shapes_multilabel.labels.txt".into()), ..ModelConfig::new("multilabel", "models/shapes_multilabel.onnx") },
            ],
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Figment(#[from] Box<figment::Error>),
    #[error("configuration key `{key}`: {reason}")]
    Invalid { key: String, reason: String },
}

fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.into(), reason: reason.into() }
}

impl Config {
    /// Defaults, then `file` (if any), then `CAMSERVE_*` variables, then `overrides` (command-line flags).
    pub fn load(file: Option<&Path>, overrides: Figment) -> Result<Config, ConfigError> {
        let mut f = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            if !file.is_file() {
                return Err(invalid("--config", format!("{} is not a file", file.display())));
            }
            // A file that lists models replaces the default (demo) model list.
            f = f.merge(Toml::file_exact(file));
        }
        f = f.merge(Env::prefixed("CAMSERVE_").split("__").ignore(&["config", "log_format", "log"]));
        f = f.merge(overrides);
        let config: Config = f.extract().map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.server.bind.parse::<SocketAddr>().map_err(|e| invalid("server.bind", e.to_string()))?;
        let positive = [
            ("server.body_limit_bytes", self.server.body_limit_bytes as u64),
            ("server.max_image_pixels", self.server.max_image_pixels),
            ("server.max_image_dimension", self.server.max_image_dimension as u64),
            ("server.request_timeout_ms", self.server.request_timeout_ms),
            ("server.body_timeout_ms", self.server.body_timeout_ms),
            ("server.header_timeout_ms", self.server.header_timeout_ms),
            ("server.max_top_k", self.server.max_top_k as u64),
            ("server.max_targets", self.server.max_targets as u64),
            ("server.max_methods", self.server.max_methods as u64),
            ("server.max_forward_passes", self.server.max_forward_passes),
            ("server.scorecam_max_channels", self.server.scorecam_max_channels.map_or(1, |c| c as u64)),
            ("batching.max_batch", self.batching.max_batch as u64),
            ("batching.queue_capacity", self.batching.queue_capacity as u64),
            ("jobs.timeout_ms", self.jobs.timeout_ms),
            ("jobs.max_running", self.jobs.max_running as u64),
            ("jobs.max_kept", self.jobs.max_kept as u64),
            ("jobs.ttl_ms", self.jobs.ttl_ms),
        ];
        for (key, v) in positive {
            if v == 0 {
                return Err(invalid(key, "must be greater than 0"));
            }
        }
        if self.models.is_empty() {
            return Err(invalid("models", "no model configured"));
        }
        let mut names = HashSet::new();
        for (i, m) in self.models.iter().enumerate() {
            let key = |k: &str| format!("models[{i}].{k}");
            if m.name.is_empty() || !m.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
                return Err(invalid(&key("name"), format!("`{}` must be non-empty and use only A-Z a-z 0-9 - _ .", m.name)));
            }
            if !names.insert(&m.name) {
                return Err(invalid(&key("name"), format!("`{}` is used twice", m.name)));
            }
            if m.std.iter().flatten().any(|&s| !s.is_finite() || s <= 0.0) || m.mean.iter().flatten().any(|v| !v.is_finite()) {
                return Err(invalid(&key("std"), "mean must be finite and std positive"));
            }
            if m.score_threshold.is_some_and(|t| !(0.0..=1.0).contains(&t)) {
                return Err(invalid(&key("score_threshold"), "must be between 0 and 1"));
            }
            if m.iou_threshold.is_some_and(|t| !(0.0..=1.0).contains(&t)) {
                return Err(invalid(&key("iou_threshold"), "must be between 0 and 1"));
            }
            if m.max_detections == Some(0) {
                return Err(invalid(&key("max_detections"), "must be at least 1"));
            }
            if m.resize_shorter_side == Some(0) {
                return Err(invalid(&key("resize_shorter_side"), "must be a positive number of pixels"));
            }
            if m.scale != 1.0 && m.scale != 255.0 {
                return Err(invalid(&key("scale"), "must be 1 (pixels in [0, 1]) or 255 (pixels in [0, 255])"));
            }
            if let Some([h, w]) = m.input_size
                && (h <= 0 || w <= 0) {
                    return Err(invalid(&key("input_size"), "height and width must be positive"));
                }
        }
        for e in &self.server.open_endpoints {
            if !["healthz", "readyz", "metrics"].contains(&e.as_str()) {
                return Err(invalid("server.open_endpoints", format!("`{e}` is not one of healthz, readyz, metrics")));
            }
        }
        for o in &self.server.cors_origins {
            if o != "*" && !(o.starts_with("http://") || o.starts_with("https://")) {
                return Err(invalid("server.cors_origins", format!("`{o}` is not an origin like https://example.com")));
            }
        }
        Ok(())
    }

    /// All API keys: `server.api_keys` plus the lines of `server.api_keys_file`.
    pub fn api_keys(&self) -> Result<ApiKeys, ConfigError> {
        let mut keys: Vec<String> = self.server.api_keys.0.iter().filter(|k| !k.is_empty()).cloned().collect();
        if let Some(file) = &self.server.api_keys_file {
            let text = std::fs::read_to_string(file).map_err(|e| invalid("server.api_keys_file", format!("{}: {e}", file.display())))?;
            keys.extend(text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_string));
        }
        Ok(ApiKeys(keys))
    }
}

/// Resolves a relative path against the working directory, else against the folders above the executable
/// (so `camserve serve` finds the bundled `models/` from the project root and from target/release).
pub fn resolve(path: &Path) -> PathBuf {
    if path.is_absolute() || path.exists() {
        return path.to_path_buf();
    }
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(4) {
            let p = dir.join(path);
            if p.exists() {
                return p;
            }
        }
    }
    path.to_path_buf()
}

/// Reads a labels file: one label per line, trailing empty lines ignored.
pub fn read_labels(path: &Path) -> Result<Vec<String>, std::io::Error> {
    let text = std::fs::read_to_string(path)?;
    let mut labels: Vec<String> = text.lines().map(|l| l.trim().to_string()).collect();
    while labels.last().is_some_and(|l| l.is_empty()) {
        labels.pop();
    }
    Ok(labels)
}

#[cfg(test)]
// figment::Jail's closures must return figment's own (large) error type.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    fn root() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
    }

    #[test]
    fn the_documented_file_is_the_defaults() {
        figment::Jail::expect_with(|_| {
            let c = Config::load(Some(&root().join("config/camserve.toml")), Figment::new()).map_err(|e| e.to_string())?;
            assert_eq!(c, Config::default());
            Ok(())
        });
    }

    fn load_err(toml: &str) -> String {
        let mut out = String::new();
        figment::Jail::expect_with(|jail| {
            jail.create_file("c.toml", toml)?;
            out = Config::load(Some(Path::new("c.toml")), Figment::new()).expect_err("must fail").to_string();
            Ok(())
        });
        out
    }

    #[test]
    fn invalid_values_name_their_key() {
        assert!(load_err("[server]\nbind = \"nowhere\"").contains("server.bind"));
        assert!(load_err("[batching]\nmax_batch = 0").contains("batching.max_batch"));
        assert!(load_err("[server]\nbnid = \"x\"").contains("bnid"));
        assert!(load_err("[runtime]\ndevice = \"tpu\"").contains("tpu"));
        assert!(load_err("[[models]]\nname = \"a b\"\npath = \"m.onnx\"").contains("models[0].name"));
        assert!(load_err("[[models]]\nname = \"a\"\npath = \"m.onnx\"\nstd = [1, 0, 1]").contains("models[0].std"));
        assert!(load_err("[server]\ncors_origins = [\"example.com\"]").contains("server.cors_origins"));
        assert!(load_err("[server]\nrequest_timeout_ms = -5").contains("request_timeout_ms"));
        assert!(load_err("[[models]]\nname = \"a\"\npath = \"m.onnx\"\nscale = 100").contains("models[0].scale"));
        assert!(load_err("[[models]]\nname = \"a\"\npath = \"m.onnx\"\nchannel_order = \"grb\"").contains("grb"));
        assert!(load_err("[[models]]\nname = \"a\"\npath = \"m.onnx\"\nlayout = \"chw\"").contains("chw"));
    }

    #[test]
    fn caffe_style_preprocessing_keys() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "c.toml",
                "[[models]]\nname = \"keras\"\npath = \"m.onnx\"\nlayout = \"nhwc\"\nchannel_order = \"bgr\"\nscale = 255\nmean = [103.939, 116.779, 123.68]\nstd = [1, 1, 1]",
            )?;
            let c = Config::load(Some(Path::new("c.toml")), Figment::new()).map_err(|e| e.to_string())?;
            let m = &c.models[0];
            assert_eq!(m.layout, Some(InputLayout::Nhwc));
            assert_eq!(m.channel_order, ChannelOrder::Bgr);
            assert_eq!(m.scale, 255.0);
            Ok(())
        });
    }

    #[test]
    fn environment_and_flags_override_the_file() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("c.toml", "[server]\nbind = \"127.0.0.1:1000\"\n[batching]\nmax_batch = 4")?;
            jail.set_env("CAMSERVE_SERVER__BIND", "127.0.0.1:2000");
            jail.set_env("CAMSERVE_BATCHING__MAX_WAIT_MS", "7");
            jail.set_env("CAMSERVE_CONFIG", "ignored-by-figment.toml");
            let c = Config::load(Some(Path::new("c.toml")), Figment::new()).map_err(|e| e.to_string())?;
            assert_eq!(c.server.bind, "127.0.0.1:2000");
            assert_eq!((c.batching.max_batch, c.batching.max_wait_ms), (4, 7));
            let flags = Figment::from(Serialized::default("server.bind", "127.0.0.1:3000"));
            let c = Config::load(Some(Path::new("c.toml")), flags).map_err(|e| e.to_string())?;
            assert_eq!(c.server.bind, "127.0.0.1:3000");
            Ok(())
        });
    }

    #[test]
    fn api_keys_from_a_file() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("keys", "# comment\nk1\n\n  k2  \n")?;
            let mut c = Config::default();
            c.server.api_keys = vec!["k0".to_string()].into();
            c.server.api_keys_file = Some("keys".into());
            assert_eq!(c.api_keys().map_err(|e| e.to_string())?.0, vec!["k0", "k1", "k2"]);
            Ok(())
        });
    }
}
