//! The engine: ONNX Runtime sessions for a model's plans, on CPU or CUDA.
//!
//! A [`ModelRunner`] owns every session of one model and is meant to live on one worker thread
//! (`Session::run` takes `&mut self`). Sessions are built lazily, one per [`PlanKey`]: ONNX Runtime runs every
//! node of a graph whatever outputs are fetched, so a Grad-CAM request must not run a graph that also holds an
//! input-gradient chain. [`ModelInfo`] is the immutable description the HTTP layer reads.

mod session;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ndarray::{Array1, Array2, Array4, ArrayD, Axis, Ix2, Ix4};
use ort::session::Session;
use ort::session::SessionInputValue;
use ort::value::{Tensor, TensorRef};

use crate::onnx::contract::{self, ContractInfo};
use crate::onnx::head::LinearHead;
use crate::onnx::rewrite::{AttentionInfo, ExplainPlan, Explainable, LayerInfo, PrepareOptions};
use crate::onnx::rules::ReluRule;
use crate::onnx::{io, OnnxError};
pub use session::{Device, DeviceChoice, EngineOptions};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Onnx(#[from] OnnxError),
    #[error(transparent)]
    Runtime(#[from] crate::backend::runtime::RuntimeError),
    #[error("ONNX Runtime: {0}")]
    Ort(String),
    #[error("model `{model}`: {reason}")]
    Model { model: String, reason: String },
    #[error("the model's worker has stopped")]
    WorkerGone,
}

pub(crate) fn ort_err(e: impl std::fmt::Display) -> EngineError {
    EngineError::Ort(e.to_string())
}

/// What a model file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// A plain classifier: camserve builds its explain graphs.
    Plain,
    /// A model that already satisfies the explain-model contract (docs/DESIGN.md §3).
    Contract,
}

/// Everything the API says about a loaded model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub name: String,
    pub kind: ModelKind,
    pub input_name: String,
    /// `[C, H, W]`.
    pub input_shape: [usize; 3],
    pub num_classes: usize,
    pub labels: Option<Vec<String>>,
    pub layers: Vec<LayerInfo>,
    pub default_layer: String,
    /// Input-gradient rules the model can compute.
    pub rules: Vec<ReluRule>,
    pub device: Device,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// Channel order and pixel range of the model's input.
    pub pixels: crate::preprocess::PixelFormat,
    /// The image input's layout in the model file (camserve feeds NCHW either way).
    pub input_layout: crate::onnx::rewrite::InputLayout,
    /// The op that ended the model and was stripped (explanations and logits are the pre-softmax scores).
    pub stripped_output_op: Option<String>,
    /// The attention blocks of a transformer (plain models only): what the attention rollouts read.
    pub attention: Option<AttentionInfo>,
    /// Per convolutional layer: the global-average-pool + linear head after it (plain CAM's weights), or why there
    /// is none.
    pub linear_heads: std::collections::BTreeMap<String, Result<Arc<LinearHead>, String>>,
    /// Per convolutional layer: whether the part of the model after it runs on its activations alone
    /// (Ablation-CAM's [`PlanKey::Head`]), or why not.
    pub heads: std::collections::BTreeMap<String, Result<(), String>>,
    /// Per token layer: the residual stream and LayerNorm output ViT ReciproCAM masks ([`PlanKey::TokenHead`]), or
    /// why the layer has none.
    pub token_heads: std::collections::BTreeMap<String, Result<crate::onnx::token_head::TokenHead, String>>,
    /// The dims of the first output for one image (the batch axis left out): `[K]` for a classifier, `[4 + nc, A]`
    /// for a raw YOLO head. `core::task` reads the task from them and the metadata.
    pub output_dims: Vec<i64>,
    /// The file's `metadata_props` (Ultralytics writes `task`, `names`, `imgsz`, `stride` there).
    pub metadata: std::collections::BTreeMap<String, String>,
    /// The model's batch is fixed at 1 inside (a static export): its batches run one row at a time.
    pub batch_fixed: bool,
}

impl ModelInfo {
    pub fn label(&self, class: usize) -> Option<&str> {
        self.labels.as_ref().and_then(|l| l.get(class)).map(String::as_str)
    }

    pub fn class_by_label(&self, label: &str) -> Option<usize> {
        self.labels.as_ref()?.iter().position(|l| l == label)
    }

    /// A layer by tensor name or module path.
    pub fn layer(&self, name: &str) -> Option<&LayerInfo> {
        crate::onnx::layers::find(&self.layers, name)
    }

    /// The linear head after `layer` (a tensor name), or why plain CAM cannot use it.
    pub fn linear_head(&self, layer: &str) -> Result<Arc<LinearHead>, String> {
        match self.linear_heads.get(layer) {
            Some(r) => r.clone(),
            None if self.kind == ModelKind::Contract => Err("a contract model carries one graph and no separate head".into()),
            None => Err(format!("layer `{layer}` is not a convolutional [N, C, h, w] layer")),
        }
    }

    /// Why the part of the model after `layer` cannot run on the layer's activations alone (Ablation-CAM's head
    /// plan), if it cannot.
    pub fn why_no_head(&self, layer: &str) -> Option<String> {
        match self.heads.get(layer) {
            Some(r) => r.clone().err(),
            None if self.kind == ModelKind::Contract => Some("a contract model carries one graph and no separate head".into()),
            None => Some(format!("layer `{layer}` is not a convolutional [N, C, h, w] layer")),
        }
    }

    /// The token head at `layer` (ViT ReciproCAM's), or why there is none.
    pub fn token_head(&self, layer: &str) -> Result<&crate::onnx::token_head::TokenHead, String> {
        match self.token_heads.get(layer) {
            Some(r) => r.as_ref().map_err(Clone::clone),
            None if self.kind == ModelKind::Contract => Err("a contract model carries one graph and no separate head".into()),
            None => Err(format!("layer `{layer}` is not a transformer's token layer [N, T, D]")),
        }
    }

    /// Why ViT ReciproCAM cannot run at `layer`, if it cannot.
    pub fn why_no_token_head(&self, layer: &str) -> Option<String> {
        self.token_head(layer).err()
    }
}

/// The graph a batch runs through.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PlanKey {
    /// Logits only.
    Predict,
    Explain(ExplainPlan),
    /// The part of the model after a layer (a tensor name): the batch's "images" are the layer's activations
    /// `[N, C, h, w]`, the output the logits. Ablation-CAM's ablated batches.
    Head(String),
    /// The part of a transformer after a token layer (a tensor name), on masked tokens: the batch's "images" are
    /// `[1, T, D + 1]`, tokens and a mask column (`onnx::token_head`). ViT ReciproCAM's batches.
    TokenHead(String),
    /// The model from the image to one tensor (a name), its raw values the output `[N, size]`: a layer's tokens,
    /// the class token included.
    Tap(String),
}

impl PlanKey {
    /// The explain plan as `info`'s model runs it: plain models choose targets by rank inside the graph; a contract
    /// model's graph takes the seed as it is (the engine ranks its logits first).
    pub fn explain(info: &ModelInfo, plan: ExplainPlan) -> PlanKey {
        PlanKey::Explain(if info.kind == ModelKind::Plain { plan.with_target_selection() } else { plan })
    }
}

/// One batch: images with a seed row and a target rank each (rank >= 0: the rank-th prediction; -1: the seed).
pub struct Batch {
    pub images: Array4<f32>,
    pub seeds: Array2<f32>,
    pub ranks: Array1<i64>,
}

/// A batch's results, row-aligned with the batch.
#[derive(Debug, Clone)]
pub struct BatchOutput {
    pub logits: Array2<f32>,
    /// The class each row explained (explain plans only).
    pub targets: Option<Vec<usize>>,
    pub activations: Option<Array4<f32>>,
    pub gradients: Option<Array4<f32>>,
    pub input_grads: Vec<(ReluRule, Array4<f32>)>,
    /// Attention plans: per block (first block first), the attention probabilities `[N, heads, T, T]` and their
    /// exact gradients.
    pub attention: Vec<(Array4<f32>, Array4<f32>)>,
}

impl BatchOutput {
    /// Row `i` alone, as a batch of one (an embedder's request runs its images as rows of one batch and explains
    /// each on its own picture).
    pub fn row(&self, i: usize) -> BatchOutput {
        let one4 = |a: &Array4<f32>| a.slice_axis(Axis(0), (i..i + 1).into()).to_owned();
        BatchOutput {
            logits: self.logits.slice_axis(Axis(0), (i..i + 1).into()).to_owned(),
            targets: self.targets.as_ref().map(|t| t.get(i).copied().into_iter().collect()),
            activations: self.activations.as_ref().map(one4),
            gradients: self.gradients.as_ref().map(one4),
            input_grads: self.input_grads.iter().map(|(r, g)| (*r, one4(g))).collect(),
            attention: self.attention.iter().map(|(a, g)| (one4(a), one4(g))).collect(),
        }
    }
}

/// Where the model's graphs come from.
enum Source {
    Plain(Box<Explainable>),
    Contract { bytes: Vec<u8>, info: ContractInfo },
}

/// A model and its sessions; lives on one worker thread.
pub struct ModelRunner {
    info: Arc<ModelInfo>,
    source: Source,
    sessions: HashMap<PlanKey, Session>,
    options: EngineOptions,
}

pub struct ModelSpec {
    pub name: String,
    pub path: PathBuf,
    pub labels: Option<Vec<String>>,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub default_layer: Option<String>,
    pub input_size: Option<(i64, i64)>,
    pub layout: Option<crate::onnx::rewrite::InputLayout>,
    pub pixels: crate::preprocess::PixelFormat,
}

impl ModelSpec {
    /// A model file with its normalisation; no labels, the default layer, the file's input size and layout,
    /// RGB pixels in [0, 1] stretched to the input (set the other fields with struct update syntax).
    pub fn new(name: impl Into<String>, path: impl Into<PathBuf>, mean: [f32; 3], std: [f32; 3]) -> ModelSpec {
        ModelSpec { name: name.into(), path: path.into(), labels: None, mean, std, default_layer: None, input_size: None, layout: None, pixels: Default::default() }
    }
}

impl ModelRunner {
    /// Loads, analyses and places a model; fails if the device choice cannot be honoured.
    pub fn load(spec: &ModelSpec, options: &EngineOptions) -> Result<ModelRunner, EngineError> {
        let bad = |reason: String| EngineError::Model { model: spec.name.clone(), reason };
        crate::backend::runtime::environment(options.ort_library.as_deref())?;
        let model = io::load_model(&spec.path)?;
        let device = session::choose_device(options)?;
        let (source, info) = match contract::contract_info(&model) {
            Some(ci) => Self::describe_contract(model, ci, spec, device).map_err(bad)?,
            None => {
                let ex = crate::backend::probe::analyse(model, &PrepareOptions { input_size: spec.input_size, layout: spec.layout })?;
                Self::describe_plain(ex, spec, device).map_err(bad)?
            }
        };
        if info.input_shape[0] != 3 {
            return Err(bad(format!("the image input must have 3 channels, it has {}", info.input_shape[0])));
        }
        // The labels' count is checked against the classes of the model's task (`core::task`).
        Ok(ModelRunner { info: Arc::new(info), source, sessions: HashMap::new(), options: options.clone() })
    }

    fn base_info(spec: &ModelSpec, kind: ModelKind, device: Device) -> ModelInfo {
        ModelInfo {
            name: spec.name.clone(),
            kind,
            input_name: String::new(),
            input_shape: [0; 3],
            num_classes: 0,
            labels: spec.labels.clone(),
            layers: vec![],
            default_layer: String::new(),
            rules: vec![],
            device,
            mean: spec.mean,
            std: spec.std,
            pixels: spec.pixels,
            input_layout: crate::onnx::rewrite::InputLayout::Nchw,
            stripped_output_op: None,
            attention: None,
            linear_heads: Default::default(),
            heads: Default::default(),
            token_heads: Default::default(),
            output_dims: vec![],
            metadata: Default::default(),
            batch_fixed: false,
        }
    }

    /// A plain classifier: every layer and every input-gradient rule is available.
    fn describe_plain(ex: Explainable, spec: &ModelSpec, device: Device) -> Result<(Source, ModelInfo), String> {
        let default_layer = match &spec.default_layer {
            Some(l) => match ex.layer(l) {
                Some(found) => found.name.clone(),
                None => return Err(format!("configured default layer `{l}` is not a candidate layer (a tensor name or module path)")),
            },
            None => ex.default_layer.clone().ok_or("no layer on a spatial grid larger than 1x1")?,
        };
        let d = &ex.input_dims;
        let conv = ex.layers.iter().filter(|l| l.layout == crate::onnx::rewrite::LayerLayout::Nchw);
        let linear_heads = conv.clone().map(|l| (l.name.clone(), ex.linear_head(&l.name).map(Arc::new))).collect();
        let heads = conv.map(|l| (l.name.clone(), ex.head_reads_image(&l.name).map_or(Ok(()), Err))).collect();
        let token_heads = ex
            .layers
            .iter()
            .filter(|l| matches!(l.layout, crate::onnx::rewrite::LayerLayout::Tokens { .. }))
            .map(|l| (l.name.clone(), ex.token_head(&l.name)))
            .collect();
        let info = ModelInfo {
            input_name: ex.input.clone(),
            input_shape: [d[1] as usize, d[2] as usize, d[3] as usize],
            num_classes: ex.num_classes,
            layers: ex.layers.clone(),
            default_layer,
            rules: ReluRule::ALL.to_vec(),
            input_layout: ex.input_layout,
            stripped_output_op: ex.stripped_output_op.clone(),
            attention: ex.attention.clone(),
            linear_heads,
            heads,
            token_heads,
            output_dims: ex.output_dims(),
            metadata: ex.metadata(),
            batch_fixed: ex.probe.batch_fixed,
            ..Self::base_info(spec, ModelKind::Plain, device)
        };
        Ok((Source::Plain(Box::new(ex)), info))
    }

    /// A contract model: its one layer and the rules it carries; shapes read from its declared inputs/outputs.
    fn describe_contract(model: crate::onnx::ModelProto, ci: ContractInfo, spec: &ModelSpec, device: Device) -> Result<(Source, ModelInfo), String> {
        let bytes = io::encode_model(&model).map_err(|e| e.to_string())?;
        let g = model.graph.as_ref().ok_or("no graph")?;
        let dims_of = |name: &str, list: &[crate::onnx::proto::ValueInfoProto]| -> Vec<i64> {
            list.iter().find(|v| v.name() == name).map(static_dims).unwrap_or_default()
        };
        let input = dims_of(&ci.input, &g.input);
        let acts = dims_of(contract::ACTIVATIONS, &g.output);
        let logits = dims_of(&ci.logits, &g.output);
        let static_ok = input.len() == 4 && acts.len() == 4 && logits.len() == 2 && logits[1] > 0;
        if !static_ok || input[1..].iter().chain(&acts[1..]).any(|&d| d <= 0) {
            return Err("a contract model needs static [N,C,H,W] input, activations and [N,K] logits".into());
        }
        let info = ModelInfo {
            input_name: ci.input.clone(),
            input_shape: [input[1] as usize, input[2] as usize, input[3] as usize],
            num_classes: logits[1] as usize,
            layers: vec![LayerInfo::nchw(ci.layer.clone(), vec![1, acts[1], acts[2], acts[3]])],
            default_layer: ci.layer.clone(),
            rules: ci.rules.clone(),
            output_dims: vec![logits[1]],
            ..Self::base_info(spec, ModelKind::Contract, device)
        };
        Ok((Source::Contract { bytes, info: ci }, info))
    }

    /// Sets how uploads become the model's input (the registry does, once the model's task is known, before the
    /// model serves or shares its description).
    pub fn set_preprocessing(&mut self, mean: [f32; 3], std: [f32; 3], pixels: crate::preprocess::PixelFormat) {
        let info = Arc::make_mut(&mut self.info);
        (info.mean, info.std, info.pixels) = (mean, std, pixels);
    }

    /// Sets the layer a request without `layer` explains (the registry does, for a task whose default differs
    /// from the file's, before the model serves).
    pub fn set_default_layer(&mut self, layer: String) {
        Arc::make_mut(&mut self.info).default_layer = layer;
    }

    /// The model's description, borrowed.
    pub fn describe(&self) -> &ModelInfo {
        &self.info
    }

    pub fn info(&self) -> Arc<ModelInfo> {
        self.info.clone()
    }

    /// Builds the sessions for `keys` and runs each twice on a batch of zeros; returns each one's second run's time
    /// (the first builds the session and warms its allocations), which seeds the time estimates.
    pub fn warm_up(&mut self, keys: &[PlanKey]) -> Result<Vec<(PlanKey, Duration)>, EngineError> {
        let [c, h, w] = self.info.input_shape;
        let mut times = Vec::with_capacity(keys.len());
        for key in keys {
            // A head runs on the layer's activations, a token head on the tokens and their mask column.
            let shape = match key {
                PlanKey::Head(layer) => match self.info.layer(layer).map(|l| l.native_dims.as_slice()) {
                    Some(&[_, c, h, w]) => (1, c as usize, h as usize, w as usize),
                    _ => return Err(EngineError::Ort(format!("warm-up: layer `{layer}` is not [N, C, h, w]"))),
                },
                PlanKey::TokenHead(layer) => {
                    let head = self.info.token_head(layer).map_err(EngineError::Ort)?;
                    (1, 1, head.tokens, head.dim + 1)
                }
                _ => (1, c, h, w),
            };
            let batch = Batch {
                images: Array4::zeros(shape),
                seeds: Array2::zeros((1, self.info.num_classes)),
                ranks: Array1::from_elem(1, 0),
            };
            self.run(key, &batch)?;
            let started = Instant::now();
            self.run(key, &batch)?;
            times.push((key.clone(), started.elapsed()));
        }
        Ok(times)
    }

    fn session(&mut self, key: &PlanKey) -> Result<&mut Session, EngineError> {
        if !self.sessions.contains_key(key) {
            let started = Instant::now();
            let bytes = match (&self.source, key) {
                (Source::Plain(ex), PlanKey::Predict) => io::encode_model(&ex.forward_model()?)?,
                (Source::Plain(ex), PlanKey::Explain(plan)) => io::encode_model(&ex.build(plan)?)?,
                (Source::Plain(ex), PlanKey::Head(layer)) => io::encode_model(&ex.head_model(layer)?)?,
                (Source::Plain(ex), PlanKey::TokenHead(layer)) => io::encode_model(&ex.token_head_model(layer)?)?,
                (Source::Plain(ex), PlanKey::Tap(tensor)) => io::encode_model(&ex.tap_model(tensor)?)?,
                (Source::Contract { .. }, PlanKey::Head(_) | PlanKey::TokenHead(_) | PlanKey::Tap(_)) => {
                    return Err(EngineError::Ort("a contract model has no separate head. This is a bug.".into()));
                }
                (Source::Contract { bytes, .. }, _) => bytes.clone(),
            };
            let s = session::build(&bytes, self.info.device, &self.options)?;
            tracing::info!(model = %self.info.name, plan = ?key, ms = started.elapsed().as_millis() as u64, "session built");
            self.sessions.insert(key.clone(), s);
        }
        Ok(self.sessions.get_mut(key).expect("inserted above. This is a bug."))
    }

    /// Runs one batch through the plan's graph (row by row for a model whose batch is fixed at 1).
    pub fn run(&mut self, key: &PlanKey, batch: &Batch) -> Result<BatchOutput, EngineError> {
        let n = batch.images.len_of(Axis(0));
        if self.info.batch_fixed && n > 1 {
            let parts = (0..n)
                .map(|i| {
                    let one = Batch {
                        images: batch.images.slice(ndarray::s![i..i + 1, .., .., ..]).to_owned(),
                        seeds: batch.seeds.slice(ndarray::s![i..i + 1, ..]).to_owned(),
                        ranks: batch.ranks.slice(ndarray::s![i..i + 1]).to_owned(),
                    };
                    self.run_batch(key, &one)
                })
                .collect::<Result<Vec<_>, _>>()?;
            return BatchOutput::concat(parts);
        }
        self.run_batch(key, batch)
    }

    fn run_batch(&mut self, key: &PlanKey, batch: &Batch) -> Result<BatchOutput, EngineError> {
        if let Source::Contract { info, .. } = &self.source {
            return self.run_contract(key, batch, info.clone());
        }
        let input_name = match key {
            PlanKey::Head(layer) => layer.clone(),
            PlanKey::TokenHead(_) => crate::onnx::token_head::MOSAIC.to_string(),
            _ => self.info.input_name.clone(),
        };
        let blocks = self.info.attention.as_ref().map_or(0, |a| a.outputs.len());
        let session = self.session(key)?;
        // Views, not copies: ONNX Runtime reads the batch's buffers directly.
        let mut inputs: Vec<(String, SessionInputValue)> =
            vec![(input_name, TensorRef::from_array_view(batch.images.view()).map_err(ort_err)?.into())];
        if let PlanKey::Explain(plan) = key {
            inputs.push((contract::SEED.into(), TensorRef::from_array_view(batch.seeds.view()).map_err(ort_err)?.into()));
            if plan.select_targets {
                inputs.push((contract::TARGET_RANK.into(), TensorRef::from_array_view(batch.ranks.view()).map_err(ort_err)?.into()));
            }
        }
        let outputs = session.run(inputs).map_err(ort_err)?;
        let f32_out = |name: &str| -> Result<ArrayD<f32>, EngineError> {
            Ok(outputs[name].try_extract_array::<f32>().map_err(ort_err)?.to_owned())
        };
        let logits_name = outputs.keys().next().map(str::to_string).unwrap_or_default();
        // A first output of any rank (a detector's [N, 4 + nc, A]) is read as [N, K], K its size per image, as the
        // explain graph's seed is laid out.
        let first = f32_out(&logits_name)?;
        let n = first.shape().first().copied().unwrap_or(0);
        let k = first.len().checked_div(n).unwrap_or(0);
        let logits = first.into_shape_with_order((n, k)).map_err(ort_err)?;
        let mut out = BatchOutput { logits, targets: None, activations: None, gradients: None, input_grads: vec![], attention: vec![] };
        if let PlanKey::Explain(plan) = key {
            out.activations = Some(f32_out(contract::ACTIVATIONS)?.into_dimensionality::<Ix4>().map_err(ort_err)?);
            out.gradients = Some(f32_out(contract::GRADIENTS)?.into_dimensionality::<Ix4>().map_err(ort_err)?);
            for &rule in &plan.rules {
                let g = f32_out(&contract::input_grad_name(rule))?.into_dimensionality::<Ix4>().map_err(ort_err)?;
                out.input_grads.push((rule, g));
            }
            if plan.attention {
                for i in 0..blocks {
                    let a = f32_out(&contract::attention_name(i))?.into_dimensionality::<Ix4>().map_err(ort_err)?;
                    let g = f32_out(&contract::attention_grad_name(i))?.into_dimensionality::<Ix4>().map_err(ort_err)?;
                    out.attention.push((a, g));
                }
            }
            out.targets = Some(if plan.select_targets {
                let t = outputs[contract::TARGET_INDEX].try_extract_array::<i64>().map_err(ort_err)?;
                t.iter().zip(batch.seeds.outer_iter()).zip(&batch.ranks)
                    .map(|((&chosen, seed), &rank)| if rank >= 0 { chosen as usize } else { argmax(seed.iter()) })
                    .collect()
            } else {
                batch.seeds.outer_iter().map(|s| argmax(s.iter())).collect()
            });
        }
        Ok(out)
    }

    /// A contract model has one graph computing everything; targets chosen by rank need its logits first.
    fn run_contract(&mut self, key: &PlanKey, batch: &Batch, ci: ContractInfo) -> Result<BatchOutput, EngineError> {
        let input_name = self.info.input_name.clone();
        let classes = self.info.num_classes;
        let session = self.session(key)?;
        let mut go = |seeds: &Array2<f32>| -> Result<HashMap<String, ArrayD<f32>>, EngineError> {
            let inputs: Vec<(String, ort::value::DynValue)> = vec![
                (input_name.clone(), Tensor::from_array(batch.images.clone()).map_err(ort_err)?.into_dyn()),
                (contract::SEED.into(), Tensor::from_array(seeds.clone()).map_err(ort_err)?.into_dyn()),
            ];
            let outputs = session.run(inputs).map_err(ort_err)?;
            outputs
                .iter()
                .map(|(k, v)| Ok((k.to_string(), v.try_extract_array::<f32>().map_err(ort_err)?.to_owned())))
                .collect()
        };
        let mut seeds = batch.seeds.clone();
        let mut res = go(&seeds)?;
        let needs_rank = batch.ranks.iter().any(|&r| r >= 0);
        let get2 = |res: &HashMap<String, ArrayD<f32>>| res[&ci.logits].clone().into_dimensionality::<Ix2>().map_err(ort_err);
        let logits = get2(&res)?;
        let mut targets = Vec::with_capacity(batch.ranks.len());
        for (i, &rank) in batch.ranks.iter().enumerate() {
            if rank >= 0 {
                let order = ranked(logits.row(i).iter().copied());
                let class = order[(rank as usize).min(classes - 1)];
                seeds.row_mut(i).fill(0.0);
                seeds[[i, class]] = 1.0;
                targets.push(class);
            } else {
                targets.push(argmax(batch.seeds.row(i).iter()));
            }
        }
        if needs_rank && matches!(key, PlanKey::Explain(_)) {
            res = go(&seeds)?;
        }
        let get4 = |name: &str| -> Result<Array4<f32>, EngineError> {
            res.get(name).cloned().ok_or_else(|| EngineError::Ort(format!("output {name} missing")))?.into_dimensionality::<Ix4>().map_err(ort_err)
        };
        let mut out = BatchOutput { logits, targets: None, activations: None, gradients: None, input_grads: vec![], attention: vec![] };
        if let PlanKey::Explain(plan) = key {
            out.activations = Some(get4(contract::ACTIVATIONS)?);
            out.gradients = Some(get4(contract::GRADIENTS)?);
            for &rule in &plan.rules {
                out.input_grads.push((rule, get4(&contract::input_grad_name(rule))?));
            }
            out.targets = Some(targets);
        }
        Ok(out)
    }
}

fn static_dims(vi: &crate::onnx::proto::ValueInfoProto) -> Vec<i64> {
    use crate::onnx::proto::{tensor_shape_proto::dimension::Value, type_proto};
    match vi.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(type_proto::Value::TensorType(t)) => t
            .shape
            .as_ref()
            .map(|s| s.dim.iter().map(|d| match d.value { Some(Value::DimValue(v)) => v, _ => -1 }).collect())
            .unwrap_or_default(),
        _ => vec![],
    }
}

pub fn argmax<'a>(it: impl Iterator<Item = &'a f32>) -> usize {
    it.enumerate().fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| if v > bv { (i, v) } else { (bi, bv) }).0
}

/// Class indices by decreasing score (stable for ties: the lower index first).
pub fn ranked(scores: impl Iterator<Item = f32>) -> Vec<usize> {
    let v: Vec<f32> = scores.collect();
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[b].partial_cmp(&v[a]).unwrap_or(std::cmp::Ordering::Equal).then(a.cmp(&b)));
    idx
}

/// Copies rows `range` of every array of a batch output (fan-out of a batch to its requests).
impl BatchOutput {
    pub fn rows(&self, range: std::ops::Range<usize>) -> BatchOutput {
        let r = || ndarray::s![range.clone(), ..];
        let r4 = || ndarray::s![range.clone(), .., .., ..];
        BatchOutput {
            logits: self.logits.slice(r()).to_owned(),
            targets: self.targets.as_ref().map(|t| t[range.clone()].to_vec()),
            activations: self.activations.as_ref().map(|a| a.slice(r4()).to_owned()),
            gradients: self.gradients.as_ref().map(|a| a.slice(r4()).to_owned()),
            input_grads: self.input_grads.iter().map(|(k, a)| (*k, a.slice(r4()).to_owned())).collect(),
            attention: self.attention.iter().map(|(a, g)| (a.slice(r4()).to_owned(), g.slice(r4()).to_owned())).collect(),
        }
    }

    /// The rows of several outputs of one plan, in order (a fixed-batch model's rows run one at a time).
    pub fn concat(parts: Vec<BatchOutput>) -> Result<BatchOutput, EngineError> {
        use ndarray::concatenate;
        let Some(first) = parts.first() else { return Err(EngineError::Ort("no rows to join. This is a bug.".into())) };
        let cat2 = |f: &dyn Fn(&BatchOutput) -> ndarray::ArrayView2<f32>| concatenate(Axis(0), &parts.iter().map(f).collect::<Vec<_>>()).map_err(ort_err);
        let cat4 = |f: &dyn Fn(&BatchOutput) -> Option<ndarray::ArrayView4<f32>>| -> Result<Option<Array4<f32>>, EngineError> {
            let views: Option<Vec<_>> = parts.iter().map(f).collect();
            views.map(|v| concatenate(Axis(0), &v).map_err(ort_err)).transpose()
        };
        let input_grads = (0..first.input_grads.len())
            .map(|k| Ok((first.input_grads[k].0, cat4(&|p| p.input_grads.get(k).map(|g| g.1.view()))?.unwrap_or_default())))
            .collect::<Result<Vec<_>, EngineError>>()?;
        let attention = (0..first.attention.len())
            .map(|k| {
                let a = cat4(&|p| p.attention.get(k).map(|g| g.0.view()))?.unwrap_or_default();
                let g = cat4(&|p| p.attention.get(k).map(|g| g.1.view()))?.unwrap_or_default();
                Ok((a, g))
            })
            .collect::<Result<Vec<_>, EngineError>>()?;
        Ok(BatchOutput {
            logits: cat2(&|p| p.logits.view())?,
            targets: parts.iter().map(|p| p.targets.clone()).collect::<Option<Vec<_>>>().map(|t| t.concat()),
            activations: cat4(&|p| p.activations.as_ref().map(|a| a.view()))?,
            gradients: cat4(&|p| p.gradients.as_ref().map(|a| a.view()))?,
            input_grads,
            attention,
        })
    }

    pub fn len(&self) -> usize {
        self.logits.len_of(Axis(0))
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
