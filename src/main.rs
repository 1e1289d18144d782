use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use camserve::onnx::rewrite::{ExplainPlan, Explainable, PrepareOptions};
use camserve::onnx::rules::ReluRule;
use camserve::onnx::{contract, inspect, io};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "camserve", version, about = "Visual explanations for ONNX image classifiers")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Rewrite a plain classifier into an explain model (design §3).
    Augment {
        input: PathBuf,
        #[arg(short, long)]
        output: PathBuf,
        /// Target tensor (default: the last 4-D tensor with spatial size > 1).
        #[arg(long)]
        layer: Option<String>,
        /// Input-gradient rules to include: guided, deconvnet, plain.
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
}

fn parse_size(s: &Option<String>) -> anyhow::Result<Option<(i64, i64)>> {
    let Some(s) = s else { return Ok(None) };
    let (h, w) = s.split_once(['x', 'X']).context("input size must look like 224x224")?;
    Ok(Some((h.trim().parse()?, w.trim().parse()?)))
}

fn main() -> ExitCode {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).with_writer(std::io::stderr).init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Augment { input, output, layer, rules, input_size } => {
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
            let ex = Explainable::analyse(model, &PrepareOptions { input_size: parse_size(&input_size)? })?;
            let layer = match layer.or(ex.default_layer.clone()) {
                Some(l) => l,
                None => anyhow::bail!("the model has no 4-D layer with spatial size > 1; pass --layer"),
            };
            let out = ex.build(&ExplainPlan::new(layer.clone(), rules))?;
            io::save_model(&out, &output)?;
            eprintln!("wrote {} (layer {layer}) in {:.2} s", output.display(), started.elapsed().as_secs_f64());
            Ok(ExitCode::SUCCESS)
        }
        Command::Inspect { input, input_size } => {
            let model = io::load_model(&input)?;
            let report = inspect::inspect(model, &PrepareOptions { input_size: parse_size(&input_size)? })?;
            print!("{report}");
            Ok(if report.has_unsupported() { ExitCode::from(2) } else { ExitCode::SUCCESS })
        }
    }
}
