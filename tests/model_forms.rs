//! The forms real exports take: shape arithmetic beside the gradient path, Paddle's `-1` dims, NHWC inputs,
//! transformer token layers, module paths, local functions, rule refusals reported by `inspect`.

mod common;

use camserve::onnx::proto::{FunctionProto, OperatorSetIdProto, StringStringEntryProto};
use camserve::onnx::rewrite::{ExplainPlan, InputLayout, LayerLayout, PrepareOptions};
use camserve::onnx::rules::ReluRule;
use camserve::onnx::{contract, io, tensor};
use common::*;
use ndarray::{ArrayD, IxDyn};
use ort::session::builder::GraphOptimizationLevel as Level;

fn run_explain(model: &camserve::onnx::ModelProto, x: &ArrayD<f32>, seed: &ArrayD<f32>, outputs: &[&str]) -> Vec<ArrayD<f32>> {
    let mut s = session(model, Level::All);
    run(&mut s, vec![("x", x.clone()), (contract::SEED, seed.clone())], outputs)
}

fn seeds(k: usize) -> ArrayD<f32> {
    uniform(&mut rng(9), &[2, k], -1.0, 1.0)
}

fn set_input_dims(model: &mut camserve::onnx::ModelProto, dims: &[Option<i64>]) {
    let g = model.graph.as_mut().unwrap();
    g.input[0] = value_info("x", dims);
}

/// Declared dims with raw values (Paddle's -1 included).
fn set_raw_input_dims(model: &mut camserve::onnx::ModelProto, dims: &[i64]) {
    use camserve::onnx::proto::{tensor_shape_proto::dimension::Value, type_proto};
    let g = model.graph.as_mut().unwrap();
    let Some(type_proto::Value::TensorType(t)) = g.input[0].r#type.as_mut().unwrap().value.as_mut() else { panic!() };
    for (d, &v) in t.shape.as_mut().unwrap().dim.iter_mut().zip(dims) {
        d.value = Some(Value::DimValue(v));
    }
}

/// TF-style SAME padding computed at run time from the input's shape (timm's `tf_efficientnet_*`, tf2onnx):
/// Shape -> Cast -> Div -> Ceil -> ... -> Pad. Ceil, Cast and the arithmetic sit on float tensors computed from
/// the input, but not through differentiable inputs: nothing there may be refused, and the gradient through
/// the Pad and Conv must be exact.
#[test]
fn shape_arithmetic_beside_the_path_is_never_refused() {
    let dims = [2usize, 2, 7, 7];
    let mut g = G::new(&[2, 2, 7, 7], 3);
    let x = g.x();
    let shape = g.op("Shape", &[&x], vec![]);
    let idx = g.ints(&[2]);
    let h = g.op("Gather", &[&shape, &idx], vec![a_i("axis", 0)]);
    let hf = g.op("Cast", &[&h], vec![a_i("to", tensor::FLOAT as i64)]);
    let stride = g.scalar(2.0);
    let q = g.op("Div", &[&hf, &stride], vec![]);
    let out = g.op("Ceil", &[&q], vec![]);
    // pad_total = max((out - 1) * stride + k - h, 0) with k = 3; split before/after as TF does.
    let one = g.scalar(1.0);
    let om1 = g.op("Sub", &[&out, &one], vec![]);
    let span = g.op("Mul", &[&om1, &stride], vec![]);
    let k = g.scalar(3.0);
    let need = g.op("Add", &[&span, &k], vec![]);
    let total = g.op("Sub", &[&need, &hf], vec![]);
    let half = g.op("Div", &[&total, &stride], vec![]);
    let before = g.op("Floor", &[&half], vec![]);
    let after = g.op("Sub", &[&total, &before], vec![]);
    let b_i = g.op("Cast", &[&before], vec![a_i("to", tensor::INT64 as i64)]);
    let a_i64 = g.op("Cast", &[&after], vec![a_i("to", tensor::INT64 as i64)]);
    let zeros = g.ints(&[0, 0]);
    let pads = g.op("Concat", &[&zeros, &b_i, &b_i, &zeros, &a_i64, &a_i64], vec![a_i("axis", 0)]);
    let padded = g.op("Pad", &[&x, &pads], vec![]);
    let w = g.rand(&[3, 2, 3, 3], 0.5);
    let y = g.op("Conv", &[&padded, &w], vec![a_is("strides", &[2, 2])]);
    let model = g.finish(&y);
    let ex = camserve::backend::probe::analyse(model.clone(), &PrepareOptions::default()).unwrap();
    assert!(ex.unsupported.is_empty(), "refused: {:?}", ex.unsupported);
    assert!(ex.refusals().is_empty(), "refused: {:?}", ex.refusals());
    let x = uniform(&mut rng(1), &dims, -1.0, 1.0);
    check_gradients(&model, &x, 0.5, 1e-4);
}

/// EdgeNeXt-style positional encoding built from shapes (Range, Sin, Cos, CumSum of constants) added to the
/// features: forward only, never refused.
#[test]
fn positional_encoding_from_shapes_is_forward_only() {
    let mut g = G::new(&[2, 2, 5, 5], 4);
    let x = g.x();
    let shape = g.op("Shape", &[&x], vec![]);
    let idx = g.ints(&[3]);
    let w = g.op("Gather", &[&shape, &idx], vec![a_i("axis", 0)]);
    let wf = g.op("Cast", &[&w], vec![a_i("to", tensor::FLOAT as i64)]);
    let ones = g.op("ConstantOfShape", &[&w], vec![camserve::onnx::attr::make_tensor("value", tensor::f32_tensor("", &[1], &[1.0]))]);
    let axis = g.ints(&[0]);
    let pos = g.op("CumSum", &[&ones, &axis], vec![]);
    let norm = g.op("Div", &[&pos, &wf], vec![]);
    let s = g.op("Sin", &[&norm], vec![]);
    let c = g.op("Cos", &[&norm], vec![]);
    let enc = g.op("Add", &[&s, &c], vec![]);
    let y = g.op("Add", &[&x, &enc], vec![]);
    let r = g.op("Mul", &[&y, &y], vec![]);
    let model = g.finish(&r);
    let ex = camserve::backend::probe::analyse(model.clone(), &PrepareOptions::default()).unwrap();
    assert!(ex.unsupported.is_empty(), "refused: {:?}", ex.unsupported);
    let x = uniform(&mut rng(2), &[2, 2, 5, 5], -1.0, 1.0);
    check_gradients(&model, &x, 1e-2, 5e-4);
}

/// Paddle declares a dynamic batch as -1 (and some exporters write 0): dynamic, not corrupt. Other negative
/// values are still refused before ONNX Runtime sees them.
#[test]
fn paddle_minus_one_dims_are_dynamic() {
    let mut g = G::new(&[2, 3, 8, 8], 5);
    let x = g.x();
    let w = g.rand(&[4, 3, 3, 3], 0.5);
    let y = g.op("Conv", &[&x, &w], vec![]);
    let mut model = g.finish(&y);
    set_raw_input_dims(&mut model, &[-1, 3, 8, 8]);
    let bytes = io::encode_model(&model).unwrap();
    let loaded = io::decode_model(bytes::Bytes::from(bytes), None).unwrap();
    let ex = camserve::backend::probe::analyse(loaded, &PrepareOptions::default()).unwrap();
    assert_eq!(ex.input_dims, vec![1, 3, 8, 8]);
    let x = uniform(&mut rng(3), &[2, 3, 8, 8], -1.0, 1.0);
    let explain = ex.build(&ExplainPlan::new("x_id", [ReluRule::Plain])).unwrap();
    let out = run_explain(&explain, &x, &seeds(ex.num_classes), &[&ex.logits]);
    assert_eq!(out[0].shape()[0], 2);

    // -1 for height and width: dynamic, so the config's input size is needed.
    set_raw_input_dims(&mut model, &[-1, 3, -1, -1]);
    let bytes = io::encode_model(&model).unwrap();
    let loaded = io::decode_model(bytes::Bytes::from(bytes), None).unwrap();
    let err = camserve::backend::probe::analyse(loaded.clone(), &PrepareOptions::default()).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("input_size"), "{err}");
    let ex = camserve::backend::probe::analyse(loaded, &PrepareOptions { input_size: Some((8, 8)), layout: None }).unwrap();
    assert_eq!(ex.input_dims, vec![1, 3, 8, 8]);

    set_raw_input_dims(&mut model, &[-2, 3, 8, 8]);
    let bytes = io::encode_model(&model).unwrap();
    let err = io::decode_model(bytes::Bytes::from(bytes), None).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("negative dimension"), "{err}");
}

/// A Keras/tf2onnx model takes `[N, H, W, 3]` and transposes to NCHW first. camserve detects the layout, feeds
/// NCHW, and the result equals the same network declared NCHW: logits, layer gradients and input gradients.
#[test]
fn nhwc_input_is_detected_and_fed_nchw() {
    let build = |nhwc: bool| {
        let mut g = G::new(&[2, 3, 8, 8], 6);
        let x = if nhwc {
            g.op("Transpose", &["x"], vec![a_is("perm", &[0, 3, 1, 2])])
        } else {
            g.x()
        };
        let w = g.rand(&[4, 3, 3, 3], 0.5);
        let c = g.op("Conv", &[&x, &w], vec![a_is("pads", &[1, 1, 1, 1])]);
        let r = g.op("Relu", &[&c], vec![]);
        let p = g.op("GlobalAveragePool", &[&r], vec![]);
        let mut model = g.finish(&p);
        if nhwc {
            set_input_dims(&mut model, &[None, Some(8), Some(8), Some(3)]);
        }
        model
    };
    let nhwc = camserve::backend::probe::analyse(build(true), &PrepareOptions::default()).unwrap();
    let nchw = camserve::backend::probe::analyse(build(false), &PrepareOptions::default()).unwrap();
    assert_eq!(nhwc.input_layout, InputLayout::Nhwc);
    assert_eq!(nchw.input_layout, InputLayout::Nchw);
    assert_eq!(nhwc.input_dims, vec![1, 3, 8, 8]);
    let layer = nchw.default_layer.clone().unwrap();
    let layer_nhwc = nhwc.default_layer.clone().unwrap();
    let a = nhwc.build(&ExplainPlan::new(layer_nhwc, [ReluRule::Plain, ReluRule::Guided])).unwrap();
    let b = nchw.build(&ExplainPlan::new(layer, [ReluRule::Plain, ReluRule::Guided])).unwrap();
    let x = uniform(&mut rng(4), &[2, 3, 8, 8], -1.0, 1.0);
    let seed = seeds(nchw.num_classes);
    let names = ["logits", contract::GRADIENTS, "camserve.input_grad.plain", "camserve.input_grad.guided"];
    let (ra, rb) = (run_explain(&a, &x, &seed, &names), run_explain(&b, &x, &seed, &names));
    for (i, n) in names.iter().enumerate() {
        assert!(rel_err(&ra[i], &rb[i]) < 1e-6, "{n} differs");
    }
    // Stated in the config, a layout wins over the guess.
    let forced = camserve::backend::probe::analyse(build(false), &PrepareOptions { input_size: None, layout: Some(InputLayout::Nchw) }).unwrap();
    assert_eq!(forced.input_layout, InputLayout::Nchw);
}

/// A ViT in miniature: patch embedding, a class token, LayerNorm, one attention block, the class token's
/// LayerNorm output to the head. The token layers map to the 2x3 patch grid (non-square), the default layer is
/// the LayerNorm that feeds the attention, and the explain graph's activations and gradients are the grid
/// tokens in NCHW: `tokens[:, 1:, :].reshape(N, h, w, C).permute(0, 3, 1, 2)`, pytorch-grad-cam's
/// `reshape_transform`.
#[test]
fn vit_tokens_map_to_the_patch_grid() {
    let (c, n) = (4i64, 2usize);
    let mut g = G::new(&[2, 3, 8, 12], 7);
    let x = g.x();
    let wp = g.rand(&[c, 3, 4, 4], 0.5);
    let patches = g.op("Conv", &[&x, &wp], vec![a_is("strides", &[4, 4])]); // [N, C, 2, 3]
    let flat_shape = g.ints(&[0, c, 6]);
    let flat = g.op("Reshape", &[&patches, &flat_shape], vec![]);
    let tokens = g.op("Transpose", &[&flat], vec![a_is("perm", &[0, 2, 1])]); // [N, 6, C]
    let cls = g.rand(&[1, 1, c], 0.5);
    let shape = g.op("Shape", &[&x], vec![]);
    let zero = g.ints(&[0]);
    let nb = g.op("Gather", &[&shape, &zero], vec![a_i("axis", 0)]);
    let tail = g.ints(&[1, c]);
    let cls_shape = g.op("Concat", &[&nb, &tail], vec![a_i("axis", 0)]);
    let cls_n = g.op("Expand", &[&cls, &cls_shape], vec![]);
    let seq = g.op("Concat", &[&cls_n, &tokens], vec![a_i("axis", 1)]); // [N, 7, C]
    let gamma = g.rand(&[c], 1.0);
    let beta = g.rand(&[c], 0.5);
    let norm1 = g.op("LayerNormalization", &[&seq, &gamma, &beta], vec![a_i("axis", -1)]);
    let wq = g.rand(&[c, c], 0.5);
    let wk = g.rand(&[c, c], 0.5);
    let q = g.op("MatMul", &[&norm1, &wq], vec![]);
    let k = g.op("MatMul", &[&norm1, &wk], vec![]);
    let kt = g.op("Transpose", &[&k], vec![a_is("perm", &[0, 2, 1])]);
    let scores = g.op("MatMul", &[&q, &kt], vec![]);
    let attn = g.op("Softmax", &[&scores], vec![a_i("axis", -1)]);
    let mixed = g.op("MatMul", &[&attn, &norm1], vec![]);
    let res = g.op("Add", &[&seq, &mixed], vec![]);
    let gamma2 = g.rand(&[c], 1.0);
    let norm = g.op("LayerNormalization", &[&res, &gamma2], vec![a_i("axis", -1)]);
    let start = g.ints(&[0]);
    let end = g.ints(&[1]);
    let ax = g.ints(&[1]);
    let cls_out = g.op("Slice", &[&norm, &start, &end, &ax], vec![]); // [N, 1, C]
    let wh = g.rand(&[1, c, 5], 0.5);
    let logits = g.op("MatMul", &[&cls_out, &wh], vec![]);
    let model = g.finish(&logits);

    let ex = camserve::backend::probe::analyse(model, &PrepareOptions::default()).unwrap();
    assert!(ex.unsupported.is_empty(), "{:?}", ex.unsupported);
    let l = ex.layer(&norm1).expect("the LayerNorm output is a layer");
    assert_eq!(l.layout, LayerLayout::Tokens { prefix: 1 });
    assert_eq!(l.dims, vec![1, c, 2, 3]);
    assert_eq!(ex.default_layer.as_deref(), Some(norm1.as_str()), "the LayerNorm feeding the attention");
    // Not the final norm: only the class token reaches the head from there.
    assert!(ex.layer(&norm).is_some());

    let explain = ex.build(&ExplainPlan::new(norm1.clone(), [ReluRule::Plain])).unwrap();
    let xin = uniform(&mut rng(5), &[n, 3, 8, 12], -1.0, 1.0);
    let seed = seeds(5);
    // The same graph with the token tensor and its gradient as outputs: the Plain chain exposes the layer
    // gradient through its input chain, so compare with a build whose layer is the token tensor itself.
    let out = run_explain(&explain, &xin, &seed, &[contract::ACTIVATIONS, contract::GRADIENTS]);
    assert_eq!(out[0].shape(), &[n, c as usize, 2, 3]);
    // Activations: the grid tokens of the plain model's norm1, read back through a probe model.
    let mut probe_model = explain.clone();
    probe_model.graph.as_mut().unwrap().output.push(camserve::onnx::proto::ValueInfoProto { name: Some(norm1.clone()), ..Default::default() });
    let tok = run_explain(&probe_model, &xin, &seed, &[&norm1])[0].clone(); // [N, 7, C]
    let mut expected = ArrayD::<f32>::zeros(IxDyn(&[n, c as usize, 2, 3]));
    for b in 0..n {
        for ch in 0..c as usize {
            for i in 0..2 {
                for j in 0..3 {
                    expected[[b, ch, i, j]] = tok[[b, 1 + i * 3 + j, ch]];
                }
            }
        }
    }
    assert_eq!(rel_err(&out[0], &expected), 0.0);
    assert!(max_abs(&out[1]) > 0.0, "the grid tokens' gradient is all zeros");
}

/// The TorchScript exporter names nodes after the module path, the dynamo exporter records it in
/// `pkg.torch.onnx.name_scopes`: a layer can be named either way.
#[test]
fn layers_by_module_path() {
    let mut g = G::new(&[2, 3, 8, 8], 8);
    let x = g.x();
    let w1 = g.rand(&[4, 3, 3, 3], 0.5);
    let c1 = g.op("Conv", &[&x, &w1], vec![a_is("pads", &[1, 1, 1, 1])]);
    let r1 = g.op("Relu", &[&c1], vec![]);
    let w2 = g.rand(&[4, 4, 3, 3], 0.5);
    let c2 = g.op("Conv", &[&r1, &w2], vec![a_is("pads", &[1, 1, 1, 1])]);
    let p = g.op("GlobalAveragePool", &[&c2], vec![]);
    let mut model = g.finish(&p);
    let nodes = &mut model.graph.as_mut().unwrap().node;
    nodes[1].name = Some("/layer1/layer1.0/conv1/Conv".into());
    nodes[2].name = Some("/layer1/layer1.0/relu/Relu".into());
    nodes[3].metadata_props.push(StringStringEntryProto {
        key: Some("pkg.torch.onnx.name_scopes".into()),
        value: Some("['', 'layer2', 'layer2.conv']".into()),
    });
    let ex = camserve::backend::probe::analyse(model, &PrepareOptions::default()).unwrap();
    assert_eq!(ex.layer("layer1").map(|l| l.name.as_str()), Some(r1.as_str()));
    assert_eq!(ex.layer("layer1.0.conv1").map(|l| l.name.as_str()), Some(c1.as_str()));
    assert_eq!(ex.layer("layer2").map(|l| l.name.as_str()), Some(c2.as_str()));
    assert!(ex.layer("layer3").is_none());
    assert!(ex.build(&ExplainPlan::new("layer1", [])).is_ok());
}

/// Local functions (exporters' modules and composite ops) are inlined, attribute references bound.
#[test]
fn local_functions_are_inlined() {
    let mut g = G::new(&[2, 2, 5, 5], 9);
    let x = g.x();
    let y = g.op("ScaledLeaky", &[&x], vec![a_f("slope", 0.25)]);
    let mut model = g.finish(&y);
    let graph = model.graph.as_mut().unwrap();
    let call = graph.node.iter_mut().find(|n| n.op_type() == "ScaledLeaky").unwrap();
    call.domain = Some("local".into());
    let mut leaky = node("LeakyRelu", &["a"], &["b"], vec![]);
    leaky.attribute.push(camserve::onnx::proto::AttributeProto {
        name: Some("alpha".into()),
        ref_attr_name: Some("slope".into()),
        r#type: Some(camserve::onnx::proto::attribute_proto::AttributeType::Float as i32),
        ..Default::default()
    });
    let two = node("Constant", &[], &["two"], vec![camserve::onnx::attr::make_tensor("value", tensor::f32_tensor("", &[], &[2.0]))]);
    let mul = node("Mul", &["b", "two"], &["out"], vec![]);
    model.functions.push(FunctionProto {
        name: Some("ScaledLeaky".into()),
        domain: Some("local".into()),
        input: vec!["a".into()],
        output: vec!["out".into()],
        attribute: vec!["slope".into()],
        node: vec![leaky, two, mul],
        opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(17) }],
        ..Default::default()
    });
    model.opset_import.push(OperatorSetIdProto { domain: Some("local".into()), version: Some(1) });
    let ex = camserve::backend::probe::analyse(model.clone(), &PrepareOptions::default()).unwrap();
    assert!(ex.unsupported.is_empty(), "{:?}", ex.unsupported);
    let x = away_from_zero(&mut rng(6), &[2, 2, 5, 5], 0.1);
    // The inlined graph against closed form: d/dx 2 * leaky(x, 0.25) = 2 or 0.5.
    let explain = ex.build(&ExplainPlan::new("x_id", [ReluRule::Plain])).unwrap();
    let seed = ArrayD::<f32>::ones(IxDyn(&[2, 50]));
    let out = run_explain(&explain, &x, &seed, &["camserve.input_grad.plain"]);
    let expected = x.mapv(|v| if v > 0.0 { 2.0 } else { 0.5 });
    assert_eq!(rel_err(&out[0], &expected), 0.0);
}

/// `inspect` reports what a rule refuses (attributes, computed inputs), not only ops without a rule, and all of
/// them at once.
#[test]
fn inspect_reports_rule_refusals() {
    let mut g = G::new(&[2, 2, 6, 6], 10);
    let x = g.x();
    // Every other item of the batch: refused whatever the step, since the served batch is not the probe's.
    let (s, e, a, st) = (g.ints(&[0]), g.ints(&[i64::MAX]), g.ints(&[0]), g.ints(&[2]));
    let sliced = g.op("Slice", &[&x, &s, &e, &a, &st], vec![]);
    let lrn = g.op("LRN", &[&sliced], vec![a_i("size", 3)]);
    let exponent = g.op("ReduceMean", &[&x], vec![a_i("keepdims", 0)]);
    let p = g.op("Pow", &[&lrn, &exponent], vec![]);
    let model = g.finish(&p);
    let report = camserve::backend::probe::inspect(model, &PrepareOptions::default()).unwrap();
    let text = report.to_string();
    assert!(report.has_unsupported());
    for needle in ["LRN (node", "no backward rule", "Slice (node", "batch axis", "Pow (node"] {
        assert!(text.contains(needle), "`{needle}` missing from:\n{text}");
    }
}

/// A model that ends in Softmax is explained on its pre-softmax scores, and says so.
#[test]
fn trailing_softmax_is_stripped_and_reported() {
    let mut g = G::new(&[2, 3, 8, 8], 11);
    let x = g.x();
    let p = g.op("GlobalAveragePool", &[&x], vec![]);
    let f = g.op("Flatten", &[&p], vec![]);
    let w = g.rand(&[3, 4], 0.5);
    let l = g.op("MatMul", &[&f, &w], vec![]);
    let s = g.op("Softmax", &[&l], vec![a_i("axis", -1)]);
    let mut model = g.finish(&s);
    // The model's output is the Softmax itself (no Flatten after it, unlike the other test graphs).
    let graph = model.graph.as_mut().unwrap();
    graph.node.pop();
    graph.node.last_mut().unwrap().output[0] = "logits".into();
    let s = "logits".to_string();
    let ex = camserve::backend::probe::analyse(model.clone(), &PrepareOptions::default()).unwrap();
    assert_eq!(ex.stripped_output_op.as_deref(), Some("Softmax"));
    assert_eq!(ex.logits, l);
    assert_ne!(ex.logits, s);
    let text = camserve::backend::probe::inspect(model, &PrepareOptions::default()).unwrap().to_string();
    assert!(text.contains("the scores before the final Softmax"), "{text}");
}

/// A Softmax followed by Identity nodes (Paddle's inference models end `softmax -> scale`, which paddle2onnx writes
/// as an Identity), or by a Reshape, Flatten, Cast (Keras and TorchScript endings), is stripped too: the
/// explanations use the scores before it (issue 28).
#[test]
fn softmax_behind_value_preserving_ops_is_stripped() {
    let mut g = G::new(&[2, 3, 8, 8], 11);
    let x = g.x();
    let p = g.op("GlobalAveragePool", &[&x], vec![]);
    let f = g.op("Flatten", &[&p], vec![]);
    let w = g.rand(&[3, 4], 0.5);
    let l = g.op("MatMul", &[&f, &w], vec![]);
    let s = g.op("Softmax", &[&l], vec![a_i("axis", -1)]);
    let shape = g.ints(&[-1, 4, 1]);
    let r = g.op("Reshape", &[&s, &shape], vec![]);
    let c = g.op("Cast", &[&r], vec![a_i("to", 1)]);
    let fl = g.op("Flatten", &[&c], vec![a_i("axis", 1)]);
    let mut model = g.finish(&fl);
    let graph = model.graph.as_mut().unwrap();
    graph.node.pop();
    graph.node.last_mut().unwrap().output[0] = "logits".into();
    let ex = camserve::backend::probe::analyse(model, &PrepareOptions::default()).unwrap();
    assert_eq!(ex.stripped_output_op.as_deref(), Some("Softmax"));
    assert_eq!(ex.logits, l, "the scores before the Softmax");
}

#[test]
fn softmax_behind_identities_is_stripped() {
    let mut g = G::new(&[2, 3, 8, 8], 11);
    let x = g.x();
    let p = g.op("GlobalAveragePool", &[&x], vec![]);
    let f = g.op("Flatten", &[&p], vec![]);
    let w = g.rand(&[3, 4], 0.5);
    let l = g.op("MatMul", &[&f, &w], vec![]);
    let s = g.op("Softmax", &[&l], vec![a_i("axis", -1)]);
    let i = g.op("Identity", &[&s], vec![]);
    let i = g.op("Identity", &[&i], vec![]);
    let mut model = g.finish(&i);
    let graph = model.graph.as_mut().unwrap();
    graph.node.pop();
    graph.node.last_mut().unwrap().output[0] = "logits".into();
    let ex = camserve::backend::probe::analyse(model, &PrepareOptions::default()).unwrap();
    assert_eq!(ex.stripped_output_op.as_deref(), Some("Softmax"));
    assert_eq!(ex.logits, l, "the scores before the Softmax");
}

/// Models below opset 11 upsample with Upsample (7-9) or Resize-10; the upgrade to 17 maps them to Resize with
/// asymmetric coordinates (and floor for nearest). `check_gradients` compares the explain graph's logits with
/// ONNX Runtime running the original opset-9/10 model, so a wrong mapping fails here, then the gradient.
#[test]
fn old_upsample_and_resize_are_upgraded() {
    for (opset, op, mode) in [(9, "Upsample", "nearest"), (9, "Upsample", "linear"), (10, "Resize", "nearest"), (10, "Resize", "linear")] {
        let mut g = G::new(&[2, 2, 4, 5], 12);
        g.opset = opset;
        let x = g.x();
        let scales = g.init(&[4], vec![1.0, 1.0, 2.0, 1.5]);
        let up = g.op(op, &[&x, &scales], vec![a_s("mode", mode)]);
        let w = g.rand(&[1, 2, 8, 7], 1.0);
        let y = g.op("Mul", &[&up, &w], vec![]);
        let model = g.finish(&y);
        let x = uniform(&mut rng(13), &[2, 2, 4, 5], -1.0, 1.0);
        let ex = camserve::backend::probe::analyse(model.clone(), &PrepareOptions::default()).unwrap();
        assert_eq!(ex.source_opset, opset);
        check_gradients(&model, &x, 0.5, 1e-4);
    }
}
