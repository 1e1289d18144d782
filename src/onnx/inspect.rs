//! `camserve inspect`: what a model looks like to the rewrite.

use std::fmt;

use super::contract::{contract_info, ContractInfo};
use super::proto::{tensor_shape_proto, type_proto, ModelProto, ValueInfoProto};
use super::rewrite::{Explainable, LayerInfo, PrepareOptions, UnsupportedOp};
use super::{default_opset, io, Result};

pub struct Inspection {
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub opset: Option<i64>,
    pub contract: Option<ContractInfo>,
    /// Present for plain classifiers.
    pub analysis: Option<Analysis>,
}

pub struct Analysis {
    pub upgraded_to: Option<i64>,
    pub logits: String,
    pub num_classes: usize,
    pub layers: Vec<LayerInfo>,
    pub default_layer: Option<String>,
    /// Nodes on the gradient path the rewrite refuses: ops without a rule, and attributes a rule cannot handle.
    pub unsupported: Vec<UnsupportedOp>,
    pub input_layout: super::rewrite::InputLayout,
    pub stripped_output_op: Option<String>,
    /// The first output's dims for one image, and the file's metadata: what a model's task is read from.
    pub output_dims: Vec<i64>,
    pub metadata: std::collections::BTreeMap<String, String>,
    /// `[C, H, W]`.
    pub input_shape: [usize; 3],
    /// The file fixes the batch at 1 (the probe at batch 2 failed): served one row per run.
    pub batch_fixed: bool,
}

impl Inspection {
    pub fn has_unsupported(&self) -> bool {
        self.analysis.as_ref().is_some_and(|a| !a.unsupported.is_empty())
    }
}

pub fn inspect(mut model: ModelProto, opts: &PrepareOptions, runner: &dyn super::probe::ProbeRunner) -> Result<Inspection> {
    io::drop_initializer_inputs(&mut model);
    let g = model.graph.as_ref();
    let inputs = g.map(|g| g.input.iter().map(describe).collect()).unwrap_or_default();
    let outputs = g.map(|g| g.output.iter().map(describe).collect()).unwrap_or_default();
    let opset = default_opset(&model);
    let contract = contract_info(&model);
    let analysis = if contract.is_some() {
        None
    } else {
        let ex = Explainable::analyse(model, opts, runner)?;
        Some(Analysis {
            upgraded_to: (ex.source_opset != ex.opset()).then(|| ex.opset()),
            logits: ex.logits.clone(),
            num_classes: ex.num_classes,
            layers: ex.layers.clone(),
            default_layer: ex.default_layer.clone(),
            unsupported: ex.refusals(),
            input_layout: ex.input_layout,
            stripped_output_op: ex.stripped_output_op.clone(),
            output_dims: ex.output_dims(),
            metadata: ex.metadata(),
            input_shape: [ex.input_dims[1] as usize, ex.input_dims[2] as usize, ex.input_dims[3] as usize],
            batch_fixed: ex.probe.batch_fixed,
        })
    };
    Ok(Inspection { inputs, outputs, opset, contract, analysis })
}

fn describe(vi: &ValueInfoProto) -> String {
    let dims = match vi.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(type_proto::Value::TensorType(t)) => t
            .shape
            .as_ref()
            .map(|s| {
                s.dim
                    .iter()
                    .map(|d| match &d.value {
                        Some(tensor_shape_proto::dimension::Value::DimValue(v)) => v.to_string(),
                        Some(tensor_shape_proto::dimension::Value::DimParam(p)) => p.clone(),
                        None => "?".into(),
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default(),
        _ => String::new(),
    };
    format!("{} [{dims}]", vi.name())
}

impl fmt::Display for Inspection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "opset: {}", self.opset.map(|o| o.to_string()).unwrap_or_else(|| "none".into()))?;
        writeln!(f, "inputs:")?;
        for i in &self.inputs {
            writeln!(f, "  {i}")?;
        }
        writeln!(f, "outputs:")?;
        for o in &self.outputs {
            writeln!(f, "  {o}")?;
        }
        if let Some(c) = &self.contract {
            writeln!(f, "explain model (camserve.contract=1): layer {}, input-gradient rules [{}]", c.layer,
                c.rules.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(", "))?;
        }
        if let Some(a) = &self.analysis {
            if let Some(t) = a.upgraded_to {
                writeln!(f, "the rewrite upgrades the model to opset {t}")?;
            }
            if a.batch_fixed {
                writeln!(f, "batch: fixed at 1 in the file: served one row per run (max_batch 1); the rewrite treats no axis as the batch")?;
            } else {
                writeln!(f, "batch: dynamic")?;
            }
            if a.input_layout == super::rewrite::InputLayout::Nhwc {
                writeln!(f, "input layout: NHWC (camserve feeds NCHW through a Transpose)")?;
            }
            // One image's output: `K classes` for a classifier's `[K]`, the dims otherwise (a detector's head,
            // a segmenter's class maps).
            let size = match a.output_dims.as_slice() {
                [k] => format!("{k} classes"),
                dims => format!("{dims:?} per image"),
            };
            match &a.stripped_output_op {
                Some(op) => writeln!(f, "logits: {} ({size}), the scores before the final {op}", a.logits)?,
                None => writeln!(f, "logits: {} ({size})", a.logits)?,
            }
            writeln!(f, "candidate layers ({}):", a.layers.len())?;
            for l in &a.layers {
                let mark = if Some(&l.name) == a.default_layer.as_ref() { "  (default)" } else { "" };
                let layout = match l.layout {
                    super::rewrite::LayerLayout::Nchw => String::new(),
                    super::rewrite::LayerLayout::Nhwc => " nhwc".into(),
                    super::rewrite::LayerLayout::Tokens { prefix } => format!(" tokens, {prefix} before the grid"),
                };
                let module = l.module.as_ref().map(|m| format!(" module {m}")).unwrap_or_default();
                writeln!(f, "  {} [{}, {}, {}]{layout}{module}{mark}", l.name, l.dims[1], l.dims[2], l.dims[3])?;
            }
            match &a.default_layer {
                Some(d) => writeln!(f, "default layer: {d}")?,
                None => writeln!(f, "default layer: none (no tensor on a spatial grid larger than 1x1)")?,
            }
            if a.unsupported.is_empty() {
                writeln!(f, "unsupported ops: none")?;
            } else {
                writeln!(f, "unsupported ops on the gradient path ({}):", a.unsupported.len())?;
                for u in &a.unsupported {
                    match &u.reason {
                        None => writeln!(f, "  {} (node `{}`): no backward rule", u.op, u.node)?,
                        Some(r) => writeln!(f, "  {} (node `{}`): {r}", u.op, u.node)?,
                    }
                }
            }
        }
        Ok(())
    }
}
