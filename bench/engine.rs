//! In-engine benchmark: explain graphs against the forward pass on the same model, batch sizes and device.
//!
//!     cargo run --release --bin camserve-bench -- --model resnet50.onnx --batch 1,8,32 [--device cpu|cuda]
//!
//! For each batch size it times `ModelRunner::run` (ONNX Runtime only: no decoding, no rendering) for the
//! forward graph, the Grad-CAM graph (exact layer chain) and the Grad-CAM + guided graph (plus the guided input
//! chain), and prints medians, images per second and the ratio to the forward pass as a Markdown table.

use std::time::Instant;

use camserve::backend::engine::{Batch, DeviceChoice, EngineOptions, ModelRunner, ModelSpec, PlanKey};
use camserve::onnx::rewrite::ExplainPlan;
use camserve::onnx::rules::ReluRule;
use clap::Parser;
use ndarray::{Array1, Array2, Array4};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    model: std::path::PathBuf,
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    batch: Vec<usize>,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Timed runs per (plan, batch); the median is reported.
    #[arg(long, default_value_t = 10)]
    iters: usize,
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Plans: forward, gradcam, guided (Grad-CAM + guided input gradient), all (plain, guided, deconvnet).
    #[arg(long, value_delimiter = ',', default_value = "forward,gradcam,guided")]
    plans: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // RUST_LOG=ort=debug shows ONNX Runtime's node placement (which nodes run on which execution provider).
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).with_writer(std::io::stderr).init();
    let device = match args.device.as_str() {
        "cpu" => DeviceChoice::Cpu,
        "cuda" => DeviceChoice::Cuda,
        _ => DeviceChoice::Auto,
    };
    let options = EngineOptions { device, intra_threads: args.threads, ort_library: None, cuda_device: 0, cpu_arena: false };
    let spec = ModelSpec::new("bench", args.model.clone(), camserve::config::IMAGENET_MEAN, camserve::config::IMAGENET_STD);
    let mut runner = ModelRunner::load(&spec, &options)?;
    let info = runner.info();
    let layer = info.default_layer.clone();
    let plan = |rules: &[ReluRule]| PlanKey::Explain(ExplainPlan::new(layer.clone(), rules.iter().copied()).with_target_selection());
    println!("model {} on {}, input {:?}, {} classes, layer {layer}", args.model.display(), info.device, info.input_shape, info.num_classes);
    println!();
    println!("| batch | plan | median ms | images/s | x forward |");
    println!("|---|---|---|---|---|");
    let [c, h, w] = info.input_shape;
    for &n in &args.batch {
        let images = Array4::from_shape_fn((n, c, h, w), |(i, j, y, x)| (((i * 7 + j * 13 + y * 3 + x) % 17) as f32 - 8.0) / 8.0);
        let batch = Batch { images, seeds: Array2::zeros((n, info.num_classes)), ranks: Array1::zeros(n) };
        let mut forward_ms = None;
        for name in &args.plans {
            let key = match name.as_str() {
                "forward" => PlanKey::Predict,
                "gradcam" => plan(&[]),
                "guided" => plan(&[ReluRule::Guided]),
                "all" => plan(&[ReluRule::Plain, ReluRule::Guided, ReluRule::Deconvnet]),
                other => anyhow::bail!("unknown plan {other}"),
            };
            runner.run(&key, &batch)?; // builds the session
            runner.run(&key, &batch)?; // warm-up
            let mut times: Vec<f64> = (0..args.iters)
                .map(|_| {
                    let t = Instant::now();
                    runner.run(&key, &batch).map(|_| t.elapsed().as_secs_f64() * 1000.0)
                })
                .collect::<Result<_, _>>()?;
            times.sort_by(|a, b| a.total_cmp(b));
            let med = times[times.len() / 2];
            if name == "forward" {
                forward_ms = Some(med);
            }
            let ratio = forward_ms.map(|f| format!("{:.2}", med / f)).unwrap_or_default();
            println!("| {n} | {name} | {med:.2} | {:.1} | {ratio} |", n as f64 * 1000.0 / med);
        }
    }
    Ok(())
}
