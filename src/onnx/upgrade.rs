//! Brings a model to opset 17 or newer, so that the rewrite can emit one form of every op (reduction axes and
//! split sizes as inputs, ScatterElements with `reduction`, ...).
//!
//! Only the default domain is touched, and only ops whose changes between opsets 7 and 17 are known are
//! accepted; anything else fails with a message that names the op, never a silently changed model.

use std::collections::HashMap;

use super::builder;
use super::proto::ModelProto;
use super::{attr, default_opset, is_default_domain, tensor, OnnxError, Result};

/// The opset the rewrite emits for. Models below it are upgraded to it.
pub const TARGET_OPSET: i64 = 17;
const OLDEST_OPSET: i64 = 7;

/// Ops whose meaning for inference did not change from opset 7 (or the opset that introduced them) to 17, or
/// that `upgrade` converts. The later additions changed only in types or in attributes whose defaults keep the
/// old meaning: ScatterElements/ScatterND (`reduction`, 16: default none), GatherND (`batch_dims`, 12: default 0),
/// Compress (negative axes, 11), CumSum, NonZero, Mod, Round, Sign, Sin, Cos, Einsum, Trilu, the comparison ops
/// and the Reduce family below 18 (axes stay an attribute; ReduceSum's is moved to an input above).
const KNOWN_OPS: &[&str] = &[
    "Abs", "Add", "And", "ArgMax", "ArgMin", "AveragePool", "BatchNormalization", "Cast", "Ceil", "Clip", "Compress",
    "Concat", "Constant", "ConstantOfShape", "Conv", "ConvTranspose", "Cos", "CumSum", "Div", "Dropout", "Einsum",
    "Elu", "Equal", "Erf", "Exp", "Expand", "Flatten", "Floor", "Gather", "GatherElements", "GatherND", "Gemm",
    "GlobalAveragePool", "GlobalMaxPool", "Greater", "GreaterOrEqual", "HardSigmoid", "Identity",
    "InstanceNormalization", "LRN", "LeakyRelu", "Less", "LessOrEqual", "Log", "LogSoftmax", "MatMul", "Max",
    "MaxPool", "Mean", "Min", "Mod", "Mul", "Neg", "NonZero", "Not", "Or", "PRelu", "Pad", "Pow", "Range",
    "Reciprocal", "ReduceL1", "ReduceL2", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd",
    "ReduceSum", "ReduceSumSquare", "Relu", "Reshape", "Resize", "Round", "ScatterElements", "ScatterND", "Selu",
    "Shape", "Sigmoid", "Sign", "Sin", "Size", "Slice", "Softmax", "Softplus", "Softsign", "Split", "Sqrt",
    "Squeeze", "Sub", "Sum", "Tanh", "Tile", "Transpose", "Trilu", "Unsqueeze", "Upsample", "Where", "Xor",
];

/// Upgrades `model` in place when its default-domain opset is below [`TARGET_OPSET`]. `rank` gives the rank of
/// a tensor (from the shape probe); it is needed for Softmax below opset 13. Returns the original opset.
pub fn upgrade(model: &mut ModelProto, rank: &dyn Fn(&str) -> Option<usize>) -> Result<i64> {
    let from = default_opset(model).ok_or_else(|| OnnxError::Invalid("the model imports no default-domain opset".into()))?;
    if from >= TARGET_OPSET {
        return Ok(from);
    }
    let fail = |reason: String| OnnxError::Upgrade { target: TARGET_OPSET, reason };
    if from < OLDEST_OPSET {
        return Err(fail(format!("opset {from} is older than {OLDEST_OPSET}; re-export the model")));
    }
    let graph = model.graph.as_mut().ok_or_else(|| OnnxError::Invalid("the model has no graph".into()))?;
    let consumed: HashMap<String, usize> = graph.node.iter().flat_map(|n| n.input.iter()).fold(HashMap::new(), |mut m, i| {
        *m.entry(i.clone()).or_default() += 1;
        m
    });
    let outputs: Vec<String> = graph.output.iter().map(|o| o.name().to_string()).collect();
    let mut new_inits = NewConstants::default();
    let mut new_nodes = Vec::with_capacity(graph.node.len());
    for mut node in std::mem::take(&mut graph.node) {
        if !is_default_domain(node.domain()) {
            new_nodes.push(node);
            continue;
        }
        let op = node.op_type().to_string();
        if !KNOWN_OPS.contains(&op.as_str()) {
            return Err(fail(format!(
                "op `{op}` (node `{}`) at opset {from} has no known upgrade; export the model at opset {TARGET_OPSET} or newer",
                super::graph::node_label(&node)
            )));
        }
        attr::remove(&mut node, "consumed_inputs");
        match op.as_str() {
            "BatchNormalization" => {
                if attr::int(&node, "spatial") == Some(0) {
                    return Err(fail("BatchNormalization with spatial=0".into()));
                }
                attr::remove(&mut node, "spatial");
                attr::remove(&mut node, "is_test");
                node.output.truncate(1);
            }
            "Dropout" => {
                if node.output.get(1).is_some_and(|m| consumed.contains_key(m) || outputs.contains(m)) {
                    return Err(fail("Dropout whose mask output is used".into()));
                }
                node.op_type = Some("Identity".into());
                node.attribute.clear();
                node.input.truncate(1);
                node.output.truncate(1);
            }
            "Squeeze" | "Unsqueeze" | "ReduceSum" if from < 13 => {
                if let Some(a) = attr::remove(&mut node, "axes") {
                    let name = new_inits.ints(&a.ints);
                    node.input.truncate(1);
                    node.input.push(name);
                }
            }
            "Split" if from < 13 => {
                if let Some(a) = attr::remove(&mut node, "split") {
                    let name = new_inits.ints(&a.ints);
                    node.input.truncate(1);
                    node.input.push(name);
                }
            }
            "Clip" if from < 11 => {
                let min = attr::remove(&mut node, "min").map(|a| a.f());
                let max = attr::remove(&mut node, "max").map(|a| a.f());
                let min_name = min.map(|v| new_inits.scalar(v)).unwrap_or_default();
                let max_name = max.map(|v| new_inits.scalar(v));
                node.input.truncate(1);
                node.input.push(min_name);
                if let Some(m) = max_name {
                    node.input.push(m);
                }
            }
            "Pad" if from < 11 => {
                let pads = attr::remove(&mut node, "pads").map(|a| a.ints).unwrap_or_default();
                let value = attr::remove(&mut node, "value").map(|a| a.f()).unwrap_or(0.0);
                let p = new_inits.ints(&pads);
                let v = new_inits.scalar(value);
                node.input.truncate(1);
                node.input.push(p);
                node.input.push(v);
            }
            "Slice" if from < 10 => {
                let starts = attr::remove(&mut node, "starts").map(|a| a.ints).unwrap_or_default();
                let ends = attr::remove(&mut node, "ends").map(|a| a.ints).unwrap_or_default();
                let axes = attr::remove(&mut node, "axes").map(|a| a.ints);
                node.input.truncate(1);
                node.input.push(new_inits.ints(&starts));
                node.input.push(new_inits.ints(&ends));
                if let Some(axes) = axes {
                    node.input.push(new_inits.ints(&axes));
                }
            }
            // Upsample (7-9) and Resize-10 scale with `x_in = x_out / scale` and, for nearest, floor: Resize-11's
            // asymmetric coordinates and floor rounding (the ONNX version converter's mapping). Resize 11-16
            // differ from 17 only in inputs becoming optional.
            "Upsample" | "Resize" if op == "Upsample" || from < 11 => {
                let scales = match attr::remove(&mut node, "scales") {
                    Some(a) => new_inits.floats(&a.floats),
                    None => node.input.get(1).cloned().ok_or_else(|| fail(format!("{op} without scales")))?,
                };
                let mode = attr::remove(&mut node, "mode").map(|a| String::from_utf8_lossy(a.s()).into_owned());
                let mode = match mode.as_deref() {
                    None | Some("nearest") => "nearest",
                    Some("linear" | "bilinear") => "linear",
                    Some(m) => return Err(fail(format!("{op} mode `{m}`"))),
                };
                node.op_type = Some("Resize".into());
                node.input = vec![node.input[0].clone(), String::new(), scales];
                attr::set(&mut node, attr::make_string("mode", mode));
                attr::set(&mut node, attr::make_string("coordinate_transformation_mode", "asymmetric"));
                if mode == "nearest" {
                    attr::set(&mut node, attr::make_string("nearest_mode", "floor"));
                }
            }
            "Softmax" | "LogSoftmax" if from < 13 => {
                // Below 13 the op flattens to 2-D at `axis` (default 1); from 13 it works on one axis.
                let r = rank(&node.input[0]).ok_or_else(|| fail(format!("rank of `{}` unknown", node.input[0])))?;
                let axis = attr::int_or(&node, "axis", 1);
                let axis = if axis < 0 { axis + r as i64 } else { axis };
                if axis != r as i64 - 1 {
                    // Flatten(axis) -> op(axis=1) -> Reshape back.
                    let base = new_inits.fresh();
                    let (flat, inner, shape) = (format!("{base}.flat"), format!("{base}.inner"), format!("{base}.shape"));
                    let x = node.input[0].clone();
                    let y = node.output[0].clone();
                    new_nodes.push(builder::node("Flatten", &[&x], &flat, vec![attr::make_int("axis", axis)]));
                    new_nodes.push(builder::node(&op, &[&flat], &inner, vec![attr::make_int("axis", 1)]));
                    new_nodes.push(builder::node("Shape", &[&x], &shape, vec![]));
                    new_nodes.push(builder::node("Reshape", &[&inner, &shape], &y, vec![]));
                    continue;
                }
                attr::set(&mut node, attr::make_int("axis", axis));
            }
            _ => {}
        }
        new_nodes.push(node);
    }
    graph.node = new_nodes;
    graph.initializer.extend(new_inits.list);
    for o in model.opset_import.iter_mut().filter(|o| is_default_domain(o.domain())) {
        o.version = Some(TARGET_OPSET);
    }
    model.ir_version = Some(model.ir_version().max(8));
    Ok(from)
}

/// Initializers the upgrade adds (attributes that became inputs), under fresh names.
#[derive(Default)]
struct NewConstants {
    list: Vec<super::proto::TensorProto>,
    counter: usize,
}

impl NewConstants {
    fn fresh(&mut self) -> String {
        self.counter += 1;
        format!("camserve/upgrade/{}", self.counter)
    }

    fn ints(&mut self, v: &[i64]) -> String {
        let name = self.fresh();
        self.list.push(tensor::i64_tensor(&name, &[v.len() as i64], v));
        name
    }

    fn floats(&mut self, v: &[f32]) -> String {
        let name = self.fresh();
        self.list.push(tensor::f32_tensor(&name, &[v.len() as i64], v));
        name
    }

    fn scalar(&mut self, v: f32) -> String {
        let name = self.fresh();
        self.list.push(tensor::f32_tensor(&name, &[], &[v]));
        name
    }
}
