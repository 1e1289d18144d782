//! Indexing and selection: Gather, GatherElements, GatherND, ScatterElements, ScatterND, Where, Tile, Compress,
//! TopK.
//! All are linear in the float inputs (Where given its condition), so every check uses LINEAR; the Swin-style
//! masked fill is followed by a Softmax (SMOOTH).

use super::*;
use camserve::onnx::rewrite::ExplainPlan;
use camserve::onnx::rules::ReluRule;
use camserve::onnx::{tensor, TensorProto};

/// An int64 initializer of any shape (rank 0 for a scalar).
fn int_init(g: &mut G, dims: &[i64], v: &[i64]) -> String {
    let name = format!("idx{}", g.inits.len());
    g.inits.push(tensor::i64_tensor(&name, dims, v));
    name
}

/// A bool initializer (values in `int32_data`, as ONNX stores bools).
fn bool_init(g: &mut G, dims: &[i64], v: &[bool]) -> String {
    let name = format!("mask{}", g.inits.len());
    g.inits.push(TensorProto {
        name: Some(name.clone()),
        dims: dims.to_vec(),
        data_type: Some(tensor::BOOL),
        int32_data: v.iter().map(|&b| b as i32).collect(),
        ..Default::default()
    });
    name
}

/// `c` (shape [1, rest..]) expanded over the run-time batch of the input: indices made at run time, one set
/// per batch item, as the element-wise gathers and scatters need.
fn per_item(g: &mut G, c: &str, rest: &[i64]) -> String {
    let x = g.x();
    let s = g.op("Shape", &[&x], vec![]);
    let (st, en) = (g.ints(&[0]), g.ints(&[1]));
    let n = g.op("Slice", &[&s, &st, &en], vec![]);
    let r = g.ints(rest);
    let shape = g.op("Concat", &[&n, &r], vec![a_i("axis", 0)]);
    g.op("Expand", &[c, &shape], vec![])
}

/// The error the rewrite gives for the graph `f` builds (it must refuse it).
fn refusal(f: impl FnOnce(&mut G) -> String) -> String {
    let mut g = G::new(&dims_i64(&DIMS), 11);
    let y = f(&mut g);
    let model = g.finish(&y);
    let err = match camserve::backend::probe::analyse(model, &Default::default()) {
        Err(e) => e,
        Ok(ex) => ex.build(&ExplainPlan::new("x_id", [ReluRule::Plain])).expect_err("the rewrite should refuse the graph"),
    };
    err.to_string()
}

// ---------------------------------------------------------------- Gather

#[test]
fn gather_axis1_repeated_indices() {
    // Channels 2, 0, 2: channel 2 collects two output channels' gradients, channel 1 none.
    check_dims(&[2, 3, 5, 5], |g| {
        let x = g.x();
        let i = int_init(g, &[3], &[2, 0, 2]);
        g.op("Gather", &[&x, &i], vec![a_i("axis", 1)])
    });
}

#[test]
fn gather_last_axis_negative_indices() {
    linear(|g| {
        let x = g.x();
        let i = int_init(g, &[4], &[-1, 0, -3, 2]);
        g.op("Gather", &[&x, &i], vec![a_i("axis", -1)])
    });
}

#[test]
fn gather_scalar_index_drops_the_axis() {
    // Row -2 (= 5) of each channel: [N, 2, 7]; the gradient is a Pad.
    linear(|g| {
        let x = g.x();
        let i = int_init(g, &[], &[-2]);
        g.op("Gather", &[&x, &i], vec![a_i("axis", 2)])
    });
}

#[test]
fn gather_contiguous_2d_negative_indices() {
    // Rows 2..6 as a 2x2 index grid: [N, 2, 2, 2, 7]; one ascending run, so the gradient is a Reshape + Pad.
    linear(|g| {
        let x = g.x();
        let i = int_init(g, &[2, 2], &[-5, -4, -3, -2]);
        g.op("Gather", &[&x, &i], vec![a_i("axis", -2)])
    });
}

#[test]
fn gather_2d_indices_with_repeats() {
    // [N, 2, 7, 2, 3]; column 6 is taken twice, column 0 twice, 2, 4, 5 never.
    linear(|g| {
        let x = g.x();
        let i = int_init(g, &[2, 3], &[0, 6, 6, 3, 0, 1]);
        g.op("Gather", &[&x, &i], vec![a_i("axis", 3)])
    });
}

#[test]
fn gather_run_time_int32_indices() {
    // Indices computed in the graph (a Cast to int32): the rule cannot read them and scatters at run time,
    // normalising the negative ones there.
    linear(|g| {
        let x = g.x();
        let c = int_init(g, &[2, 2], &[-1, 2, 2, -7]);
        let i = g.op("Cast", &[&c], vec![a_i("to", tensor::INT32 as i64)]);
        g.op("Gather", &[&x, &i], vec![a_i("axis", -2)])
    });
}

#[test]
fn gather_vit_class_token_opset20() {
    // ViT's `x[:, 0]`: tokens [N, 49, 2] (from the 4-D input), Gather(axis 1, scalar index 0) -> [N, 2], then
    // a linear head; only token 0 gets a gradient.
    linear(|g| {
        g.opset = 20;
        let x = g.x();
        let s = g.ints(&[0, 2, 49]);
        let r = g.op("Reshape", &[&x, &s], vec![]);
        let t = g.op("Transpose", &[&r], vec![a_is("perm", &[0, 2, 1])]);
        let w = g.rand(&[2, 4], 0.5);
        let t = g.op("MatMul", &[&t, &w], vec![]);
        let i = int_init(g, &[], &[0]);
        let cls = g.op("Gather", &[&t, &i], vec![a_i("axis", 1)]);
        let head = g.rand(&[4, 3], 0.5);
        g.op("MatMul", &[&cls, &head], vec![])
    });
}

#[test]
fn gather_constant_run_is_a_pad_and_run_time_indices_a_scatter() {
    // The cheaper form for constant indices forming one ascending run (the class token), the scatter otherwise.
    let ops = |indices_at_run_time: bool| -> Vec<String> {
        let mut g = G::new(&dims_i64(&DIMS), 11);
        let x = g.x();
        let mut i = int_init(&mut g, &[], &[0]);
        if indices_at_run_time {
            i = g.op("Identity", &[&i], vec![]);
        }
        let y = g.op("Gather", &[&x, &i], vec![a_i("axis", 1)]);
        let m = explain_model(&g.finish(&y), &[ReluRule::Plain]);
        m.graph.map(|g| g.node.iter().map(|n| n.op_type().to_string()).collect()).unwrap_or_default()
    };
    let constant = ops(false);
    assert!(constant.iter().any(|o| o == "Pad") && !constant.iter().any(|o| o == "ScatterElements"), "{constant:?}");
    let run_time = ops(true);
    assert!(run_time.iter().any(|o| o == "ScatterElements"), "{run_time:?}");
}

#[test]
fn gather_along_the_batch_axis_is_refused() {
    let msg = refusal(|g| {
        let x = g.x();
        let i = int_init(g, &[1], &[0]);
        g.op("Gather", &[&x, &i], vec![a_i("axis", 0)])
    });
    assert!(msg.contains("batch axis"), "{msg}");
}

// ---------------------------------------------------------------- GatherElements, GatherND

#[test]
fn gather_elements_last_axis_negative_and_repeated() {
    // Per (channel, row): 3 of the 7 columns, some twice, some negative; indices [N, 2, 7, 3] made at run time.
    linear(|g| {
        let x = g.x();
        let v: Vec<i64> = (0..42).map(|k| [(k % 7) as i64, -1, (k % 7) as i64 - 7][k % 3]).collect();
        let c = int_init(g, &[1, 2, 7, 3], &v);
        let i = per_item(g, &c, &[2, 7, 3]);
        g.op("GatherElements", &[&x, &i], vec![a_i("axis", -1)])
    });
}

// ---------------------------------------------------------------- TopK

/// `dims` filled with distinct values 2 apart in a scrambled order: a step of 0.5 never reorders two of them, so
/// no TopK or ReduceMax selection changes within a central difference (the rule is then exactly linear).
fn spread(dims: &[usize]) -> ArrayD<f32> {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|j| ((j * 37) % n) as f32 * 2.0 - n as f32).collect();
    ArrayD::from_shape_vec(dims.to_vec(), v).unwrap()
}

#[test]
fn top_k_last_axis_values() {
    // The 3 largest of each row of 7, sorted: [N, 2, 7, 3].
    check(&DIMS, spread(&DIMS), 0.5, LINEAR, |g| {
        let x = g.x();
        let k = int_init(g, &[1], &[3]);
        g.op_n("TopK", &[&x, &k], vec![], 2).swap_remove(0)
    });
}

#[test]
fn top_k_smallest_along_axis_1() {
    // The 2 smallest of each column (axis 2), unsorted: [N, 2, 2, 7].
    check(&DIMS, spread(&DIMS), 0.5, LINEAR, |g| {
        let x = g.x();
        let k = int_init(g, &[1], &[2]);
        g.op_n("TopK", &[&x, &k], vec![a_i("axis", 2), a_i("largest", 0), a_i("sorted", 0)], 2).swap_remove(0)
    });
}

#[test]
fn top_k_end_to_end_detector_selection() {
    // An end-to-end YOLO's in-graph selection: per anchor the best class score (ReduceMax over channels), the 5
    // best anchors (TopK), their class scores gathered (GatherElements at TopK's indices), and the kept scores
    // themselves: both paths carry the gradient.
    check(&DIMS, spread(&DIMS), 0.5, LINEAR, |g| {
        let x = g.x();
        let shape = int_init(g, &[3], &[0, 2, 49]);
        let flat = g.op("Reshape", &[&x, &shape], vec![]);
        let best = g.op("ReduceMax", &[&flat], vec![a_is("axes", &[1]), a_i("keepdims", 1)]);
        let k = int_init(g, &[1], &[5]);
        let top = g.op_n("TopK", &[&best, &k], vec![a_i("axis", 2)], 2);
        let two = int_init(g, &[3], &[1, 2, 1]);
        let idx = g.op("Tile", &[&top[1], &two], vec![]);
        let gathered = g.op("GatherElements", &[&flat, &idx], vec![a_i("axis", 2)]);
        g.op("Concat", &[&gathered, &top[0]], vec![a_i("axis", 1)])
    });
}

#[test]
fn top_k_along_the_batch_axis_is_refused() {
    let msg = refusal(|g| {
        let x = g.x();
        let k = int_init(g, &[1], &[1]);
        g.op_n("TopK", &[&x, &k], vec![a_i("axis", 0)], 2).swap_remove(0)
    });
    assert!(msg.contains("batch axis"), "{msg}");
}

#[test]
fn gather_nd_batch_dims_0() {
    // Data [C, H, N, W] (the batch moved inward), 4 (channel, row) pairs, (0, 1) twice, negatives:
    // [4, N, W], transposed back to [N, 4, W].
    linear(|g| {
        let x = g.x();
        let t = g.op("Transpose", &[&x], vec![a_is("perm", &[1, 2, 0, 3])]);
        let i = int_init(g, &[4, 2], &[0, 1, 1, -1, 0, 1, -1, 3]);
        let y = g.op("GatherND", &[&t, &i], vec![]);
        g.op("Transpose", &[&y], vec![a_is("perm", &[1, 0, 2])])
    });
}

#[test]
fn gather_nd_batch_dims_1() {
    // Per item, 3 (channel, row) pairs of [N, C, H, W] (one repeated, negatives): [N, 3, W].
    linear(|g| {
        let x = g.x();
        let c = int_init(g, &[1, 3, 2], &[1, -2, 0, 0, 1, 5]);
        let i = per_item(g, &c, &[3, 2]);
        g.op("GatherND", &[&x, &i], vec![a_i("batch_dims", 1)])
    });
}

// ---------------------------------------------------------------- ScatterND, ScatterElements

#[test]
fn scatter_nd_data_and_updates_from_the_input() {
    // Data: x * w laid out [C, H, N, W]; updates: rows (0, 0..3) of x times w2, [3, N, W], written at
    // (channel, row) = (0, 3), (1, -1), (1, 0). Both gradients reach x.
    linear(|g| {
        let x = g.x();
        let t = g.op("Transpose", &[&x], vec![a_is("perm", &[1, 2, 0, 3])]);
        let w = g.rand(&[2, 7, 1, 7], 1.0);
        let data = g.op("Mul", &[&t, &w], vec![]);
        let s = g.ints(&[14, -1, 7]);
        let rows = g.op("Reshape", &[&t, &s], vec![]);
        let (st, en, ax) = (g.ints(&[0]), g.ints(&[3]), g.ints(&[0]));
        let u = g.op("Slice", &[&rows, &st, &en, &ax], vec![]);
        let w2 = g.rand(&[3, 1, 7], 1.0);
        let u = g.op("Mul", &[&u, &w2], vec![]);
        let i = int_init(g, &[3, 2], &[0, 3, 1, -1, 1, 0]);
        let y = g.op("ScatterND", &[&data, &i, &u], vec![]);
        g.op("Transpose", &[&y], vec![a_is("perm", &[2, 0, 1, 3])])
    });
}

#[test]
fn scatter_elements_data_and_updates_from_the_input() {
    // Data x * w; updates: the first 3 columns of x times w2, written per (channel, row) at 3 distinct columns
    // (one negative) along axis -1.
    linear(|g| {
        let x = g.x();
        let w = g.rand(&[1, 2, 7, 7], 1.0);
        let data = g.op("Mul", &[&x, &w], vec![]);
        let (st, en, ax) = (g.ints(&[0]), g.ints(&[3]), g.ints(&[3]));
        let u = g.op("Slice", &[&x, &st, &en, &ax], vec![]);
        let w2 = g.rand(&[1, 2, 7, 3], 1.0);
        let u = g.op("Mul", &[&u, &w2], vec![]);
        let v: Vec<i64> = (0..14).flat_map(|r| [(r % 7) as i64, ((r + 3) % 7) as i64 - 7, ((r + 5) % 7) as i64]).collect();
        let c = int_init(g, &[1, 2, 7, 3], &v);
        let i = per_item(g, &c, &[2, 7, 3]);
        g.op("ScatterElements", &[&data, &i, &u], vec![a_i("axis", -1)])
    });
}

#[test]
fn scatter_with_a_reduction_is_refused() {
    let msg = refusal(|g| {
        let x = g.x();
        let c = int_init(g, &[1, 2, 7, 1], &[0; 14]);
        let i = per_item(g, &c, &[2, 7, 1]);
        let (st, en, ax) = (g.ints(&[0]), g.ints(&[1]), g.ints(&[3]));
        let u = g.op("Slice", &[&x, &st, &en, &ax], vec![]);
        g.op("ScatterElements", &[&x, &i, &u], vec![a_i("axis", 3), a_s("reduction", "add")])
    });
    assert!(msg.contains("reduction `add`"), "{msg}");
}

// ---------------------------------------------------------------- Where

#[test]
fn where_broadcast_condition_both_branches() {
    // cond [2, 1, 7] (broadcast over N and H), a = x * w [N, 2, 7, 7], b = GAP(x) * w2 [N, 2, 1, 1]
    // (its gradient sums over the positions where cond is false).
    linear(|g| {
        let x = g.x();
        let bits: Vec<bool> = (0..14).map(|k| (k * 5) % 3 == 0).collect();
        let cond = bool_init(g, &[2, 1, 7], &bits);
        let w = g.rand(&[1, 2, 7, 7], 1.0);
        let a = g.op("Mul", &[&x, &w], vec![]);
        let p = g.op("GlobalAveragePool", &[&x], vec![]);
        let w2 = g.rand(&[1, 2, 1, 1], 1.0);
        let b = g.op("Mul", &[&p, &w2], vec![]);
        g.op("Where", &[&cond, &a, &b], vec![])
    });
}

#[test]
fn where_condition_from_greater_of_a_constant() {
    // cond = Greater(k, 0) with k [1, 1, 7, 1]; a = x, b = ReduceSum over H [N, 2, 1, 7].
    linear(|g| {
        let x = g.x();
        let k = g.rand(&[1, 1, 7, 1], 1.0);
        let z = g.scalar(0.0);
        let cond = g.op("Greater", &[&k, &z], vec![]);
        let ax = g.ints(&[2]);
        let b = g.op("ReduceSum", &[&x, &ax], vec![a_i("keepdims", 1)]);
        g.op("Where", &[&cond, &x, &b], vec![])
    });
}

#[test]
fn where_scalar_condition() {
    // A scalar false condition: all of the gradient goes to b, none to a.
    linear(|g| {
        let x = g.x();
        let (one, zero) = (g.scalar(1.0), g.scalar(0.0));
        let cond = g.op("Less", &[&one, &zero], vec![]);
        let w = g.rand(&[2, 1, 1], 1.0);
        let b = g.op("Mul", &[&x, &w], vec![]);
        g.op("Where", &[&cond, &x, &b], vec![])
    });
}

#[test]
fn where_swin_masked_fill() {
    // Swin's shifted-window mask as a masked fill: scores [N, nW=2, heads=2, T=4, T=4] from the input,
    // a bool mask [nW, 1, T, T] (broadcast over the batch and the heads), filled with -100, then Softmax.
    let dims = [2, 4, 4, 4];
    check(&dims, uniform(&mut rng(4), &dims, -2.0, 2.0), 1e-2, SMOOTH, |g| {
        let x = g.x();
        let s = g.ints(&[-1, 2, 2, 4, 4]);
        let scores = g.op("Reshape", &[&x, &s], vec![]);
        // Window 0 unmasked; window 1: tokens {0, 1} and {2, 3} from different regions do not attend.
        let bits: Vec<bool> = (0..32).map(|k| k >= 16 && ((k % 16) / 4 < 2) != ((k % 4) < 2)).collect();
        let mask = bool_init(g, &[2, 1, 4, 4], &bits);
        let fill = g.scalar(-100.0);
        let m = g.op("Where", &[&mask, &fill, &scores], vec![]);
        g.op("Softmax", &[&m], vec![a_i("axis", -1)])
    });
}

// ---------------------------------------------------------------- Tile

#[test]
fn tile_two_axes() {
    linear(|g| {
        let x = g.x();
        let r = g.ints(&[1, 2, 1, 3]);
        g.op("Tile", &[&x, &r], vec![])
    });
}

#[test]
fn tile_probed_repeats() {
    // Repeats computed in the graph (the rule reads the probe's values).
    linear(|g| {
        let x = g.x();
        let a = g.ints(&[1, 1]);
        let a = g.op("Identity", &[&a], vec![]);
        let b = g.ints(&[3, 2]);
        let r = g.op("Concat", &[&a, &b], vec![a_i("axis", 0)]);
        g.op("Tile", &[&x, &r], vec![])
    });
}

#[test]
fn tile_along_the_batch_axis_is_refused() {
    let msg = refusal(|g| {
        let x = g.x();
        let r = g.ints(&[2, 1, 1, 1]);
        let t = g.op("Tile", &[&x, &r], vec![]);
        // [2N, 2, 7, 7] back to one row per item, so that only the rule can object.
        let s = g.ints(&[-1, 196]);
        g.op("Reshape", &[&t, &s], vec![])
    });
    assert!(msg.contains("batch axis"), "{msg}");
}

// ---------------------------------------------------------------- Compress

#[test]
fn compress_constant_and_run_time_conditions() {
    // Channels by a constant condition [false, true], then columns by one computed at run time from the shape
    // (i mod 3 < 2: columns 0, 1, 3, 4, 6), as tf2onnx's SYMMETRIC MirrorPad builds its condition.
    linear(|g| {
        let x = g.x();
        let keep = bool_init(g, &[2], &[false, true]);
        let c = g.op("Compress", &[&x, &keep], vec![a_i("axis", 1)]);
        let s = g.op("Shape", &[&x], vec![]);
        let i3 = int_init(g, &[], &[3]);
        let w = g.op("Gather", &[&s, &i3], vec![a_i("axis", 0)]);
        let (z, one) = (int_init(g, &[], &[0]), int_init(g, &[], &[1]));
        let r = g.op("Range", &[&z, &w, &one], vec![]);
        let m = g.op("Mod", &[&r, &i3], vec![]);
        let two = int_init(g, &[], &[2]);
        let cond = g.op("Less", &[&m, &two], vec![]);
        g.op("Compress", &[&c, &cond], vec![a_i("axis", -1)])
    });
}
