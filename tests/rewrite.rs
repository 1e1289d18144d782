//! The rewrite as a whole: ReLU rules, optimisation levels, unsupported ops, the contract, opset upgrades,
//! external data, layer choice.

mod common;

use camserve::onnx::contract::{self, contract_info};
use camserve::onnx::proto::StringStringEntryProto;
use camserve::onnx::proto::tensor_proto::DataLocation;
use camserve::onnx::rewrite::{ExplainPlan, PrepareOptions};
use camserve::onnx::rules::ReluRule;
use camserve::onnx::{io, OnnxError};
use common::*;
use ndarray::{ArrayD, IxDyn, Zip};
use ort::session::builder::GraphOptimizationLevel as Level;

const ALL_RULES: [ReluRule; 3] = [ReluRule::Plain, ReluRule::Guided, ReluRule::Deconvnet];

fn run_explain(model: &camserve::onnx::ModelProto, x: &ArrayD<f32>, seed: &ArrayD<f32>, level: Level, outputs: &[&str]) -> Vec<ArrayD<f32>> {
    let mut s = session(model, level);
    run(&mut s, vec![("x", x.clone()), (contract::SEED, seed.clone())], outputs)
}

fn grad_names() -> Vec<String> {
    ALL_RULES.iter().map(|r| contract::input_grad_name(*r)).collect()
}

/// x -> Relu or ReLU6 -> Flatten: the three rules in closed form.
fn relu_rules(relu6: bool) {
    let dims = [2usize, 2, 4, 4];
    let mut g = G::new(&[2, 2, 4, 4], 3);
    let x = g.x();
    let y = if relu6 {
        let (lo, hi) = (g.scalar(0.0), g.scalar(6.0));
        g.op("Clip", &[&x, &lo, &hi], vec![])
    } else {
        g.op("Relu", &[&x], vec![])
    };
    let model = g.finish(&y);
    let explain = explain_model(&model, &ALL_RULES);
    let mut r = rng(5);
    let xin = uniform(&mut r, &dims, -8.0, 8.0);
    let seed = uniform(&mut r, &[2, 32], -1.0, 1.0);
    let names = grad_names();
    let out = run_explain(&explain, &xin, &seed, Level::All, &[&names[0], &names[1], &names[2], contract::GRADIENTS]);
    let seed4 = seed.clone().into_shape_with_order(IxDyn(&dims)).unwrap();
    let pass = |v: f32| if relu6 { v > 0.0 && v < 6.0 } else { v > 0.0 };
    let plain = Zip::from(&xin).and(&seed4).map_collect(|&x, &s| if pass(x) { s } else { 0.0 });
    let guided = Zip::from(&xin).and(&seed4).map_collect(|&x, &s| if pass(x) && s > 0.0 { s } else { 0.0 });
    let deconv = seed4.mapv(|s| s.max(0.0));
    assert_eq!(out[0], plain);
    assert_eq!(out[1], guided);
    assert_eq!(out[2], deconv);
    assert_eq!(out[3], plain, "camserve.gradients must use the exact derivative");
    assert_ne!(plain, guided, "the test input must tell the rules apart");
}

#[test]
fn relu_rules_in_closed_form() {
    relu_rules(false);
}

#[test]
fn relu6_rules_in_closed_form() {
    relu_rules(true);
}

/// A small CNN with the usual ops: Conv, BatchNorm, Relu, MaxPool, residual Add, GAP, Gemm, Softmax.
fn small_cnn() -> camserve::onnx::ModelProto {
    let mut g = G::new(&[2, 3, 16, 16], 21);
    let x = g.x();
    let w1 = g.rand(&[8, 3, 3, 3], 0.4);
    let c1 = g.op("Conv", &[&x, &w1], vec![a_is("pads", &[1, 1, 1, 1])]);
    let (s, b, m) = (g.rand(&[8], 1.5), g.rand(&[8], 0.5), g.rand(&[8], 0.3));
    let v = g.init(&[8], (0..8).map(|i| 0.5 + i as f32 * 0.1).collect());
    let bn = g.op("BatchNormalization", &[&c1, &s, &b, &m, &v], vec![]);
    let r1 = g.op("Relu", &[&bn], vec![]);
    let p = g.op("MaxPool", &[&r1], vec![a_is("kernel_shape", &[3, 3]), a_is("strides", &[2, 2]), a_is("pads", &[1, 1, 1, 1])]);
    let w2 = g.rand(&[8, 8, 3, 3], 0.3);
    let c2 = g.op("Conv", &[&p, &w2], vec![a_is("pads", &[1, 1, 1, 1])]);
    let r2 = g.op("Relu", &[&c2], vec![]);
    let add = g.op("Add", &[&r2, &p], vec![]);
    let r3 = g.op("Relu", &[&add], vec![]);
    let gap = g.op("GlobalAveragePool", &[&r3], vec![]);
    let f = g.op("Flatten", &[&gap], vec![a_i("axis", 1)]);
    let w3 = g.rand(&[5, 8], 0.5);
    let b3 = g.rand(&[5], 0.1);
    let fc = g.op("Gemm", &[&f, &w3, &b3], vec![a_i("transB", 1)]);
    g.finish_softmax(&fc)
}

trait FinishSoftmax {
    fn finish_softmax(self, y: &str) -> camserve::onnx::ModelProto;
}

impl FinishSoftmax for G {
    /// Ends the graph in `Softmax(y)` named `probs`, like many exported classifiers.
    fn finish_softmax(mut self, y: &str) -> camserve::onnx::ModelProto {
        let p = self.op("Softmax", &[y], vec![a_i("axis", 1)]);
        let mut m = self.finish(&p);
        // finish() flattened into `logits`; rename so the only output is the probabilities.
        let g = m.graph.as_mut().unwrap();
        let flat = g.node.pop().unwrap();
        let soft = g.node.last_mut().unwrap();
        soft.output[0] = flat.output[0].clone();
        let _ = p;
        m
    }
}

#[test]
fn default_layer_is_last_spatial_tensor() {
    let model = small_cnn();
    let ex = camserve::backend::probe::analyse(model, &PrepareOptions::default()).unwrap();
    let last = ex.layers.iter().rev().find(|l| l.dims[2] > 1).unwrap();
    assert_eq!(ex.default_layer.as_deref(), Some(last.name.as_str()));
    assert!(last.name.contains("Relu"), "expected the last ReLU output, got {}", last.name);
    assert_eq!(last.dims, vec![1, 8, 8, 8]);
    assert_eq!(ex.num_classes, 5);
    assert!(ex.logits.contains("Gemm"), "the trailing Softmax is stripped: logits = {}", ex.logits);
    assert!(ex.unsupported.is_empty());
    let err = ex.build(&ExplainPlan::new("no_such_tensor", [])).unwrap_err();
    assert!(matches!(err, OnnxError::BadLayer(_)), "{err}");
}

#[test]
fn layout_hints_stay_off_graph_outputs() {
    // small_cnn's layer is a ReLU output feeding GlobalAveragePool, whose backward gets a layout hint (an
    // identity MaxPool, rules::RuleCtx::layout_hint) ahead of the ReLU masks; the outputs take the tensor
    // before the hint, and a hint that only an output would use is pruned.
    let ex = camserve::backend::probe::analyse(small_cnn(), &PrepareOptions::default()).unwrap();
    let layer = ex.default_layer.clone().unwrap();
    for rule in ALL_RULES {
        let m = ex.build(&ExplainPlan::new(layer.clone(), [rule])).unwrap();
        let g = m.graph.as_ref().unwrap();
        let is_hint = |n: &camserve::onnx::proto::NodeProto| n.op_type() == "MaxPool" && n.name().contains("layout_hint");
        let hints: Vec<_> = g.node.iter().filter(|n| is_hint(n)).collect();
        assert_eq!(hints.len(), 1, "{rule:?}: hints {:?}", hints.iter().map(|n| n.name()).collect::<Vec<_>>());
        for out in [contract::GRADIENTS.to_string(), contract::input_grad_name(rule)] {
            let id = g.node.iter().find(|n| n.output.first() == Some(&out)).unwrap();
            let src = g.node.iter().find(|n| n.output.contains(&id.input[0])).unwrap();
            assert!(!is_hint(src), "{rule:?}: {out} comes from the layout hint");
        }
    }
    // And the gradients are right through the hint: checked against the plain model by finite differences in
    // tests/backward_rules.rs (polyphase_conv_and_global_pool_behind_relu).
}

#[test]
fn optimisation_levels_agree() {
    let model = small_cnn();
    let ex = camserve::backend::probe::analyse(model, &PrepareOptions::default()).unwrap();
    let plan = ExplainPlan::new(ex.default_layer.clone().unwrap(), ALL_RULES);
    let explain = ex.build(&plan).unwrap();
    let mut r = rng(9);
    let x = uniform(&mut r, &[2, 3, 16, 16], -1.0, 1.0);
    let mut seed = ArrayD::zeros(IxDyn(&[2, 5]));
    seed[[0, 1]] = 1.0;
    seed[[1, 4]] = 1.0;
    let names = grad_names();
    let outs: Vec<&str> = vec![&ex.logits, contract::ACTIVATIONS, contract::GRADIENTS, &names[0], &names[1], &names[2]];
    let none = run_explain(&explain, &x, &seed, Level::Disable, &outs);
    let all = run_explain(&explain, &x, &seed, Level::All, &outs);
    for (i, name) in outs.iter().enumerate() {
        let e = rel_err(&all[i], &none[i]);
        assert!(e <= 1e-5, "{name}: optimisation levels differ by {e:.2e}");
        assert!(max_abs(&none[i]) > 0.0, "{name} is all zeros");
    }
}

#[test]
fn unsupported_op_is_named() {
    let mut g = G::new(&[2, 2, 5, 5], 1);
    let x = g.x();
    let l = g.op("LRN", &[&x], vec![a_i("size", 3)]);
    let model = g.finish(&l);
    let ex = camserve::backend::probe::analyse(model.clone(), &PrepareOptions::default()).unwrap();
    assert_eq!(ex.unsupported.len(), 1);
    assert_eq!(ex.unsupported[0].op, "LRN");
    let err = ex.build(&ExplainPlan::new("x_id", [ReluRule::Guided])).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("op `LRN` (node `LRN:t"), "{msg}");
    let report = camserve::backend::probe::inspect(model, &PrepareOptions::default()).unwrap();
    assert!(report.has_unsupported());
    let text = report.to_string();
    assert!(text.contains("unsupported ops on the gradient path (1)") && text.contains("LRN (node `LRN:t"), "{text}");
}

#[test]
fn inspect_report() {
    let report = camserve::backend::probe::inspect(small_cnn(), &PrepareOptions::default()).unwrap();
    let text = report.to_string();
    assert!(!report.has_unsupported());
    for needle in ["opset: 17", "x [d0, 3, 16, 16]", "logits: ", "(5 classes)", "(default)", "unsupported ops: none"] {
        assert!(text.contains(needle), "`{needle}` missing from:\n{text}");
    }
    assert_eq!(text.matches("(default)").count(), 1);
}

#[test]
fn cli_inspect_exit_codes_and_augment_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let ok = dir.path().join("ok.onnx");
    io::save_model(&small_cnn(), &ok).unwrap();
    let mut g = G::new(&[2, 2, 5, 5], 1);
    let x = g.x();
    let l = g.op("LRN", &[&x], vec![a_i("size", 3)]);
    let bad = dir.path().join("bad.onnx");
    io::save_model(&g.finish(&l), &bad).unwrap();
    let exe = env!("CARGO_BIN_EXE_camserve");
    let st = std::process::Command::new(exe).args(["inspect"]).arg(&ok).output().unwrap();
    assert_eq!(st.status.code(), Some(0), "{}", String::from_utf8_lossy(&st.stderr));
    let st = std::process::Command::new(exe).args(["inspect"]).arg(&bad).output().unwrap();
    assert_eq!(st.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&st.stdout).contains("LRN"));

    let out1 = dir.path().join("explain.onnx");
    let st = std::process::Command::new(exe).arg("augment").arg(&ok).arg("-o").arg(&out1).args(["--rules", "guided,deconvnet"]).output().unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    let m1 = io::load_model(&out1).unwrap();
    let info = contract_info(&m1).expect("augment writes a contract model");
    assert_eq!(info.rules, vec![ReluRule::Guided, ReluRule::Deconvnet]);
    let out2 = dir.path().join("explain2.onnx");
    let st = std::process::Command::new(exe).arg("augment").arg(&out1).arg("-o").arg(&out2).output().unwrap();
    assert!(st.status.success());
    assert!(String::from_utf8_lossy(&st.stderr).contains("already is an explain model"));
    assert_eq!(std::fs::read(&out1).unwrap(), std::fs::read(&out2).unwrap(), "a contract model is not rewritten twice");
    // inspect recognises it too
    let st = std::process::Command::new(exe).arg("inspect").arg(&out1).output().unwrap();
    assert!(String::from_utf8_lossy(&st.stdout).contains("explain model (camserve.contract=1)"));
}

#[test]
fn contract_metadata_and_io() {
    let model = small_cnn();
    let ex = camserve::backend::probe::analyse(model, &PrepareOptions::default()).unwrap();
    let layer = ex.default_layer.clone().unwrap();
    let m = ex.build(&ExplainPlan::new(layer.clone(), [ReluRule::Guided])).unwrap();
    let info = contract_info(&m).unwrap();
    assert_eq!(info.layer, layer);
    assert_eq!(info.rules, vec![ReluRule::Guided]);
    assert_eq!(info.input, "x");
    assert_eq!(info.logits, ex.logits);
    let g = m.graph.as_ref().unwrap();
    let outs: Vec<&str> = g.output.iter().map(|o| o.name()).collect();
    assert_eq!(outs, vec![ex.logits.as_str(), contract::ACTIVATIONS, contract::GRADIENTS, "camserve.input_grad.guided"]);
    let ins: Vec<&str> = g.input.iter().map(|o| o.name()).collect();
    assert_eq!(ins, vec!["x", contract::SEED]);
    // The Softmax is gone (pruned), and MaxPool got its Indices because the guided chain passes it.
    assert!(g.node.iter().all(|n| n.op_type() != "Softmax"));
    assert!(g.node.iter().any(|n| n.op_type() == "MaxPool" && n.output.len() == 2));
    // A Grad-CAM-only plan at the last layer does not touch the MaxPool below it.
    let m2 = ex.build(&ExplainPlan::new(layer, [])).unwrap();
    let g2 = m2.graph.as_ref().unwrap();
    assert!(g2.node.iter().any(|n| n.op_type() == "MaxPool" && n.output.len() == 1));
    assert!(g2.node.iter().all(|n| n.op_type() != "ConvTranspose" || !n.name().contains("guided")));
    assert!(contract_info(&small_cnn()).is_none());
    assert!(camserve::backend::probe::analyse(m, &PrepareOptions::default()).is_err(), "a contract model is not analysed again");
}

/// A model in opset 8 form: attributes that later became inputs, Dropout with ratio, BN with spatial,
/// Softmax with the old 2-D semantics.
fn opset8_model() -> camserve::onnx::ModelProto {
    let mut g = G::new(&[2, 2, 6, 6], 4);
    g.opset = 8;
    let x = g.x();
    let w = g.rand(&[4, 2, 3, 3], 0.5);
    let c = g.op("Conv", &[&x, &w], vec![a_is("pads", &[1, 1, 1, 1])]);
    let (s, b, m) = (g.rand(&[4], 1.0), g.rand(&[4], 0.5), g.rand(&[4], 0.3));
    let v = g.init(&[4], vec![1.0, 0.5, 2.0, 1.5]);
    let bn = g.op("BatchNormalization", &[&c, &s, &b, &m, &v], vec![a_i("spatial", 1)]);
    let clip = g.op("Clip", &[&bn], vec![a_f("min", 0.0), a_f("max", 6.0)]);
    let pad = g.op("Pad", &[&clip], vec![a_is("pads", &[0, 0, 1, 1, 0, 0, 1, 1]), a_f("value", 0.0)]);
    let sl = g.op("Slice", &[&pad], vec![a_is("starts", &[1, 1]), a_is("ends", &[3, 7]), a_is("axes", &[1, 2])]);
    let d = g.op("Dropout", &[&sl], vec![a_f("ratio", 0.3)]);
    let u = g.op("Unsqueeze", &[&d], vec![a_is("axes", &[1])]);
    let sq = g.op("Squeeze", &[&u], vec![a_is("axes", &[1])]);
    let r = g.op("ReduceSum", &[&sq], vec![a_is("axes", &[3]), a_i("keepdims", 0)]);
    let f = g.op("Flatten", &[&r], vec![a_i("axis", 1)]);
    let sp = g.op_n("Split", &[&f], vec![a_i("axis", 1), a_is("split", &[4, 8])], 2);
    let cat = g.op("Concat", &[&sp[1], &sp[0]], vec![a_i("axis", 1)]);
    g.finish(&cat)
}

#[test]
fn old_opset_is_upgraded_and_correct() {
    let model = opset8_model();
    let ex = camserve::backend::probe::analyse(model.clone(), &PrepareOptions::default()).unwrap();
    assert_eq!(ex.source_opset, 8);
    assert_eq!(ex.opset(), 17);
    let x = away_from_zero(&mut rng(2), &[2, 2, 6, 6], 0.05);
    check_gradients(&model, &x, 1e-3, 2e-3);
}

#[test]
fn old_softmax_not_on_last_axis_is_converted() {
    // Softmax-1 over axis 1 of a 4-D tensor normalises over C*H*W together.
    let mut g = G::new(&[2, 2, 3, 3], 4);
    g.opset = 11;
    let x = g.x();
    let s = g.op("Softmax", &[&x], vec![a_i("axis", 1)]);
    let k = g.rand(&[1, 2, 3, 3], 1.0);
    let m = g.op("Mul", &[&s, &k], vec![]);
    let model = g.finish(&m);
    let x = uniform(&mut rng(3), &[2, 2, 3, 3], -1.0, 1.0);
    check_gradients(&model, &x, 1e-2, 5e-4);
}

#[test]
fn unknown_op_in_old_opset_is_refused() {
    let mut g = G::new(&[2, 2, 4, 4], 4);
    g.opset = 9;
    let x = g.x();
    let u = g.op("Upsample", &[&x], vec![a_s("mode", "nearest"), a_f("scales", 1.0)]);
    let err = match camserve::backend::probe::analyse(g.finish(&u), &PrepareOptions::default()) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("expected an error"),
    };
    assert!(err.contains("Upsample"), "{err}");
}

#[test]
fn external_data_and_ir3_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = small_cnn();
    let g = model.graph.as_mut().unwrap();
    // IR-3 style: every initializer also listed as a graph input.
    let init_inputs: Vec<_> = g.initializer.iter().map(|t| value_info(t.name(), &[])).collect();
    g.input.extend(init_inputs);
    // Move every float initializer to weights.bin.
    let mut blob = Vec::new();
    for t in g.initializer.iter_mut() {
        let raw = t.raw_data.take().unwrap();
        let entry = |k: &str, v: String| StringStringEntryProto { key: Some(k.into()), value: Some(v) };
        t.external_data = vec![
            entry("location", "weights.bin".into()),
            entry("offset", blob.len().to_string()),
            entry("length", raw.len().to_string()),
        ];
        t.data_location = Some(DataLocation::External as i32);
        blob.extend_from_slice(&raw);
    }
    std::fs::write(dir.path().join("weights.bin"), &blob).unwrap();
    let path = dir.path().join("model.onnx");
    io::save_model(&model, &path).unwrap();
    let loaded = io::load_model(&path).unwrap();
    assert_eq!(loaded.graph.as_ref().unwrap().input.len(), 1, "initializers are not inputs");
    let original = small_cnn();
    let payload = |m: &camserve::onnx::ModelProto| -> Vec<(String, Vec<i64>, Vec<u8>)> {
        m.graph.as_ref().unwrap().initializer.iter().map(|t| (t.name().to_string(), t.dims.clone(), t.raw_data().to_vec())).collect()
    };
    assert_eq!(payload(&loaded), payload(&original));
    // Escaping the model's folder is refused.
    let g = model.graph.as_mut().unwrap();
    g.initializer[0].external_data[0].value = Some("../weights.bin".into());
    io::save_model(&model, &path).unwrap();
    let err = io::load_model(&path).unwrap_err().to_string();
    assert!(err.contains("leaves the model's folder"), "{err}");
    // Out-of-range offsets are refused, not a panic.
    let g = model.graph.as_mut().unwrap();
    g.initializer[0].external_data[0].value = Some("weights.bin".into());
    g.initializer[0].external_data[1].value = Some((blob.len() + 10).to_string());
    io::save_model(&model, &path).unwrap();
    assert!(io::load_model(&path).is_err());
}

#[test]
fn negative_declared_dimensions_are_errors_not_panics() {
    // Found by tests/fuzz.rs: the `ort` crate panics reading back a session whose input declares dim -5.
    use prost::Message;
    let mut m = small_cnn();
    let g = m.graph.as_mut().unwrap();
    g.input[0] = value_info("x", &[None, Some(3), Some(-5), Some(16)]);
    let err = io::decode_model(bytes::Bytes::from(m.encode_to_vec()), None).unwrap_err().to_string();
    assert!(err.contains("negative dimension"), "{err}");
}

#[test]
fn malformed_protobufs_are_errors() {
    for bytes in [&b""[..], b"\x00\x01\x02garbage", b"\x0a\xff\xff\xff\xff\x0f"] {
        let r = io::decode_model(bytes::Bytes::copy_from_slice(bytes), None);
        assert!(r.is_err());
    }
}

#[test]
fn dynamic_input_size_needs_a_size() {
    let mut model = small_cnn();
    let g = model.graph.as_mut().unwrap();
    g.input[0] = value_info("x", &[None, Some(3), None, None]);
    let err = match camserve::backend::probe::analyse(model.clone(), &PrepareOptions::default()) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("expected an error"),
    };
    assert!(err.contains("dynamic height/width"), "{err}");
    let ex = camserve::backend::probe::analyse(model, &PrepareOptions { input_size: Some((20, 20)), layout: None }).unwrap();
    assert_eq!(ex.input_dims, vec![1, 3, 20, 20]);
}

#[test]
fn targets_chosen_in_the_graph() {
    // Rows: top-1, top-2, explicit class 4 (rank -1): the gradients must equal a plain plan with those seeds.
    let ex = camserve::backend::probe::analyse(small_cnn(), &PrepareOptions::default()).unwrap();
    let layer = ex.default_layer.clone().unwrap();
    let selecting = ex.build(&ExplainPlan::new(layer.clone(), [ReluRule::Guided]).with_target_selection()).unwrap();
    let plain = ex.build(&ExplainPlan::new(layer, [ReluRule::Guided])).unwrap();
    let mut r = rng(12);
    let one = uniform(&mut r, &[1, 3, 16, 16], -1.0, 1.0);
    let x = ndarray::concatenate(ndarray::Axis(0), &[one.view(), one.view(), one.view()]).unwrap();
    let mut seed = ArrayD::<f32>::zeros(IxDyn(&[3, 5]));
    seed[[2, 4]] = 1.0;
    let mut s = session(&selecting, Level::All);
    let vals: Vec<(String, ort::value::DynValue)> = vec![
        ("x".into(), ort::value::Tensor::from_array(x.clone()).unwrap().into_dyn()),
        (contract::SEED.into(), ort::value::Tensor::from_array(seed.clone()).unwrap().into_dyn()),
        (contract::TARGET_RANK.into(), ort::value::Tensor::from_array(ndarray::arr1(&[0i64, 1, -1])).unwrap().into_dyn()),
    ];
    let out = s.run(vals).unwrap();
    let logits = out[ex.logits.as_str()].try_extract_array::<f32>().unwrap().to_owned();
    let chosen = out[contract::TARGET_INDEX].try_extract_array::<i64>().unwrap().to_owned();
    let grads = out[contract::GRADIENTS].try_extract_array::<f32>().unwrap().to_owned();
    let guided = out["camserve.input_grad.guided"].try_extract_array::<f32>().unwrap().to_owned();
    let row: Vec<f32> = logits.index_axis(ndarray::Axis(0), 0).iter().copied().collect();
    let mut order: Vec<usize> = (0..5).collect();
    order.sort_by(|&a, &b| row[b].partial_cmp(&row[a]).unwrap());
    assert_eq!(chosen[0], order[0] as i64);
    assert_eq!(chosen[1], order[1] as i64);
    let mut expected_seed = seed.clone();
    expected_seed[[0, order[0]]] = 1.0;
    expected_seed[[1, order[1]]] = 1.0;
    let reference = run_explain(&plain, &x, &expected_seed, Level::All, &[contract::GRADIENTS, "camserve.input_grad.guided"]);
    assert!(rel_err(&grads.into_dyn(), &reference[0]) < 1e-6);
    assert!(rel_err(&guided.into_dyn(), &reference[1]) < 1e-6);
}
