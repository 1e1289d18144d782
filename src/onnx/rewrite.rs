//! The explain-graph rewrite (docs/DESIGN.md §1-§3).
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
use super::probe::{probe, Probe, ProbeRunner};
use super::proto::{tensor_shape_proto, type_proto, ModelProto, TensorShapeProto, TypeProto, ValueInfoProto};
use super::rules::{self, ReluRule, RuleCtx};
use super::{decompose, flow, functions, io, layers, tensor, upgrade, OnnxError, Result};

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
    /// Adds, for every attention block of the model (see [`Explainable::attention`]), the outputs
    /// `camserve.attention.<i>` (the attention probabilities `[N, heads, T, T]`) and `camserve.attention_grad.<i>`
    /// (their gradients from the exact chain), so that attention rollouts need one run.
    pub attention: bool,
}

impl ExplainPlan {
    pub fn new(layer: impl Into<String>, rules: impl IntoIterator<Item = ReluRule>) -> Self {
        let mut rules: Vec<ReluRule> = rules.into_iter().collect();
        rules.sort();
        rules.dedup();
        ExplainPlan { layer: layer.into(), rules, select_targets: false, attention: false }
    }

    pub fn with_attention(mut self) -> Self {
        self.attention = true;
        self
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
    /// The image input's layout; `None` detects it from the declared shape (`[N, H, W, 3]` is NHWC).
    pub layout: Option<InputLayout>,
}

/// How the model's image input is laid out. An NHWC model gets a leading Transpose, so that camserve always
/// feeds and differentiates NCHW images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InputLayout {
    Nchw,
    Nhwc,
}

/// How a layer's tensor maps to the spatial grid `[N, C, h, w]` that the CAM methods read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerLayout {
    /// `[N, C, h, w]`: a convolutional feature map.
    Nchw,
    /// `[N, h, w, C]`: Swin and channels-last ConvNeXt blocks.
    Nhwc,
    /// `[N, prefix + h*w, C]`: a transformer's tokens; the first `prefix` tokens (class, distillation or
    /// register tokens) are not on the grid.
    Tokens { prefix: usize },
}

impl LayerLayout {
    pub fn as_str(&self) -> &'static str {
        match self {
            LayerLayout::Nchw => "nchw",
            LayerLayout::Nhwc => "nhwc",
            LayerLayout::Tokens { .. } => "tokens",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerInfo {
    pub name: String,
    /// Dimensions of the layer on its grid at batch size 1: `[1, C, h, w]` (what the CAM methods see).
    pub dims: Vec<i64>,
    pub layout: LayerLayout,
    /// The tensor's own dimensions at batch size 1.
    pub native_dims: Vec<i64>,
    /// The PyTorch module that produced it, where the exporter recorded it (`layer4.1.conv2`, `blocks.11.norm1`).
    pub module: Option<String>,
}

impl LayerInfo {
    /// A convolutional layer `[1, C, h, w]`.
    pub fn nchw(name: impl Into<String>, dims: Vec<i64>) -> LayerInfo {
        LayerInfo { name: name.into(), native_dims: dims.clone(), dims, layout: LayerLayout::Nchw, module: None }
    }
}

/// A transformer's attention blocks: the Softmax outputs `[N, heads, T, T]` on the gradient path whose token count
/// T is that of the model's token layers, and the token grid they attend over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttentionInfo {
    /// The attention probabilities of each block, in topological order (the first block first).
    pub outputs: Vec<String>,
    /// Heads of each block.
    pub heads: Vec<i64>,
    /// Tokens T = prefix + h*w.
    pub tokens: i64,
    /// Leading tokens not on the grid (class, distillation, register tokens); token 0 is the class token.
    pub prefix: usize,
    /// The token grid `(h, w)`.
    pub grid: (i64, i64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsupportedOp {
    pub node: String,
    pub op: String,
    /// Why the op's rule refuses this node (an attribute or input it cannot handle); `None`: no rule for the op.
    pub reason: Option<String>,
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
    /// The layout of the file's image input (NHWC inputs are fed NCHW through a leading Transpose).
    pub input_layout: InputLayout,
    pub logits: String,
    /// The op (Softmax, LogSoftmax) that ended the model and was stripped: explanations use its input, the
    /// pre-softmax scores.
    pub stripped_output_op: Option<String>,
    pub num_classes: usize,
    /// Nodes on the gradient path from the input to the logits, in topological order.
    path: Vec<usize>,
    /// Float tensors on the path that map to a spatial grid, in topological order.
    pub layers: Vec<LayerInfo>,
    pub default_layer: Option<String>,
    /// Ops on the path without a backward rule.
    pub unsupported: Vec<UnsupportedOp>,
    /// The attention blocks, for models with attention over token layers (ViT, DeiT); `None` otherwise.
    pub attention: Option<AttentionInfo>,
}

impl Explainable {
    /// The dims of the logits (the first output) for one image, the batch axis left out.
    pub fn output_dims(&self) -> Vec<i64> {
        self.probe.dims(&self.logits).and_then(|d| d.get(1..)).map(<[i64]>::to_vec).unwrap_or_default()
    }

    /// The file's `metadata_props`, as key and value.
    pub fn metadata(&self) -> std::collections::BTreeMap<String, String> {
        self.model.metadata_props.iter().map(|p| (p.key().to_string(), p.value().to_string())).collect()
    }

    pub fn analyse(mut model: ModelProto, opts: &PrepareOptions, runner: &dyn ProbeRunner) -> Result<Explainable> {
        if contract::contract_info(&model).is_some() {
            return Err(OnnxError::Invalid("the model already is an explain model (camserve.contract=1)".into()));
        }
        io::drop_initializer_inputs(&mut model);
        io::declare_dynamic_dims(&mut model);
        functions::inline_local_functions(&mut model)?;
        let graph = model.graph.as_mut().ok_or_else(|| OnnxError::Invalid("the model has no graph".into()))?;
        let torchvision = adapt_torchvision_detector(graph);
        let (input, input_dims, input_layout) = image_input(graph, opts)?;
        if input_layout == InputLayout::Nhwc {
            feed_nchw(graph, &input, &input_dims);
        }
        if torchvision {
            super::contract::set_meta(&mut model, JOINED_OUTPUTS_KEY, TORCHVISION_JOINED);
        } else if join_detr_outputs(graph) {
            super::contract::set_meta(&mut model, JOINED_OUTPUTS_KEY, "logits,pred_boxes");
        }
        let graph = model.graph.as_mut().ok_or_else(|| OnnxError::Invalid("the model has no graph".into()))?;
        let output = graph.output.first().ok_or_else(|| OnnxError::Invalid("the model has no outputs".into()))?;
        let mut logits = output.name().to_string();
        let mut stripped_output_op = None;
        // Through the ops after it that only move or relabel its values (Paddle's `scale` exports as an Identity,
        // Keras and TorchScript exports reshape, flatten or cast the probabilities) to the Softmax.
        let producer = |t: &str| graph.node.iter().find(|n| n.output.first().map(String::as_str) == Some(t));
        let mut last = producer(&logits);
        let passes_values = |p: &&super::proto::NodeProto| {
            !p.input.is_empty() && matches!(p.op_type(), "Identity" | "Reshape" | "Flatten" | "Squeeze" | "Unsqueeze" | "Cast")
        };
        let mut through = false;
        while let Some(p) = last.filter(passes_values) {
            last = producer(&p.input[0]);
            through = true;
        }
        // Seen through other ops, a Softmax is the classifier's only when it normalises over every value of an image
        // (its axis holds them all: [N, K], [N, K, 1, 1]); a Softmax over some inner axis, then flattened, is part of
        // the network and stays (checked once the shapes are probed).
        // A final Sigmoid (a multi-label head) stays in the graph; the metadata tells the task it is there.
        let final_sigmoid = last.is_some_and(|p| p.op_type() == "Sigmoid");
        let final_l2 = last.is_some_and(|p| l2_normalises(graph, p));
        let mut candidate = None;
        if let Some(p) = last
            && matches!(p.op_type(), "Softmax" | "LogSoftmax") {
                candidate = Some((p.input[0].clone(), p.op_type().to_string(), super::attr::int_or(p, "axis", -1)));
            }
        let original_output = logits.clone();
        if let Some((x, op, _)) = &candidate {
            logits = x.clone();
            stripped_output_op = Some(op.clone());
        }
        if final_sigmoid {
            super::contract::set_meta(&mut model, FINAL_OP_KEY, "Sigmoid");
        } else if final_l2 {
            super::contract::set_meta(&mut model, FINAL_OP_KEY, L2_NORMALIZE);
        }
        super::contract::set_meta(&mut model, OUTPUT_NAME_KEY, &original_output);
        let mut probed = probe(&model, &input, &input_dims, runner)?;
        if through && let Some((x, _, axis)) = &candidate {
            let whole = probed.dims(x).is_some_and(|d| {
                let a = if *axis < 0 { *axis + d.len() as i64 } else { *axis };
                a >= 1 && (a as usize) < d.len() && d[a as usize] == d[1..].iter().product::<i64>()
            });
            if !whole {
                logits = original_output;
                stripped_output_op = None;
            }
        }
        if decompose::needed(&model) {
            decompose::decompose(&mut model, &probed)?;
            // Also proves that ONNX Runtime runs the spelled-out graph.
            probed = probe(&model, &input, &input_dims, runner)?;
        }
        let rank = |n: &str| probed.dims(n).map(|d| d.len());
        let source_opset = upgrade::upgrade(&mut model, &rank)?;
        if source_opset < upgrade::TARGET_OPSET {
            // Also proves that ONNX Runtime accepts the upgraded model.
            probed = probe(&model, &input, &input_dims, runner)?;
        }
        let graph = model.graph.as_ref().ok_or_else(|| OnnxError::Invalid("the model has no graph".into()))?;
        let index = GraphIndex::new(graph)?;
        let logit_dims = probed.dims(&logits).ok_or_else(|| OnnxError::Invalid(format!("logits `{logits}` not computed")))?;
        if logit_dims.first() != Some(&1) || !probed.is_float(&logits) {
            return Err(OnnxError::Invalid(format!("logits `{logits}` are not a float tensor [N, K]: {logit_dims:?}")));
        }
        let num_classes = tensor::numel(logit_dims);
        let carry = flow::carrying(graph, &index, &probed, &input);
        if !carry.contains(&logits) {
            return Err(OnnxError::Invalid("the logits do not depend on the input through differentiable ops".into()));
        }
        let path = flow::gradient_path(graph, &index, &carry, &logits);
        let unsupported = path
            .iter()
            .map(|&i| &graph.node[i])
            .filter(|n| !super::is_default_domain(n.domain()) || rules::rule_for(n.op_type()).is_none())
            .map(|n| UnsupportedOp { node: node_label(n), op: n.op_type().to_string(), reason: None })
            .collect();
        let (in_h, in_w) = (input_dims[2], input_dims[3]);
        let modules = layers::module_paths(graph);
        let layers: Vec<LayerInfo> = path
            .iter()
            .flat_map(|&i| graph.node[i].output.iter().map(move |o| (i, o)))
            .filter(|(_, o)| carry.contains(*o) && **o != logits)
            .filter_map(|(i, o)| {
                let dims = probed.dims(o)?;
                let (layout, grid) = layers::grid_layout(dims, in_h, in_w)?;
                Some(LayerInfo { name: o.clone(), dims: grid, layout, native_dims: dims.to_vec(), module: modules[i].clone() })
            })
            .collect();
        let default_layer = layers::classifier_input(graph, &index, &probed, &logits, &layers)
            .or_else(|| layers::default_layer(graph, &index, &probed, &path, &carry, &layers, &input));
        let attention = find_attention(graph, &probed, &path, &layers);
        Ok(Explainable {
            model,
            index,
            probe: probed,
            source_opset,
            input,
            input_dims,
            input_layout,
            logits,
            stripped_output_op,
            num_classes,
            path,
            layers,
            default_layer,
            unsupported,
            attention,
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

    /// The part of the model after `layer`: the layer's tensor is the input (its own dimensions, dynamic batch), the
    /// logits the output. Ablation-CAM runs it on ablated activations instead of rerunning the backbone. Refused
    /// when that part also reads the image (a skip connection around the layer, a shape taken from the input).
    pub fn head_model(&self, layer: &str) -> Result<ModelProto> {
        let layer = self.layer(layer).ok_or_else(|| OnnxError::BadLayer(layer.to_string()))?.clone();
        let mut model = self.model.clone();
        let graph = model.graph.as_mut().ok_or_else(|| OnnxError::Invalid("the model has no graph".into()))?;
        let logit_dims = self.probe.dims(&self.logits).unwrap_or(&[]).to_vec();
        graph.node.retain(|n| !n.output.contains(&layer.name));
        self.rebuild_image_shapes(graph, &layer.name);
        graph.input = vec![value_info(&layer.name, tensor::FLOAT, &with_batch(&layer.native_dims))];
        graph.output = vec![value_info(&self.logits, tensor::FLOAT, &with_batch(&logit_dims))];
        graph.value_info.clear();
        prune(graph);
        if let Some(why) = self.head_reads_image(&layer.name) {
            return Err(OnnxError::Invalid(why));
        }
        Ok(model)
    }

    /// The two tensors ViT ReciproCAM masks at token layer `layer` (see [`super::token_head`]), or why it cannot.
    pub fn token_head(&self, layer: &str) -> std::result::Result<super::token_head::TokenHead, String> {
        let info = self.layer(layer).ok_or_else(|| format!("no layer `{layer}`"))?;
        if !matches!(info.layout, LayerLayout::Tokens { .. }) {
            return Err(format!("layer `{}` is a {} layer, not a transformer's tokens", info.name, info.layout.as_str()));
        }
        let graph = self.model.graph.as_ref().ok_or("the model has no graph")?;
        let head = super::token_head::find(graph, &self.index, &info.name, &info.native_dims)?;
        if self.probe.dims(&head.x).map(|d| &d[1..]) != Some(&info.native_dims[1..]) {
            return Err(format!("the residual stream `{}` does not have the layer's token dims {:?}", head.x, info.native_dims));
        }
        match self.head_reads_image(&head.x) {
            Some(why) => Err(why),
            None => Ok(head),
        }
    }

    /// The part of the model after token layer `layer`, taking [`super::token_head::MOSAIC`] `[N, 1, T, D + 1]`
    /// (tokens and a per-token mask) and giving the logits: ViT ReciproCAM's head passes.
    pub fn token_head_model(&self, layer: &str) -> Result<ModelProto> {
        let head = self.token_head(layer).map_err(OnnxError::Invalid)?;
        let mut model = self.model.clone();
        let graph = model.graph.as_mut().ok_or_else(|| OnnxError::Invalid("the model has no graph".into()))?;
        let logit_dims = self.probe.dims(&self.logits).unwrap_or(&[]).to_vec();
        super::token_head::rewire(graph, &head);
        self.rebuild_image_shapes(graph, super::token_head::MOSAIC);
        let dims = [Dim::Param("N".into()), Dim::Value(1), Dim::Value(head.tokens as i64), Dim::Value(head.dim as i64 + 1)];
        graph.input = vec![value_info(super::token_head::MOSAIC, tensor::FLOAT, &dims)];
        graph.output = vec![value_info(&self.logits, tensor::FLOAT, &with_batch(&logit_dims))];
        graph.value_info.clear();
        prune(graph);
        Ok(model)
    }

    /// The model from the image to `tensor` (a float tensor the probe measured), its only output: what a layer's
    /// raw values are read with (ViT ReciproCAM's tokens, the class token included).
    pub fn tap_model(&self, tensor_name: &str) -> Result<ModelProto> {
        let dims = self.probe.dims(tensor_name).ok_or_else(|| OnnxError::BadLayer(tensor_name.to_string()))?.to_vec();
        let mut model = self.model.clone();
        let graph = model.graph.as_mut().ok_or_else(|| OnnxError::Invalid("the model has no graph".into()))?;
        graph.input = vec![value_info(&self.input, tensor::FLOAT, &with_batch(&self.input_dims))];
        graph.output = vec![value_info(tensor_name, tensor::FLOAT, &with_batch(&dims))];
        graph.value_info.clear();
        prune(graph);
        Ok(model)
    }

    /// A shape taken from the image (PyTorch's `x.view(x.size(0), -1)` exports `Shape(input)`) in a graph cut
    /// below the image is rebuilt from `batch_source`: its batch size, then the input's own [C, H, W], which are
    /// fixed. Every consumer sees the same values as before.
    fn rebuild_image_shapes(&self, graph: &mut super::proto::GraphProto, batch_source: &str) {
        let rest: Vec<i64> = self.input_dims[1..].to_vec();
        let mut rebuilt = Vec::new();
        for (k, n) in graph.node.iter_mut().enumerate() {
            if self.is_shape_of_image(n) {
                rebuilt.push((k, n.output[0].clone()));
                n.output[0] = format!("{}/camserve_unused", n.output[0]);
            }
        }
        for (k, out) in rebuilt.into_iter().rev() {
            let s = format!("{out}/layer_shape");
            let (st, en, b, r) = (format!("{out}/start"), format!("{out}/end"), format!("{out}/batch"), format!("{out}/chw"));
            let nodes = [
                super::builder::node("Shape", &[batch_source], &s, vec![]),
                const_node(&st, tensor::i64_tensor("", &[1], &[0])),
                const_node(&en, tensor::i64_tensor("", &[1], &[1])),
                super::builder::node("Slice", &[&s, &st, &en], &b, vec![]),
                const_node(&r, tensor::i64_tensor("", &[rest.len() as i64], &rest)),
                super::builder::node("Concat", &[&b, &r], &out, vec![super::attr::make_int("axis", 0)]),
            ];
            graph.node.splice(k + 1..k + 1, nodes);
        }
    }

    /// Why the part of the model after `layer` cannot run on the layer's activations alone (it also reads the
    /// image: a skip connection around the layer, a shape taken from the input), or `None` when it can.
    pub fn head_reads_image(&self, layer: &str) -> Option<String> {
        let graph = self.model.graph.as_ref()?;
        let mut needed: HashSet<&str> = HashSet::from([self.logits.as_str()]);
        // Nodes are in topological order, so one reverse pass finds everything the logits need above the layer.
        for n in graph.node.iter().rev() {
            if n.output.iter().any(|o| o == layer) || !n.output.iter().any(|o| needed.contains(o.as_str())) {
                continue;
            }
            if n.input.contains(&self.input) && !self.is_shape_of_image(n) {
                return Some(format!(
                    "the part of the model after layer `{layer}` also reads the image input (node `{}`), so it cannot run on the layer's activations alone",
                    node_label(n)
                ));
            }
            needed.extend(n.input.iter().map(String::as_str));
        }
        None
    }

    /// A `Shape` of the image input (all of it): the head reads only the image's size through it, which
    /// [`Explainable::head_model`] rebuilds from the layer's batch size and the input's fixed [C, H, W].
    fn is_shape_of_image(&self, n: &super::proto::NodeProto) -> bool {
        n.op_type() == "Shape" && n.input.first() == Some(&self.input) && super::attr::find(n, "start").is_none() && super::attr::find(n, "end").is_none()
    }

    /// The weights of the global-average-pool + linear head that follows `layer` (what plain CAM reads), or why the
    /// layer has none.
    pub fn linear_head(&self, layer: &str) -> std::result::Result<super::head::LinearHead, super::head::NoHead> {
        let info = self.layer(layer).ok_or_else(|| format!("no layer `{layer}`"))?;
        if info.layout != LayerLayout::Nchw {
            return Err(format!("layer `{}` is a {} layer, not a convolutional [N, C, h, w] one", info.name, info.layout.as_str()));
        }
        let graph = self.model.graph.as_ref().ok_or("the model has no graph")?;
        super::head::linear_head(graph, &self.index, &info.name, &self.logits, info.dims[1] as usize)
    }

    /// A layer by tensor name, or by module path (the last layer the module produces: its output).
    pub fn layer(&self, name: &str) -> Option<&LayerInfo> {
        layers::find(&self.layers, name)
    }

    /// Writes the explain graph for `plan`.
    pub fn build(&self, plan: &ExplainPlan) -> Result<ModelProto> {
        let layer = self.layer(&plan.layer).ok_or_else(|| OnnxError::BadLayer(plan.layer.clone()))?.clone();
        let attention: Vec<String> = match (plan.attention, &self.attention) {
            (false, _) => vec![],
            (true, Some(a)) => a.outputs.clone(),
            (true, None) => {
                return Err(OnnxError::Invalid("the model has no attention blocks (Softmax [N, heads, T, T] over its token layers)".into()));
            }
        };
        let mut model = self.model.clone();
        let graph = model.graph.as_mut().ok_or_else(|| OnnxError::Invalid("the model has no graph".into()))?;

        // The chains: one per input-gradient rule (input -> logits), and the exact chain from the layer
        // unless the plain input chain already passes through it. The exact chain also gives the attention
        // gradients: it then starts at the first tensor that has the layer and every attention block below it
        // (the layer, the first attention block, or the input).
        let mut chains: Vec<(ReluRule, String, Vec<usize>)> =
            plan.rules.iter().map(|&r| (r, self.input.clone(), self.path.clone())).collect();
        let layer_in_plain = plan.rules.contains(&ReluRule::Plain);
        let layer_chain = (!layer_in_plain).then_some(chains.len());
        if !layer_in_plain {
            let mut start = layer.name.clone();
            let mut below = flow::carrying(graph, &self.index, &self.probe, &start);
            if !attention.iter().all(|a| below.contains(a)) {
                for s in attention.first().into_iter().chain(std::iter::once(&self.input)) {
                    let b = flow::carrying(graph, &self.index, &self.probe, s);
                    if b.contains(&layer.name) && attention.iter().all(|a| b.contains(a)) {
                        (start, below) = (s.clone(), b);
                        break;
                    }
                }
            }
            let nodes = self.path.iter().copied().filter(|&i| graph.node[i].input.iter().any(|s| below.contains(s))).collect();
            chains.push((ReluRule::Plain, start, nodes));
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
        let mut attention_grads = Vec::new();
        for (c, (rule, start, nodes)) in chains.iter().enumerate() {
            let is_layer_chain = layer_chain == Some(c);
            let exact = *rule == ReluRule::Plain;
            e.set_prefix(&format!("camserve/{}/", if is_layer_chain { "layer" } else { rule.as_str() }));
            // The input gradient (input chains), then for the exact chain the layer's and the attention blocks'.
            let mut wanted = if is_layer_chain { vec![] } else { vec![start.clone()] };
            if exact {
                wanted.push(layer.name.clone());
                wanted.extend(attention.iter().cloned());
            }
            let mut ctx = RuleCtx { e: &mut e, graph, index: &self.index, probe: &self.probe, relu: *rule, memo: &mut memo };
            let mut grads = run_chain(&mut ctx, nodes, start, &self.logits, &seed, &wanted, None)?.into_iter();
            if !is_layer_chain {
                input_grads.extend(grads.next().map(|g| (*rule, g)));
            }
            if exact {
                layer_grad = grads.next();
                attention_grads = grads.collect();
            }
        }
        let layer_grad = layer_grad.expect("every plan has a chain through the layer. This is a bug.");
        let layer_grad = rules::unhinted(&memo, &layer_grad);
        let attention_grads: Vec<String> = attention_grads.iter().map(|g| rules::unhinted(&memo, g)).collect();
        let input_grads: Vec<(ReluRule, String)> =
            input_grads.into_iter().map(|(rule, g)| (rule, rules::unhinted(&memo, &g))).collect();

        e.set_prefix("camserve/grid/");
        let acts = layers::to_grid(&mut e, &layer, &layer.name);
        let layer_grad = layers::to_grid(&mut e, &layer, &layer_grad);
        e.set_prefix("");
        e.op_into("Identity", &[&acts], vec![], ACTIVATIONS);
        e.op_into("Identity", &[&layer_grad], vec![], GRADIENTS);
        for (rule, g) in &input_grads {
            e.op_into("Identity", &[g], vec![], &contract::input_grad_name(*rule));
        }
        for (i, (a, g)) in attention.iter().zip(&attention_grads).enumerate() {
            e.op_into("Identity", &[a], vec![], &contract::attention_name(i));
            e.op_into("Identity", &[g], vec![], &contract::attention_grad_name(i));
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
        for (i, a) in attention.iter().enumerate() {
            let dims = self.probe.dims(a).unwrap_or(&[]).to_vec();
            outputs.push(value_info(&contract::attention_name(i), tensor::FLOAT, &with_batch(&dims)));
            outputs.push(value_info(&contract::attention_grad_name(i), tensor::FLOAT, &with_batch(&dims)));
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

impl Explainable {
    /// Every node on the gradient path that the rewrite would refuse: ops without a rule, and nodes whose rule
    /// refuses an attribute or input (a Pad mode, Slice steps, a computed Pow exponent). A dry run of the plain
    /// and guided input-gradient chains, which between them call every rule the rewrite can call, that notes
    /// each refusal and goes on instead of stopping at the first.
    pub fn refusals(&self) -> Vec<UnsupportedOp> {
        let mut model = self.model.clone();
        let Some(graph) = model.graph.as_mut() else { return vec![] };
        let mut found = Vec::new();
        for &i in &self.path {
            if let Err(e) = rules::prepare_forward(&mut graph.node[i], &self.probe) {
                let n = &graph.node[i];
                found.push(UnsupportedOp { node: node_label(n), op: n.op_type().to_string(), reason: Some(e.to_string()) });
            }
        }
        for rule in [ReluRule::Plain, ReluRule::Guided] {
            let mut e = Emitter::new("camserve/dry/");
            let mut memo = HashMap::new();
            let mut ctx = RuleCtx { e: &mut e, graph, index: &self.index, probe: &self.probe, relu: rule, memo: &mut memo };
            let mut list = Vec::new();
            // With a refusal list the chain only fails where nothing reaches the input, which `analyse` rules out.
            let _ = run_chain(&mut ctx, &self.path, &self.input, &self.logits, SEED, &[self.input.clone()], Some(&mut list));
            for u in list {
                if !found.contains(&u) {
                    found.push(u);
                }
            }
        }
        found
    }
}

/// The attention blocks (see [`AttentionInfo`]): Softmax nodes on the gradient path, over the last axis, whose
/// output is `[1, heads, T, T]` (batch axis first) with T the token count of a token layer; all blocks share
/// the first one's T. Windowed attention (Swin: windows stacked on the batch axis) does not qualify.
fn find_attention(graph: &super::proto::GraphProto, probe: &Probe, path: &[usize], layers: &[LayerInfo]) -> Option<AttentionInfo> {
    let grid_of = |t: i64| {
        layers.iter().find_map(|l| match l.layout {
            LayerLayout::Tokens { prefix } if l.native_dims.get(1) == Some(&t) => Some((prefix, (l.dims[2], l.dims[3]))),
            _ => None,
        })
    };
    let mut found: Option<AttentionInfo> = None;
    for n in path.iter().map(|&i| &graph.node[i]) {
        if n.op_type() != "Softmax" || !super::is_default_domain(n.domain()) {
            continue;
        }
        let Some(out) = n.output.first() else { continue };
        let Some(&[1, heads, t, t2]) = probe.dims(out) else { continue };
        let axis = super::attr::int_or(n, "axis", -1);
        if t != t2 || heads < 1 || !(axis == -1 || axis == 3) || !probe.is_batch_axis(out, 0) {
            continue;
        }
        match &mut found {
            Some(a) if a.tokens == t => {
                a.outputs.push(out.clone());
                a.heads.push(heads);
            }
            Some(_) => {}
            None => {
                if let Some((prefix, grid)) = grid_of(t) {
                    found = Some(AttentionInfo { outputs: vec![out.clone()], heads: vec![heads], tokens: t, prefix, grid });
                }
            }
        }
    }
    found
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
    mut refused: Option<&mut Vec<UnsupportedOp>>,
) -> Result<Vec<String>> {
    let below = flow::carrying(ctx.graph, ctx.index, ctx.probe, start);
    let mut contributions: HashMap<String, Vec<String>> = HashMap::new();
    contributions.insert(logits.to_string(), vec![seed.to_string()]);
    for &i in nodes.iter().rev() {
        let node = &ctx.graph.node[i];
        let dys: Vec<Option<String>> = node.output.iter().map(|o| total(ctx.e, &mut contributions, o)).collect();
        if dys.iter().all(Option::is_none) {
            continue;
        }
        let needs: Vec<bool> = node
            .input
            .iter()
            .enumerate()
            .map(|(k, s)| !s.is_empty() && below.contains(s) && flow::is_differentiable_input(node, k))
            .collect();
        if !needs.iter().any(|&n| n) {
            continue;
        }
        let rule = rules::rule_for(node.op_type()).filter(|_| super::is_default_domain(node.domain()));
        let dxs = match (rule, refused.as_deref_mut()) {
            (Some(rule), None) => rule(ctx, node, &dys, &needs)?,
            (None, None) => return Err(OnnxError::Unsupported { node: node_label(node), op: node.op_type().to_string() }),
            // A dry run (`Explainable::refusals`): note the refusal and go on with zero gradients, so that the
            // rules below are checked too.
            (rule, Some(list)) => match rule.map(|rule| rule(ctx, node, &dys, &needs)) {
                Some(Ok(dxs)) => dxs,
                outcome => {
                    let reason = match outcome {
                        Some(Err(e)) => Some(e.to_string()),
                        _ => None,
                    };
                    list.push(UnsupportedOp { node: node_label(node), op: node.op_type().to_string(), reason });
                    let node = node.clone();
                    node.input.iter().zip(&needs).map(|(s, &n)| n.then(|| ctx.zeros_like(s))).collect()
                }
            },
        };
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
            needed.extend(super::graph::implicit_inputs(n));
        }
    }
    // Nodes are appended in a topological order (forward first, then each chain), so one reverse pass suffices.
    let mut k = keep.into_iter();
    graph.node.retain(|_| k.next().unwrap_or(false));
    graph.initializer.retain(|t| needed.contains(t.name()));
}

/// A declared tensor's element type and dims: positive values are sizes; symbols, -1 (Paddle), 0 and missing values
/// are dynamic (`None`). `None` for a value that is not a tensor.
fn declared_tensor(vi: &ValueInfoProto) -> Option<(i32, Vec<Option<i64>>)> {
    let Some(type_proto::Value::TensorType(t)) = vi.r#type.as_ref().and_then(|t| t.value.as_ref()) else {
        return None;
    };
    let dims = t
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
    Some((t.elem_type(), dims))
}

/// The image input: its name, `[1, C, H, W]` and its layout.
fn image_input(graph: &super::proto::GraphProto, opts: &PrepareOptions) -> Result<(String, Vec<i64>, InputLayout)> {
    let inits: HashSet<&str> = graph.initializer.iter().map(|t| t.name()).collect();
    let inputs: Vec<&ValueInfoProto> = graph.input.iter().filter(|i| !inits.contains(i.name())).collect();
    let [vi] = inputs.as_slice() else {
        let names: Vec<&str> = inputs.iter().map(|i| i.name()).collect();
        return Err(OnnxError::Invalid(format!("expected one image input, found {names:?}")));
    };
    let bad = |why: &str| OnnxError::Invalid(format!("input `{}`: {why}", vi.name()));
    let Some((elem, dims)) = declared_tensor(vi) else {
        return Err(bad("not a tensor"));
    };
    if elem != tensor::FLOAT {
        return Err(bad("not float32"));
    }
    if dims.len() == 3 {
        // A torchvision detector's input (one image [C, H, W]) is adapted before this when its size is fixed and its
        // outputs are boxes, scores and labels (`adapt_torchvision_detector`).
        return Err(bad(&format!(
            "one image [C, H, W] ({}) with no batch axis: camserve serves such a file as a torchvision detector when C is 1 or 3, H and W are fixed and the outputs are boxes [D, 4], scores [D] and labels int64 [D]. Export it at a fixed size (no dynamic_axes on the input: `torch.onnx.export(model, ([torch.rand(3, 320, 320)],), path, opset_version=17)`), or give the model a batch axis",
            dims.iter().map(|d| d.map_or("?".to_string(), |v| v.to_string())).collect::<Vec<_>>().join(", ")
        )));
    }
    if dims.len() != 4 {
        return Err(bad("not an image tensor (rank 4: NCHW or NHWC)"));
    }
    // `[N, H, W, 3]` (H, W dynamic or at least 8, H not 3) is NHWC (TensorFlow, Keras); say `layout` in the
    // model's config where that guess is wrong.
    let spatial = |d: Option<i64>| d.is_none_or(|v| v >= 8);
    let nhwc = dims[3] == Some(3) && dims[1] != Some(3) && spatial(dims[1]) && spatial(dims[2]);
    let layout = opts.layout.unwrap_or(if nhwc { InputLayout::Nhwc } else { InputLayout::Nchw });
    let (c, h, w) = match layout {
        InputLayout::Nchw => (dims[1], dims[2], dims[3]),
        InputLayout::Nhwc => (dims[3], dims[1], dims[2]),
    };
    let channels = c.ok_or_else(|| bad("dynamic channel count"))?;
    let (h, w) = match (h, w, opts.input_size) {
        (Some(h), Some(w), None) => (h, w),
        (Some(h), Some(w), Some(size)) if size == (h, w) => (h, w),
        (Some(h), Some(w), Some(size)) => {
            return Err(bad(&format!("the model's input size is {h}x{w}, not {}x{}", size.0, size.1)));
        }
        (_, _, Some((h, w))) => (h, w),
        _ => return Err(bad("dynamic height/width: give an input size (`input_size` in the model's config)")),
    };
    Ok((vi.name().to_string(), vec![1, channels, h, w], layout))
}

/// Makes an NHWC model take NCHW images: the input keeps its name and becomes `[N, C, H, W]`, and a Transpose
/// feeds the NHWC tensor the model's nodes read (renamed `<input>/nhwc`).
/// The metadata key that says the model's outputs were joined into one (its value: the joined outputs' names, in
/// order), so that what decodes the output knows its layout.
pub const JOINED_OUTPUTS_KEY: &str = "camserve.joined_outputs";

/// The metadata key that names the op ending the model when the task reads it: `Sigmoid` (a multi-label head,
/// possibly behind ops that only move values, as the Softmax search sees them) or [`L2_NORMALIZE`] (an embedder),
/// set by [`Explainable::analyse`].
pub const FINAL_OP_KEY: &str = "camserve.final_op";

/// [`FINAL_OP_KEY`]'s value for a model whose output is divided by its L2 norm (`LpNormalization` with p = 2, or
/// PyTorch's `F.normalize`: a `Div` by a `ReduceL2`, possibly clipped and expanded): an embedder's habit.
pub const L2_NORMALIZE: &str = "L2Normalize";

/// The metadata key holding the name of the model's (first) output as the file has it: the task reads embedders'
/// names (`embedding`, `image_embeds`, ...) from it.
pub const OUTPUT_NAME_KEY: &str = "camserve.output_name";

/// Whether `node` divides its input by the input's L2 norm: `LpNormalization` (p = 2), or a `Div` whose divisor
/// comes from a `ReduceL2` through ops that only clamp or broadcast it (what `F.normalize` exports as).
fn l2_normalises(graph: &super::proto::GraphProto, node: &super::proto::NodeProto) -> bool {
    match node.op_type() {
        "LpNormalization" => super::attr::int_or(node, "p", 2) == 2,
        "Div" if node.input.len() == 2 => {
            let producer = |t: &str| graph.node.iter().find(|n| n.output.iter().any(|o| o == t));
            let mut at = producer(&node.input[1]);
            for _ in 0..4 {
                match at {
                    Some(p) if p.op_type() == "ReduceL2" => return true,
                    Some(p) if matches!(p.op_type(), "Clip" | "Max" | "Expand" | "Unsqueeze" | "Reshape" | "Add") && !p.input.is_empty() => {
                        at = producer(&p.input[0]);
                    }
                    _ => return false,
                }
            }
            false
        }
        _ => false,
    }
}

/// The output a DETR-family export's two heads are joined into.
pub const JOINED_OUTPUT: &str = "camserve/logits_and_boxes";

/// A DETR-family export (transformers' `DetrForObjectDetection` and relatives, as transformers and Optimum name
/// their outputs) has class logits `logits` [N, Q, K] and boxes `pred_boxes` [N, Q, 4]. camserve explains and
/// decodes one output, so the two become one, `Concat(logits, pred_boxes, axis = -1)` [N, Q, K + 4], and the
/// model's only output (the others, such as `last_hidden_state`, are dropped). The boxes' columns get a zero seed:
/// a detection's score depends on the boxes' branch only through the shared layers, which the seed reaches through
/// the logits. Returns whether it joined them.
fn join_detr_outputs(graph: &mut super::proto::GraphProto) -> bool {
    let (Some(logits), Some(boxes)) =
        (graph.output.iter().find(|o| o.name() == "logits").cloned(), graph.output.iter().find(|o| o.name() == "pred_boxes").cloned())
    else {
        return false;
    };
    if graph.node.iter().any(|n| n.output.iter().any(|o| o == JOINED_OUTPUT)) {
        return false;
    }
    graph.node.push(super::builder::node("Concat", &[logits.name(), boxes.name()], JOINED_OUTPUT, vec![super::attr::make_int("axis", -1)]));
    let dims = [Dim::Param("N".into()), Dim::Param("queries".into()), Dim::Param("classes_and_box".into())];
    graph.output = vec![value_info(JOINED_OUTPUT, tensor::FLOAT, &dims)];
    true
}

/// The value of `camserve.joined_outputs` for a torchvision detector's three outputs, joined into
/// [`TORCHVISION_OUTPUT`].
pub const TORCHVISION_JOINED: &str = "boxes,scores,labels";

/// The output a torchvision detector's boxes, scores and labels are joined into: `[1, TORCHVISION_ROWS, 6]`.
pub const TORCHVISION_OUTPUT: &str = "camserve/detections";

/// The rows of [`TORCHVISION_OUTPUT`]: a torchvision detector keeps at most `detections_per_img` (100 for Faster
/// R-CNN, RetinaNet and FCOS, 300 for SSD and SSDlite by default); a run that keeps more fails with ONNX Runtime's
/// error.
pub const TORCHVISION_ROWS: i64 = 1000;

/// A torchvision detector exported with its post-processing inside (`torch.onnx.export(model, ([image],), ...)`:
/// Faster R-CNN, RetinaNet, FCOS, SSD, SSDlite) takes one image `[C, H, W]`, no batch axis, and answers a
/// variable number D of detections: boxes float `[D, 4]` (`x0, y0, x1, y1` in the input's pixels), scores float
/// `[D]` and labels int64 `[D]`, in whatever order its dict had them. camserve explains one output of fixed size per
/// image, so the model is adapted before anything else:
/// - the input becomes `[1, C, H, W]` (a batch fixed at 1), squeezed into the model's own input;
/// - the three outputs become the rows `x0, y0, x1, y1, score, label` `[D, 6]`, scattered into zeros
///   `[TORCHVISION_ROWS, 6]` at rows `0..D` (ScatterND: the rows below D stay zero, a score no detection has),
///   with the batch axis in front: the layout of an end-to-end YOLO head, in input pixels.
///
/// A detection's gradient seed is then its row's score, which flows back through the ScatterND, the Concat and
/// the graph's own Gathers of the kept indices (NMS's, TopK's) to the score tensor the model computed. Returns
/// whether the model was such a detector.
fn adapt_torchvision_detector(graph: &mut super::proto::GraphProto) -> bool {
    let inits: HashSet<&str> = graph.initializer.iter().map(|t| t.name()).collect();
    let inputs: Vec<&ValueInfoProto> = graph.input.iter().filter(|i| !inits.contains(i.name())).collect();
    let [image] = inputs.as_slice() else { return false };
    let Some((tensor::FLOAT, in_dims)) = declared_tensor(image) else { return false };
    let [Some(c @ (1 | 3)), Some(h), Some(w)] = in_dims[..] else { return false };
    if graph.output.len() != 3 {
        return false;
    }
    let (mut boxes, mut scores, mut labels) = (None, None, None);
    for o in &graph.output {
        match declared_tensor(o) {
            Some((tensor::FLOAT, d)) if d.len() == 2 && d[1] == Some(4) => boxes = Some(o.name().to_string()),
            Some((tensor::FLOAT, d)) if d.len() == 1 => scores = Some(o.name().to_string()),
            Some((tensor::INT64, d)) if d.len() == 1 => labels = Some(o.name().to_string()),
            _ => return false,
        }
    }
    let (Some(boxes), Some(scores), Some(labels)) = (boxes, scores, labels) else { return false };
    let original = image.name().to_string();
    // The input keeps its name (what clients send); the model's own nodes read the unbatched image under a new one.
    let unbatched = format!("{original}/image");
    rename_reads(&mut graph.node, &original, &unbatched);
    let k = |n: &str| format!("camserve/torchvision/{n}");
    let i64s = |name: String, dims: &[i64], v: &[i64]| const_node(&name, tensor::i64_tensor(&name, dims, v));
    // Reshape only (valid from opset 5): the file's opset may be as old as 11, which torchvision needs, and Squeeze
    // and Unsqueeze changed their form at 13.
    let mut head = vec![i64s(k("image_shape"), &[3], &[c, h, w]), super::builder::node("Reshape", &[&original, &k("image_shape")], &unbatched, vec![])];
    let zeros_rows = vec![0.0f32; TORCHVISION_ROWS as usize * 6];
    let tail = vec![
        i64s(k("column"), &[2], &[-1, 1]),
        i64s(k("scalar"), &[0], &[]),
        i64s(k("output_shape"), &[3], &[1, TORCHVISION_ROWS, 6]),
        i64s(k("start"), &[], &[0]),
        i64s(k("step"), &[], &[1]),
        const_node(&k("zeros"), tensor::f32_tensor(&k("zeros"), &[TORCHVISION_ROWS, 6], &zeros_rows)),
        super::builder::node("Reshape", &[&scores, &k("column")], &k("score_column"), vec![]),
        super::builder::node("Cast", &[&labels], &k("labels_float"), vec![super::attr::make_int("to", tensor::FLOAT as i64)]),
        super::builder::node("Reshape", &[&k("labels_float"), &k("column")], &k("label_column"), vec![]),
        super::builder::node("Concat", &[&boxes, &k("score_column"), &k("label_column")], &k("rows"), vec![super::attr::make_int("axis", 1)]),
        super::builder::node("Shape", &[&scores], &k("count_1d"), vec![]),
        super::builder::node("Reshape", &[&k("count_1d"), &k("scalar")], &k("count"), vec![]),
        super::builder::node("Range", &[&k("start"), &k("count"), &k("step")], &k("range"), vec![]),
        super::builder::node("Reshape", &[&k("range"), &k("column")], &k("row_indices"), vec![]),
        super::builder::node("ScatterND", &[&k("zeros"), &k("row_indices"), &k("rows")], &k("padded"), vec![]),
        super::builder::node("Reshape", &[&k("padded"), &k("output_shape")], TORCHVISION_OUTPUT, vec![]),
    ];
    head.append(&mut graph.node);
    head.extend(tail);
    graph.node = head;
    let image_dims = [Dim::Value(1), Dim::Value(c), Dim::Value(h), Dim::Value(w)];
    let vi = value_info(&original, tensor::FLOAT, &image_dims);
    if let Some(slot) = graph.input.iter_mut().find(|i| i.name() == original) {
        *slot = vi;
    }
    graph.output = vec![value_info(TORCHVISION_OUTPUT, tensor::FLOAT, &[Dim::Value(1), Dim::Value(TORCHVISION_ROWS), Dim::Value(6)])];
    true
}

/// Makes every read of tensor `from` by `nodes` (and by their subgraphs, which may read it from the enclosing graph)
/// read `to` instead.
fn rename_reads(nodes: &mut [super::proto::NodeProto], from: &str, to: &str) {
    for n in nodes {
        for i in n.input.iter_mut().filter(|i| *i == from) {
            *i = to.to_string();
        }
        for a in n.attribute.iter_mut() {
            for g in a.g.iter_mut().chain(a.graphs.iter_mut()) {
                if !g.input.iter().any(|i| i.name() == from) {
                    rename_reads(&mut g.node, from, to);
                }
            }
        }
    }
}

fn feed_nchw(graph: &mut super::proto::GraphProto, input: &str, dims: &[i64]) {
    let nhwc = format!("{input}/nhwc");
    for n in graph.node.iter_mut() {
        for i in n.input.iter_mut().filter(|i| *i == input) {
            *i = nhwc.clone();
        }
    }
    let transpose = super::builder::node("Transpose", &[input], &nhwc, vec![super::attr::make_ints("perm", &[0, 2, 3, 1])]);
    graph.node.insert(0, transpose);
    if let Some(vi) = graph.input.iter_mut().find(|v| v.name() == input) {
        *vi = value_info(input, tensor::FLOAT, &with_batch(dims));
    }
}

pub(crate) enum Dim {
    Param(String),
    Value(i64),
}

/// Probed dims (batch 1) with a dynamic batch dimension `N`.
fn with_batch(d: &[i64]) -> Vec<Dim> {
    std::iter::once(Dim::Param("N".into())).chain(d.iter().skip(1).map(|&v| Dim::Value(v))).collect()
}

pub(crate) fn value_info(name: &str, elem: i32, dims: &[Dim]) -> ValueInfoProto {
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

/// A `Constant` node holding `t`.
fn const_node(output: &str, t: super::proto::TensorProto) -> super::proto::NodeProto {
    super::builder::node("Constant", &[], output, vec![super::attr::make_tensor("value", t)])
}
