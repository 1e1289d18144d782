use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use camserve::backend::engine::DeviceChoice;
use camserve::config::{Config, ModelConfig};
use camserve::core::answer::Answer;
use camserve::core::options::RawOptions;
use camserve::core::pipeline::{Endpoint, Service};
use camserve::methods::params;
use camserve::onnx::rewrite::{ExplainPlan, PrepareOptions};
use camserve::onnx::rules::ReluRule;
use camserve::onnx::{contract, io};
use clap::{Parser, Subcommand};
use figment::providers::Serialized;
use figment::Figment;

#[derive(Parser)]
#[command(name = "camserve", version, about = "Visual explanations (Grad-CAM and friends) for ONNX image classifiers")]
struct Cli {
    /// Log format: text or json.
    #[arg(long, global = true, env = "CAMSERVE_LOG_FORMAT", default_value = "text")]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP API. With no arguments: the bundled demo model on 0.0.0.0:8080.
    Serve {
        /// TOML configuration file (see config/camserve.toml).
        #[arg(long, env = "CAMSERVE_CONFIG")]
        config: Option<PathBuf>,
        /// A model to serve as NAME=PATH (repeatable); replaces the configured models.
        #[arg(long = "model", value_name = "NAME=PATH")]
        models: Vec<String>,
        /// Address to listen on (server.bind).
        #[arg(long)]
        bind: Option<String>,
        /// auto, cpu or cuda (runtime.device).
        #[arg(long)]
        device: Option<String>,
        /// ONNX Runtime intra-op threads per session (runtime.threads).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Rewrite a plain classifier into an explain model (docs/DESIGN.md §3).
    Augment {
        input: PathBuf,
        #[arg(short, long)]
        output: PathBuf,
        /// Target tensor (default: the last 4-D tensor with spatial size > 1).
        #[arg(long)]
        layer: Option<String>,
        /// Input-gradient rules to include: guided, deconvnet, plain (comma-separated; "none" for none).
        #[arg(long, value_delimiter = ',', default_value = "guided")]
        rules: Vec<String>,
        /// Input height and width (HxW), for models whose input size is dynamic.
        #[arg(long)]
        input_size: Option<String>,
    },
    /// Print inputs, outputs, opset, candidate layers and unsupported ops (exit 2 if any).
    Inspect {
        input: PathBuf,
        #[arg(long)]
        input_size: Option<String>,
    },
    /// Explain one image offline: writes the HTTP API's JSON and the PNG files.
    Explain {
        /// An ONNX file (ImageNet mean/std, stretched to the input size), or a bundled model's name (`imagenet`,
        /// `demo`, the detector `shapes`) with its own labels, normalisation and resize policy.
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        image: PathBuf,
        /// An embedder's reference image (repeatable: several are compared through their mean direction); every
        /// image is explained, the references' files named `ref<i>_...`.
        #[arg(long = "reference")]
        references: Vec<PathBuf>,
        /// An embedder's reference vector: comma-separated numbers, or `@FILE` holding them (commas or whitespace).
        #[arg(long)]
        reference_vector: Option<String>,
        /// Method (repeatable).
        #[arg(long = "method", ignore_case = true, value_parser = clap::builder::PossibleValuesParser::new(camserve::methods::Method::ALL.map(camserve::methods::Method::as_str)))]
        methods: Vec<String>,
        /// Class index or label (repeatable); default: the top prediction.
        #[arg(long = "target")]
        targets: Vec<String>,
        #[arg(long)]
        top_k: Option<i64>,
        #[arg(long)]
        layer: Option<String>,
        /// heatmap, overlay, mask, raw, curves (comma-separated).
        #[arg(long, value_delimiter = ',')]
        outputs: Vec<String>,
        #[arg(long)]
        colormap: Option<String>,
        #[arg(long)]
        alpha: Option<f64>,
        /// model or original.
        #[arg(long)]
        size: Option<String>,
        /// Faithfulness metrics: deletion, insertion, confidence_change or all (comma-separated).
        #[arg(long, value_delimiter = ',')]
        metrics: Vec<String>,
        /// The methods' own parameters, one flag each (`--steps`, `--samples`, ...), from their declarations.
        #[command(flatten)]
        params: ParamArgs,
        /// A labels file (one label per line).
        #[arg(long)]
        labels: Option<PathBuf>,
        /// Input height and width (HxW), for models whose input size is dynamic.
        #[arg(long)]
        input_size: Option<String>,
        #[arg(long, default_value = "camserve-out")]
        out: PathBuf,
    },
}

/// One `--<name>` flag per declared method parameter (`methods::params`), its help and default from the
/// declaration: a method's new parameter needs no edit here.
#[derive(Debug, Clone, Default)]
struct ParamArgs(Vec<(&'static str, String)>);

impl clap::FromArgMatches for ParamArgs {
    fn from_arg_matches(m: &clap::ArgMatches) -> Result<Self, clap::Error> {
        Ok(ParamArgs(params::all().into_iter().filter_map(|p| Some((p.name, m.get_one::<String>(p.name)?.clone()))).collect()))
    }
    fn update_from_arg_matches(&mut self, m: &clap::ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

impl clap::Args for ParamArgs {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        params::all().into_iter().fold(cmd, |cmd, p| {
            let help = match p.default_text() {
                Some(d) => format!("{} ({}; default {d})", p.help, p.range_text()),
                None => format!("{} ({})", p.help, p.range_text()),
            };
            cmd.arg(clap::Arg::new(p.name).long(p.name).value_name(p.name).help(help))
        })
    }
    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

fn parse_size(s: &Option<String>) -> anyhow::Result<Option<(i64, i64)>> {
    let Some(s) = s else { return Ok(None) };
    let (h, w) = s.split_once(['x', 'X']).context("input size must look like 224x224")?;
    Ok(Some((h.trim().parse()?, w.trim().parse()?)))
}

fn init_logging(format: &str, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| format!("{default_level},ort=warn").into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The server logs its life; the one-shot commands only warnings.
    init_logging(&cli.log_format, if matches!(cli.command, Command::Serve { .. }) { "info" } else { "warn" });
    // A panic is a bug; it goes to the log like everything else (one line, JSON when asked for), not raw stderr.
    std::panic::set_hook(Box::new(|info| tracing::error!(panic = %info, "panic")));
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve { config, models, bind, device, threads } => serve(config, models, bind, device, threads),
        Command::Augment { input, output, layer, rules, input_size } => augment(input, output, layer, rules, input_size),
        Command::Inspect { input, input_size } => {
            let model = io::load_model(&input)?;
            let report = camserve::backend::probe::inspect(model, &PrepareOptions { input_size: parse_size(&input_size)?, layout: None })?;
            print!("{report}");
            if let Some(a) = &report.analysis {
                println!("{}", describe_task(a));
            }
            Ok(if report.has_unsupported() { ExitCode::from(2) } else { ExitCode::SUCCESS })
        }
        Command::Explain {
            model, image, references, reference_vector, methods, targets, top_k, layer, outputs, colormap, alpha, size, metrics, params, labels, input_size, out,
        } => {
            let (name, config) = explain_config(model, labels, &input_size)?;
            let mut raw = RawOptions::default();
            for m in &methods {
                raw.set_text("methods", m)?;
            }
            for t in &targets {
                raw.set_text("target", t)?;
            }
            raw.top_k = top_k;
            raw.layer = layer;
            raw.outputs = (!outputs.is_empty()).then_some(outputs);
            (raw.colormap, raw.alpha, raw.size) = (colormap, alpha, size);
            raw.metrics = (!metrics.is_empty()).then_some(metrics);
            for (name, value) in &params.0 {
                raw.set_text(name, value)?;
            }
            if let Some(v) = reference_vector {
                let text = match v.strip_prefix('@') {
                    Some(path) => std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?,
                    None => v,
                };
                let joined = text.split(|c: char| c == ',' || c.is_whitespace()).filter(|t| !t.is_empty()).collect::<Vec<_>>().join(",");
                raw.set_text("reference_vector", &joined)?;
            }
            let bytes = std::fs::read(&image).with_context(|| format!("reading {}", image.display()))?;
            let references = references
                .iter()
                .map(|p| {
                    let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
                    Ok(camserve::core::pipeline::Reference { name: p.display().to_string(), image: camserve::core::pipeline::ImageInput::Encoded(bytes.into()) })
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let answer = explain_offline(config, &name, bytes, references, raw)?;
            write_explanation(&answer, &out)?;
            let found = match &answer.result {
                camserve::core::answer::TaskResult::Classification(c) => c.top.first().map(|t| format!("{} ({:.3})", t.label.clone().unwrap_or_else(|| t.index.to_string()), t.score)),
                camserve::core::answer::TaskResult::Detection(d) => Some(format!("{} detections", d.len())),
                camserve::core::answer::TaskResult::Segmentation(s) => Some(format!(
                    "{} classes in the label map ({})",
                    s.classes.len(),
                    s.classes.iter().take(3).map(|c| format!("{} {:.1}%", c.label.clone().unwrap_or_else(|| c.index.to_string()), 100.0 * c.fraction)).collect::<Vec<_>>().join(", ")
                )),
                camserve::core::answer::TaskResult::Embedding(e) => Some(match e.similarity {
                    Some(s) => format!("a {}-dimensional embedding, similarity {s:.4} to the reference", e.vector.len()),
                    None => format!("a {}-dimensional embedding", e.vector.len()),
                }),
            };
            eprintln!("{}: {}; wrote {} explanations to {}", image.display(), found.unwrap_or_default(), answer.explanations.as_ref().map_or(0, Vec::len), out.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `inspect`'s line on the task it recognised from the file (what `serve` would do without configuration).
fn describe_task(a: &camserve::onnx::inspect::Analysis) -> String {
    use camserve::core::task::{self, DetectionFormat, Task};
    match Task::recognise_from(&a.metadata, &a.output_dims, a.num_classes, a.input_shape, &Default::default()) {
        Ok(Task::Classification) => format!("task: classification ({} classes)", a.num_classes),
        Ok(Task::Detection(d)) => {
            let (classes, rows) = match d.format {
                DetectionFormat::UltralyticsRaw { classes, anchors } => (classes, format!("{anchors} anchors")),
                DetectionFormat::UltralyticsEndToEnd { classes, rows } => (classes, format!("{rows} rows selected in the graph, no NMS")),
                DetectionFormat::UltralyticsRtDetr { classes, rows } => (classes, format!("{rows} rows selected in the graph, no NMS")),
                DetectionFormat::Detr { classes, queries } => (classes, format!("{queries} queries, softmax with \"no object\" last, no NMS; outputs `logits` and `pred_boxes` joined")),
                DetectionFormat::DetrSigmoid { classes, queries } => (classes, format!("{queries} queries, a sigmoid per class, the best (query, class) pairs, no NMS; outputs `logits` and `pred_boxes` joined")),
                DetectionFormat::Torchvision { classes, rows } => {
                    (classes, format!("boxes, scores and labels joined into {rows} rows; thresholds and NMS inside the graph"))
                }
            };
            let layer = task::detector_layer_of(d.format, &a.layers, a.input_shape).unwrap_or_else(|| a.default_layer.clone().unwrap_or_default());
            format!(
                "task: detection (format {}: {classes} classes{}, {rows}; score_threshold {}, iou_threshold {}, max_detections {}; default method hirescam at {layer})",
                d.format.as_str(),
                if d.labels.is_some() { " named in the file" } else { "" },
                d.thresholds.score,
                d.thresholds.iou,
                d.thresholds.max_detections
            )
        }
        Ok(Task::Segmentation(s)) => format!(
            "task: segmentation ({} classes on a {}x{} output grid{}; default method gradcam, hirescam with a region, at {})",
            s.classes,
            s.grid[1],
            s.grid[0],
            if s.labels.is_some() { ", labelled" } else { "" },
            a.default_layer.clone().unwrap_or_default()
        ),
        Ok(Task::Embedding(e)) => format!(
            "task: embedding ({}-dimensional vectors{}; explain needs a reference image or vector; default method gradcam at {})",
            e.dim,
            if e.normalised { ", L2-normalised in the graph" } else { "" },
            a.default_layer.clone().unwrap_or_default()
        ),
        Ok(Task::MultiLabel(m)) => format!(
            "task: multilabel ({} classes, each scored by {}; default targets: every class scoring >= {})",
            m.classes,
            if m.sigmoid_in_graph { "the model's own final Sigmoid" } else { "the sigmoid of its logit" },
            m.threshold
        ),
        Err(e) => format!("task: refused: {e}"),
    }
}

fn serve(config: Option<PathBuf>, models: Vec<String>, bind: Option<String>, device: Option<String>, threads: Option<usize>) -> anyhow::Result<ExitCode> {
    let mut overrides = Figment::new();
    if !models.is_empty() {
        let list: Vec<ModelConfig> = models
            .iter()
            .map(|m| {
                let (name, path) = m.split_once('=').with_context(|| format!("--model `{m}`: expected NAME=PATH"))?;
                Ok(ModelConfig::new(name, path))
            })
            .collect::<anyhow::Result<_>>()?;
        overrides = overrides.merge(Serialized::default("models", list));
    }
    if let Some(b) = bind {
        overrides = overrides.merge(Serialized::default("server.bind", b));
    }
    if let Some(d) = device {
        overrides = overrides.merge(Serialized::default("runtime.device", d));
    }
    if let Some(t) = threads {
        overrides = overrides.merge(Serialized::default("runtime.threads", t));
    }
    let config = Config::load(config.as_deref(), overrides)?;
    // Decoding and rendering run on blocking threads; a bounded pool keeps a flood from growing one
    // thread (and one allocator arena) per waiting request.
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().max_blocking_threads((4 * cores).max(8)).build()?;
    rt.block_on(camserve::server::serve(config))?;
    Ok(ExitCode::SUCCESS)
}

fn augment(input: PathBuf, output: PathBuf, layer: Option<String>, rules: Vec<String>, input_size: Option<String>) -> anyhow::Result<ExitCode> {
    let started = std::time::Instant::now();
    let model = io::load_model(&input)?;
    if contract::contract_info(&model).is_some() {
        eprintln!("{} already is an explain model; copying it unchanged", input.display());
        io::save_model(&model, &output)?;
        return Ok(ExitCode::SUCCESS);
    }
    let rules = rules
        .iter()
        .filter(|r| !r.is_empty() && r.as_str() != "none")
        .map(|r| ReluRule::parse(r).with_context(|| format!("unknown rule `{r}` (guided, deconvnet, plain)")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let ex = camserve::backend::probe::analyse(model, &PrepareOptions { input_size: parse_size(&input_size)?, layout: None })?;
    let layer = match layer.or(ex.default_layer.clone()) {
        Some(l) => l,
        None => anyhow::bail!("the model has no 4-D layer with spatial size > 1; pass --layer"),
    };
    let out = ex.build(&ExplainPlan::new(layer.clone(), rules))?;
    io::save_model(&out, &output)?;
    eprintln!("wrote {} (layer {layer}) in {:.2} s", output.display(), started.elapsed().as_secs_f64());
    Ok(ExitCode::SUCCESS)
}

/// `explain`'s one model: a file (ImageNet normalisation, stretched), or a bundled model by name with its labels,
/// normalisation and resize policy.
fn explain_config(model: PathBuf, labels: Option<PathBuf>, input_size: &Option<String>) -> anyhow::Result<(String, Config)> {
    let stem = model.file_stem().and_then(|s| s.to_str()).unwrap_or("model").replace(|c: char| !c.is_ascii_alphanumeric() && c != '-' && c != '_', "_");
    let mut config = Config::default();
    config.runtime.device = DeviceChoice::Auto;
    let bundled = (!model.exists()).then(|| config.models.iter().find(|m| m.name.as_str() == model.as_os_str())).flatten().cloned();
    let size = parse_size(input_size)?.map(|(h, w)| [h, w]);
    let m = match bundled {
        Some(mut m) => {
            m.labels = labels.or(m.labels);
            m.input_size = size.or(m.input_size);
            m
        }
        None => ModelConfig { labels, input_size: size, ..ModelConfig::new(stem, model) },
    };
    let name = m.name.clone();
    config.models = vec![m];
    config.validate()?;
    Ok((name, config))
}

/// Loads the one model and explains the image, as the server would.
fn explain_offline(config: Config, name: &str, image: Vec<u8>, references: Vec<camserve::core::pipeline::Reference>, raw: RawOptions) -> anyhow::Result<Answer> {
    let config_timeout_ms = config.jobs.timeout_ms;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let service = Service::new(camserve::core::loading::service_limits(&config));
        let handle = tokio::runtime::Handle::current();
        let models = tokio::task::spawn_blocking(move || {
            let _g = handle.enter();
            camserve::core::loading::load_models(&config)
        })
        .await??;
        service.install(models);
        let image = camserve::core::pipeline::ImageInput::Encoded(image.into());
        // The command line waits as long as a job may run (jobs.timeout_ms), with a progress bar on a terminal for
        // multi-pass work (more than a few passes).
        let timeout = std::time::Duration::from_millis(config_timeout_ms);
        let planned = service.assess(name, Endpoint::Explain, &raw, timeout)?.cost;
        let progress = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let bar = (planned > 12).then(|| {
            let bar = indicatif::ProgressBar::new(planned);
            if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} passes, {eta} left") {
                bar.set_style(style);
            }
            bar
        });
        let ticker = bar.clone().map(|bar| {
            let progress = progress.clone();
            tokio::spawn(async move {
                loop {
                    bar.set_position(progress.load(std::sync::atomic::Ordering::Relaxed).min(bar.length().unwrap_or(u64::MAX)));
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            })
        });
        let run = camserve::core::pipeline::Run { timeout: Some(timeout), progress: Some(progress), background: false };
        let answer = service.handle_run(name, Endpoint::Explain, image, references, raw, run).await;
        if let Some(t) = ticker {
            t.abort();
        }
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        answer.map_err(anyhow::Error::from)
    })
}

/// The CLI's encoder: the API v1 JSON as `explanation.json`, and each picture as its PNG file.
fn write_explanation(answer: &Answer, out: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out)?;
    // Through a `Value`, as before the encoders existed: the file's keys stay sorted.
    let json = serde_json::to_value(camserve::api::v1::encode(answer))?;
    std::fs::write(out.join("explanation.json"), serde_json::to_string_pretty(&json)?)?;
    if let camserve::core::answer::TaskResult::Segmentation(s) = &answer.result {
        std::fs::write(out.join("segmentation.png"), &s.mask_png)?;
    }
    for e in answer.explanations.iter().flatten() {
        let target = match &e.target {
            camserve::core::answer::ExplainedTarget::Class { index, .. } => index.to_string(),
            camserve::core::answer::ExplainedTarget::Detection { index, .. } => format!("det{index}"),
            camserve::core::answer::ExplainedTarget::Segment { index, .. } => format!("seg{index}"),
            camserve::core::answer::ExplainedTarget::Similarity { reference: None, .. } => "query".to_string(),
            camserve::core::answer::ExplainedTarget::Similarity { reference: Some(i), .. } => format!("ref{i}"),
        };
        let stem = format!("{}_{}", e.method.as_str().replace('+', "p"), target);
        for (kind, png) in [("heatmap", &e.heatmap_png), ("overlay", &e.overlay_png), ("mask", &e.mask_png)] {
            if let Some(png) = png {
                std::fs::write(out.join(format!("{stem}_{kind}.png")), png)?;
            }
        }
    }
    Ok(())
}
