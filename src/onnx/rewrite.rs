//! The explain-graph rewrite (design §1-§3).
//!
//! [`Explainable::analyse`] takes a plain classifier, upgrades it to opset 17+, probes its shapes with ONNX
//! Runtime and finds the gradient path, candidate layers and unsupported ops. [`Explainable::build`] then
//! writes, for one [`ExplainPlan`], a model that returns the logits, the layer's activations, their exact
//! gradients and the requested input gradients, for a batch where every item has its own seed row.
//!
//! Each backward chain is a reverse topological walk from the logits: the gradients reaching a tensor from
//! several consumers are summed, and each node's rule (see [`super::rules`]) turns its outputs' gradients into
//! its inputs' gradients. `camserve.gradients` always comes from a chain with the exact ReLU derivative; a
//! guided or deconvnet input gradient is a separate chain.

use std::collections::{HashMap, HashSet};

use super::builder::Emitter;
use super::contract::{self, ACTIVATIONS, GRADIENTS, SEED};
use super::graph::{node_label, GraphIndex};
use super::probe::{probe, Probe};
use super::proto::{tensor_shape_proto, type_proto, ModelProto, TensorShapeProto, TypeProto, ValueInfoProto};
use super::rules::{self, ReluRule, RuleCtx};
use super::{io, tensor, upgrade, OnnxError, Result};

/// What one explain graph computes: the target layer and the input-gradient rules (possibly none).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ExplainPlan {
    pub layer: String,
    pub rules: Vec<ReluRule>,
    /// Adds the input `camserve.target_rank [N] int64`: a row with rank r >= 0 uses the one-hot of its r-th
    /// highest logit as its seed (so "explain the top prediction" needs one run, not a forward pass first);
    /// a row with rank < 0 uses its `camserve.seed` row. Also adds the output `camserve.target_index [N]`.
    /// An engine-internal extension: files written by `camserve augment` follow the plain contract.
    pub select_targets: bool,
}

impl ExplainPlan {
    pub fn new(layer: impl Into<String>, rules: impl IntoIterator<Item = ReluRule>) -> Self {
        let mut rules: Vec<ReluRule> = rules.into_iter().collect();
        rules.sort();
        rules.dedup();
        ExplainPlan { layer: layer.into(), rules, select_targets: false }
    }

    pub fn with_target_selection(mut self) -> Self {
        self.select_targets = true;
        self
    }
}

#[derive(Debug, Clone, Default)]
pub struct PrepareOptions {
    /// Input height and width, required when the model's are dynamic.
    pub input_size: Option<(i64, i64)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerInfo {
    pub name: String,
    /// Dimensions at batch size 1: `[1, C, h, w]`.
    pub dims: Vec<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsupportedOp {
    pub node: String,
    pub op: String,
}

/// A plain classifier, analysed and ready to be rewritten into explain graphs.
pub struct Explainable {
    model: ModelProto,
    index: GraphIndex,
    pub probe: Probe,
    /// The opset the file had; the model here is at least [`upgrade::TARGET_OPSET`].
    pub source_opset: i64,
    pub input: String,
    /// `[1, C, H, W]`.
    pub input_dims: Vec<i64>,
    pub logits: String,
    pub num_classes: usize,
    /// Nodes on the gradient path from the input to the logits, in topological order.
    path: Vec<usize>,
    /// 4-D float tensors on the path, in topological order.
    pub layers: Vec<LayerInfo>,
    pub default_layer: Option<String>,
    /// Ops on the path without a backward rule.
    pub unsupported: Vec<UnsupportedOp>,
}

impl Explainable {
    pub fn analyse(mut model: ModelProto, opts: &PrepareOptions) -> Result<Explainable> {
        if contract::contract_info(&model).is_some() {
            return Err(OnnxError::Invalid("the model already is an explain model (camserve.contract=1)".into()));
        }
        io::drop_initializer_inputs(&mut model);
        let graph = model.graph.as_ref().ok_or_else(|| OnnxError::Invalid("the model has no graph".into()))?;
        let (input, input_dims) = image_input(graph, opts)?;
        let output = graph.output.first().ok_or_else(|| OnnxError::Invalid("the model has no outputs".into()))?;
        let mut logits = output.name().to_string();
        if let Some(p) = graph.node.iter().find(|n| n.output.first() == Some(&logits))
            && matches!(p.op_type(), "Softmax" | "LogSoftmax") {
                logits = p.input[0].clone();
            }
        let mut probed = probe(&model, &input, &input_dims)?;
        let rank = |n: &str| probed.dims(n).map(|d| d.len());
        let source_opset = upgrade::upgrade(&mut model, &rank)?;
        if source_opset < upgrade::TARGET_OPSET {
            // Also proves that ONNX Runtime accepts the upgraded model.
            probed = probe(&model, &input, &input_dims)?;
        }
        let graph = model.graph.as_ref().ok_or_else(|| OnnxError::Invalid("the model has no graph".into()))?;
        let index = GraphIndex::new(graph)?;
        let logit_dims = probed.dims(&logits).ok_or_else(|| OnnxError::Invalid(format!("logits `{logits}` not computed")))?;
        if logit_dims.first() != Some(&1) || !probed.is_float(&logits) {
            return Err(OnnxError::Invalid(format!("logits `{logits}` are not a float tensor [N, K]: {logit_dims:?}")));
        }
        let num_classes = tensor::numel(logit_dims);
        let deps: HashSet<String> = index.dependents(graph, &input).into_iter().filter(|t| probed.is_float(t)).collect();
        if !deps.contains(&logits) {
            return Err(OnnxError::Invalid("the logits do not depend on the input".into()));
        }
        let ancestors = index.ancestors(graph, &[&logits]);
        let path: Vec<usize> = index
            .order
            .iter()
            .copied()
            .filter(|i| ancestors.contains(i))
            .filter(|&i| {
                let n = &graph.node[i];
                n.input.iter().any(|s| deps.contains(s)) && n.output.iter().any(|o| deps.contains(o))
            })
            .collect();
        let unsupported = path
            .iter()
            .map(|&i| &graph.node[i])
            .filter(|n| !super::is_default_domain(n.domain()) || rules::rule_for(n.op_type()).is_none())
            .map(|n| UnsupportedOp { node: node_label(n), op: n.op_type().to_string() })
            .collect();
        let layers: Vec<LayerInfo> = path
            .iter()
            .flat_map(|&i| graph.node[i].output.iter())
            .filter(|o| deps.contains(*o) && **o != logits)
            .filter_map(|o| probed.dims(o).filter(|d| d.len() == 4).map(|d| LayerInfo { name: o.clone(), dims: d.to_vec() }))
            .collect();
        // The default layer: the last 4-D tensor with spatial size > 1 before global pooling. A tensor counts
        // only if the input reaches it without passing a global pooling: squeeze-excitation gates (pooled, then
        // multiplied back) keep the main path, while ConvNeXt's LayerNorm2d after its pooling (which permutes
        // [N,C,1,1] to [N,1,1,C]) does not.
        let spatial = |t: &str| probed.dims(t).filter(|d| d.len() == 4).map(|d| d[2] * d[3]);
        let pooled: HashSet<&str> = path
            .iter()
            .map(|&i| &graph.node[i])
            .filter(|n| n.output.first().and_then(|o| spatial(o)) == Some(1) && spatial(&n.input[0]).is_some_and(|s| s > 1))
            .map(|n| n.output[0].as_str())
            .collect();
        let mut unpooled: HashSet<&str> = HashSet::from([input.as_str()]);
        let mut stack = vec![input.as_str()];
        while let Some(t) = stack.pop() {
            for &c in index.consumers_of(t) {
                for o in graph.node[c].output.iter().map(String::as_str) {
                    if deps.contains(o) && !pooled.contains(o) && unpooled.insert(o) {
                        stack.push(o);
                    }
                }
            }
        }
        let default_layer = layers
            .iter()
            .rev()
            .find(|l| l.dims[2] * l.dims[3] > 1 && unpooled.contains(l.name.as_str()))
            .map(|l| l.name.clone());
        Ok(Explainable {
            model,
            index,
            probe: probed,
            source_opset,
            input,
            input_dims,
            logits,
            num_classes,
            path,
            layers,
            default_layer,
            unsupported,
        })
    }

    pub fn opset(&self) -> i64 {
        super::default_opset(&self.model).unwrap_or(upgrade::TARGET_OPSET)
    }

    /// The forward model alone: the image input and the logits output (a trailing Softmax removed), with a
    /// dynamic batch dimension. Used for predictions without explanations.
    pub fn forward_model(&self) -> Result<ModelProto> {
        let mut model = self.model.clone();
        let graph = model.graph.as_mut().ok_or_else(|| OnnxError::Invalid("the model has no graph".into()))?;
        let logit_dims = self.probe.dims(&self.logits).unwrap_or(&[]).to_vec();
        graph.input = vec![value_info(&self.input, tensor::FLOAT, &with_batch(&self.input_dims))];
        graph.output = vec![value_info(&self.logits, tensor::FLOAT, &with_batch(&logit_dims))];
        graph.value_info.clear();
        prune(graph);
        Ok(model)
    }

    pub fn layer(&self, name: &str) -> Option<&LayerInfo> {
        self.layers.iter().find(|l| l.name == name)
    }

    /// Writes the explain graph for `plan`.
    pub fn build(&self, plan: &ExplainPlan) -> Result<ModelProto> {
        let layer = self.layer(&plan.layer).ok_or_else(|| OnnxError::BadLayer(plan.layer.clone()))?.clone();
        let mut model = self.model.clone();
        let graph = model.graph.as_mut().ok_or_else(|| OnnxError::Invalid("the model has no graph".into()))?;

        // The chains: one per input-gradient rule (input -> logits), and the exact chain from the layer
        // unless the plain input chain already passes through it.
        let mut chains: Vec<(ReluRule, String, Vec<usize>)> =
            plan.rules.iter().map(|&r| (r, self.input.clone(), self.path.clone())).collect();
        let layer_in_plain = plan.rules.contains(&ReluRule::Plain);
        if !layer_in_plain {
            let below = self.index.dependents(graph, &layer.name);
            let nodes = self.path.iter().copied().filter(|&i| graph.node[i].input.iter().any(|s| below.contains(s))).collect();
            chains.push((ReluRule::Plain, layer.name.clone(), nodes));
        }
        let on_chains: HashSet<usize> = chains.iter().flat_map(|c| c.2.iter().copied()).collect();
        for &i in &on_chains {
            rules::prepare_forward(&mut graph.node[i], &self.probe)?;
        }

        let mut e = Emitter::new("camserve/");
        let mut memo = HashMap::new();
        let logit_dims = self.probe.dims(&self.logits).unwrap_or(&[]).to_vec();
        let k = self.num_classes as i64;
        let mut seed = SEED.to_string();
        if plan.select_targets {
            let (class, selected) = select_targets(&mut e, &self.logits, k);
            e.op_into("Identity", &[&class], vec![], contract::TARGET_INDEX);
            seed = selected;
        }
        if logit_dims.len() != 2 {
            let shape = e.op("Shape", &[&self.logits], vec![], "logits_shape");
            seed = e.op("Reshape", &[&seed, &shape], vec![], "seed");
        }
        let mut layer_grad = None;
        let mut input_grads = Vec::new();
        for (rule, start, nodes) in &chains {
            let is_layer_chain = *start == layer.name;
            e.set_prefix(&format!("camserve/{}/", if is_layer_chain { "layer" } else { rule.as_str() }));
            let mut wanted = vec![start.clone()];
            if *rule == ReluRule::Plain && !is_layer_chain {
                wanted.push(layer.name.clone());
            }
            let mut ctx = RuleCtx { e: &mut e, graph, index: &self.index, probe: &self.probe, relu: *rule, memo: &mut memo };
            let grads = run_chain(&mut ctx, nodes, start, &self.logits, &seed, &wanted)?;
            if is_layer_chain {
                layer_grad = Some(grads[0].clone());
            } else {
                input_grads.push((*rule, grads[0].clone()));
                if *rule == ReluRule::Plain {
                    layer_grad = Some(grads[1].clone());
                }
            }
        }
        let layer_grad = layer_grad.expect("every plan has a chain through the layer. This is a bug.");
        let layer_grad = rules::unhinted(&memo, &layer_grad);
        let input_grads: Vec<(ReluRule, String)> =
            input_grads.into_iter().map(|(rule, g)| (rule, rules::unhinted(&memo, &g))).collect();

        e.set_prefix("");
        e.op_into("Identity", &[&layer.name], vec![], ACTIVATIONS);
        e.op_into("Identity", &[&layer_grad], vec![], GRADIENTS);
        for (rule, g) in &input_grads {
            e.op_into("Identity", &[g], vec![], &contract::input_grad_name(*rule));
        }

        let batch = || Dim::Param("N".into());
        let input_vi = value_info(&self.input, tensor::FLOAT, &with_batch(&self.input_dims));
        let seed_vi = value_info(SEED, tensor::FLOAT, &[batch(), Dim::Value(self.num_classes as i64)]);
        let mut outputs = vec![
            value_info(&self.logits, tensor::FLOAT, &with_batch(&logit_dims)),
            value_info(ACTIVATIONS, tensor::FLOAT, &with_batch(&layer.dims)),
            value_info(GRADIENTS, tensor::FLOAT, &with_batch(&layer.dims)),
        ];
        for (rule, _) in &input_grads {
            outputs.push(value_info(&contract::input_grad_name(*rule), tensor::FLOAT, &with_batch(&self.input_dims)));
        }
        graph.input = vec![input_vi, seed_vi];
        if plan.select_targets {
            graph.input.push(value_info(contract::TARGET_RANK, tensor::INT64, &[batch()]));
            outputs.push(value_info(contract::TARGET_INDEX, tensor::INT64, &[batch()]));
        }
        graph.output = outputs;
        graph.value_info.clear();
        graph.node.extend(e.nodes);
        graph.initializer.extend(e.initializers);
        prune(graph);

        contract::set_meta(&mut model, contract::META_CONTRACT, contract::CONTRACT_VERSION);
        contract::set_meta(&mut model, contract::META_LAYER, &layer.name);
        let rules: Vec<&str> = plan.rules.iter().map(|r| r.as_str()).collect();
        contract::set_meta(&mut model, contract::META_RULES, &rules.join(","));
        model.producer_name = Some("camserve".into());
        model.producer_version = Some(env!("CARGO_PKG_VERSION").into());
        Ok(model)
    }
}

/// The seed rows when targets are chosen in the graph: returns (chosen class [N], seed [N, K]).
fn select_targets(e: &mut Emitter, logits: &str, k: i64) -> (String, String) {
    use super::attr::make_int;
    let shape = e.ints(&[-1, k]);
    let flat = e.op("Reshape", &[logits, &shape], vec![], "logits_2d");
    let kk = e.ints(&[k]);
    let sorted = e.op_n("TopK", &[&flat, &kk], vec![make_int("axis", 1), make_int("largest", 1), make_int("sorted", 1)], "ranked", 2);
    let (zero, last) = (e.const_i64(&[], &[0]), e.const_i64(&[], &[k - 1]));
    let lo = e.op("Max", &[contract::TARGET_RANK, &zero], vec![], "rank_lo");
    let rank = e.op("Min", &[&lo, &last], vec![], "rank");
    let axis1 = e.ints(&[1]);
    let rank2 = e.op("Unsqueeze", &[&rank, &axis1], vec![], "rank_2d");
    let chosen = e.op("GatherElements", &[&sorted[1], &rank2], vec![make_int("axis", 1)], "chosen_2d");
    let class = e.op("Squeeze", &[&chosen, &axis1], vec![], "chosen");
    let values = e.const_f32(&[2], &[0.0, 1.0]);
    let onehot = e.op("OneHot", &[&class, &kk, &values], vec![make_int("axis", -1)], "onehot");
    let by_rank = e.op("GreaterOrEqual", &[contract::TARGET_RANK, &zero], vec![], "by_rank");
    let by_rank2 = e.op("Unsqueeze", &[&by_rank, &axis1], vec![], "by_rank_2d");
    let seed = e.op("Where", &[&by_rank2, &onehot, contract::SEED], vec![], "seed_selected");
    (class, seed)
}

/// One backward chain from the logits (gradient `seed`) down to `start`; returns the gradients of `wanted`.
fn run_chain(
    ctx: &mut RuleCtx,
    nodes: &[usize],
    start: &str,
    logits: &str,
    seed: &str,
    wanted: &[String],
) -> Result<Vec<String>> {
    let below: HashSet<String> =
        ctx.index.dependents(ctx.graph, start).into_iter().filter(|t| ctx.probe.is_float(t)).collect();
    let mut contributions: HashMap<String, Vec<String>> = HashMap::new();
    contributions.insert(logits.to_string(), vec![seed.to_string()]);
    for &i in nodes.iter().rev() {
        let node = &ctx.graph.node[i];
        let dys: Vec<Option<String>> = node.output.iter().map(|o| total(ctx.e, &mut contributions, o)).collect();
        if dys.iter().all(Option::is_none) {
            continue;
        }
        let needs: Vec<bool> = node.input.iter().map(|s| !s.is_empty() && below.contains(s)).collect();
        if !needs.iter().any(|&n| n) {
            continue;
        }
        let rule = rules::rule_for(node.op_type())
            .filter(|_| super::is_default_domain(node.domain()))
            .ok_or_else(|| OnnxError::Unsupported { node: node_label(node), op: node.op_type().to_string() })?;
        let dxs = rule(ctx, node, &dys, &needs)?;
        for (k, dx) in dxs.into_iter().enumerate().take(node.input.len()) {
            if let (true, Some(dx)) = (needs[k], dx) {
                contributions.entry(node.input[k].clone()).or_default().push(dx);
            }
        }
    }
    wanted
        .iter()
        .map(|w| {
            total(ctx.e, &mut contributions, w)
                .ok_or_else(|| OnnxError::Invalid(format!("no gradient reaches `{w}` from the logits")))
        })
        .collect()
}

/// The summed gradient of a tensor (one `Sum` node when several consumers contributed).
fn total(e: &mut Emitter, contributions: &mut HashMap<String, Vec<String>>, tensor: &str) -> Option<String> {
    let c = contributions.get_mut(tensor)?;
    match c.len() {
        0 => None,
        1 => Some(c[0].clone()),
        _ => {
            let refs: Vec<&str> = c.iter().map(|s| s.as_str()).collect();
            let s = e.op("Sum", &refs, vec![], "grad_sum");
            *c = vec![s.clone()];
            Some(s)
        }
    }
}

/// Removes nodes and initializers that no output needs.
fn prune(graph: &mut super::proto::GraphProto) {
    let mut needed: HashSet<String> = graph.output.iter().map(|o| o.name().to_string()).collect();
    let mut keep = vec![false; graph.node.len()];
    for (i, n) in graph.node.iter().enumerate().rev() {
        if n.output.iter().any(|o| needed.contains(o)) {
            keep[i] = true;
            needed.extend(n.input.iter().filter(|s| !s.is_empty()).cloned());
        }
    }
    // Nodes are appended in a topological order (forward first, then each chain), so one reverse pass suffices.
    let mut k = keep.into_iter();
    graph.node.retain(|_| k.next().unwrap_or(false));
    graph.initializer.retain(|t| needed.contains(t.name()));
}

fn image_input(graph: &super::proto::GraphProto, opts: &PrepareOptions) -> Result<(String, Vec<i64>)> {
    let inits: HashSet<&str> = graph.initializer.iter().map(|t| t.name()).collect();
    let inputs: Vec<&ValueInfoProto> = graph.input.iter().filter(|i| !inits.contains(i.name())).collect();
    let [vi] = inputs.as_slice() else {
        let names: Vec<&str> = inputs.iter().map(|i| i.name()).collect();
        return Err(OnnxError::Invalid(format!("expected one image input, found {names:?}")));
    };
    let bad = |why: &str| OnnxError::Invalid(format!("input `{}`: {why}", vi.name()));
    let Some(type_proto::Value::TensorType(t)) = vi.r#type.as_ref().and_then(|t| t.value.as_ref()) else {
        return Err(bad("not a tensor"));
    };
    if t.elem_type() != tensor::FLOAT {
        return Err(bad("not float32"));
    }
    let dims: Vec<Option<i64>> = t
        .shape
        .as_ref()
        .map(|s| {
            s.dim
                .iter()
                .map(|d| match d.value {
                    Some(tensor_shape_proto::dimension::Value::DimValue(v)) if v > 0 => Some(v),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    if dims.len() != 4 {
        return Err(bad("not an NCHW image tensor (rank 4)"));
    }
    let channels = dims[1].ok_or_else(|| bad("dynamic channel count"))?;
    let (h, w) = match (dims[2], dims[3], opts.input_size) {
        (Some(h), Some(w), None) => (h, w),
        (Some(h), Some(w), Some(size)) if size == (h, w) => (h, w),
        (Some(h), Some(w), Some(size)) => {
            return Err(bad(&format!("the model's input size is {h}x{w}, not {}x{}", size.0, size.1)));
        }
        (_, _, Some((h, w))) => (h, w),
        _ => return Err(bad("dynamic height/width: give an input size")),
    };
    Ok((vi.name().to_string(), vec![1, channels, h, w]))
}

enum Dim {
    Param(String),
    Value(i64),
}

/// Probed dims (batch 1) with a dynamic batch dimension `N`.
fn with_batch(d: &[i64]) -> Vec<Dim> {
    std::iter::once(Dim::Param("N".into())).chain(d.iter().skip(1).map(|&v| Dim::Value(v))).collect()
}

fn value_info(name: &str, elem: i32, dims: &[Dim]) -> ValueInfoProto {
    use tensor_shape_proto::{dimension::Value, Dimension};
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Dim::Param(p) => Value::DimParam(p.clone()),
                Dim::Value(v) => Value::DimValue(*v),
            }),
            ..Default::default()
        })
        .collect();
    ValueInfoProto {
        name: Some(name.to_string()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(elem),
                shape: Some(TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}
