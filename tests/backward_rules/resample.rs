//! Resize, Pad (edge, reflect, wrap), InstanceNormalization and GroupNormalization.
//!
//! Resize and Pad are linear in x: central differences with a step of 0.5 are exact up to f32 rounding (LINEAR).
//! The normalisations are smooth (SMOOTH, step 1e-2); their outputs are multiplied by a random constant, since
//! the sum of a normalised group is constant and a plain sum would have a zero gradient.

use super::*;

use camserve::onnx::rewrite::ExplainPlan;
use camserve::onnx::rules::ReluRule;
use rand::Rng;

/// Builds the graph at `opset` and checks it on uniform inputs with the linear step and tolerance.
fn linear_at(dims: &[usize], opset: i64, f: impl FnOnce(&mut G) -> String) -> f64 {
    let mut g = G::new(&dims_i64(dims), 11);
    g.opset = opset;
    let y = f(&mut g);
    let model = g.finish(&y);
    check_gradients(&model, &uniform(&mut rng(1), dims, -1.0, 1.0), 0.5, LINEAR)
}

/// Like `linear_at`, for a normalisation (smooth): step 1e-2, SMOOTH tolerance.
fn smooth_at(dims: &[usize], opset: i64, f: impl FnOnce(&mut G) -> String) -> f64 {
    let mut g = G::new(&dims_i64(dims), 11);
    g.opset = opset;
    let y = f(&mut g);
    let model = g.finish(&y);
    check_gradients(&model, &uniform(&mut rng(4), dims, -1.0, 1.0), 1e-2, SMOOTH)
}

/// The error the rewrite gives for the graph `f` builds at `opset`.
fn rewrite_error(dims: &[usize], opset: i64, f: impl FnOnce(&mut G) -> String) -> String {
    let mut g = G::new(&dims_i64(dims), 11);
    g.opset = opset;
    let y = f(&mut g);
    let model = g.finish(&y);
    let ex = camserve::backend::probe::analyse(model, &Default::default()).expect("analyse");
    match ex.build(&ExplainPlan::new("x_id", [ReluRule::Plain])) {
        Ok(_) => panic!("the rewrite accepted the graph"),
        Err(e) => e.to_string(),
    }
}

/// `y * k` with a random k of y's static shape `[1, ..]`.
fn times_random(g: &mut G, y: &str, dims: &[i64]) -> String {
    let k = g.rand(dims, 1.0);
    g.op("Mul", &[y, &k], vec![])
}

/// `sizes` = [N, C] of x (from its shape, so the batch stays dynamic) followed by `hw`, as PyTorch exports it.
fn sizes_from_shape(g: &mut G, x: &str, hw: &[i64]) -> String {
    let shape = g.op("Shape", &[x], vec![]);
    let (s, e, a) = (g.ints(&[0]), g.ints(&[2]), g.ints(&[0]));
    let nc = g.op("Slice", &[&shape, &s, &e, &a], vec![]);
    let hw = g.ints(hw);
    g.op("Concat", &[&nc, &hw], vec![a_i("axis", 0)])
}

fn resize_scales(g: &mut G, x: &str, scales: &[f32], attrs: Vec<camserve::onnx::proto::AttributeProto>) -> String {
    let s = g.init(&[scales.len() as i64], scales.to_vec());
    g.op("Resize", &[x, "", &s], attrs)
}

// ---------------------------------------------------------------- Resize

#[test]
fn resize_nearest_x2_pytorch() {
    // nn.Upsample(scale_factor=2) as PyTorch exports it (HRNet, FPN): the block-sum path, no MatMul.
    let build = |g: &mut G| {
        let x = g.x();
        resize_scales(g, &x, &[1.0, 1.0, 2.0, 2.0], vec![
            a_s("mode", "nearest"), a_s("coordinate_transformation_mode", "asymmetric"), a_s("nearest_mode", "floor"),
        ])
    };
    linear_at(&[2, 3, 5, 6], 17, build);
    let mut g = G::new(&[2, 3, 5, 6], 11);
    let y = build(&mut g);
    let explain = explain_model(&g.finish(&y), &[ReluRule::Plain]);
    let graph = explain.graph.expect("graph");
    assert!(graph.node.iter().all(|n| n.op_type() != "MatMul"), "integer nearest upsampling took the matrix path");
}

#[test]
fn resize_nearest_x3_by_x2_default_attributes() {
    // half_pixel + round_prefer_floor (the defaults) also copy each pixel to a block for integer scales.
    linear_at(&[2, 2, 4, 5], 17, |g| {
        let x = g.x();
        resize_scales(g, &x, &[1.0, 1.0, 3.0, 2.0], vec![])
    });
}

#[test]
fn resize_nearest_modes() {
    // asymmetric with scale 2 puts every odd output exactly on a .5 tie, where the four modes differ;
    // 4 -> 6 (scale 1.5) on W. The matrix path.
    for mode in ["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"] {
        linear_at(&[2, 2, 5, 4], 17, |g| {
            let x = g.x();
            resize_scales(g, &x, &[1.0, 1.0, 2.0, 1.5], vec![
                a_s("mode", "nearest"), a_s("coordinate_transformation_mode", "asymmetric"), a_s("nearest_mode", mode),
            ])
        });
    }
}

#[test]
fn resize_nearest_sizes_7_to_10_and_7_to_4() {
    for mode in ["round_prefer_floor", "round_prefer_ceil"] {
        linear_at(&[2, 2, 7, 7], 17, |g| {
            let x = g.x();
            let sizes = sizes_from_shape(g, &x, &[10, 4]);
            g.op("Resize", &[&x, "", "", &sizes], vec![a_s("mode", "nearest"), a_s("nearest_mode", mode)])
        });
    }
}

#[test]
fn resize_linear_x2_each_coordinate_mode() {
    for coord in ["half_pixel", "align_corners", "asymmetric", "pytorch_half_pixel"] {
        linear_at(&[2, 2, 5, 6], 17, |g| {
            let x = g.x();
            resize_scales(g, &x, &[1.0, 1.0, 2.0, 2.0], vec![a_s("mode", "linear"), a_s("coordinate_transformation_mode", coord)])
        });
    }
}

#[test]
fn resize_linear_half_pixel_symmetric_opset19() {
    linear_at(&[2, 2, 5, 6], 19, |g| {
        let x = g.x();
        resize_scales(g, &x, &[1.0, 1.0, 1.7, 2.5], vec![
            a_s("mode", "linear"), a_s("coordinate_transformation_mode", "half_pixel_symmetric"),
        ])
    });
}

#[test]
fn resize_linear_sizes_non_integer_each_coordinate_mode() {
    // 7 -> 10 on H (upsampling by 10/7), 7 -> 5 on W (downsampling), sizes from the input's shape.
    for coord in ["half_pixel", "align_corners", "asymmetric", "pytorch_half_pixel"] {
        linear_at(&[2, 2, 7, 7], 17, |g| {
            let x = g.x();
            let sizes = sizes_from_shape(g, &x, &[10, 5]);
            g.op("Resize", &[&x, "", "", &sizes], vec![a_s("mode", "linear"), a_s("coordinate_transformation_mode", coord)])
        });
    }
}

#[test]
fn resize_linear_downsample_scales() {
    // 8 -> 4 and 10 -> 6 (floor(10 * 0.6)); the coordinates use the given scales, not the size ratios.
    for coord in ["half_pixel", "pytorch_half_pixel", "align_corners"] {
        linear_at(&[2, 2, 8, 10], 17, |g| {
            let x = g.x();
            resize_scales(g, &x, &[1.0, 1.0, 0.5, 0.6], vec![a_s("mode", "linear"), a_s("coordinate_transformation_mode", coord)])
        });
    }
}

#[test]
fn resize_linear_only_width() {
    // H keeps its size: one MatMul.
    linear_at(&[2, 2, 5, 6], 17, |g| {
        let x = g.x();
        resize_scales(g, &x, &[1.0, 1.0, 1.0, 1.5], vec![a_s("mode", "linear")])
    });
}

#[test]
fn resize_cubic() {
    // PyTorch's bicubic (A = -0.75, pytorch_half_pixel), then A = -0.5 with exclude_outside, downsampling on W.
    linear_at(&[2, 2, 5, 6], 17, |g| {
        let x = g.x();
        resize_scales(g, &x, &[1.0, 1.0, 2.0, 1.5], vec![
            a_s("mode", "cubic"), a_s("coordinate_transformation_mode", "pytorch_half_pixel"),
        ])
    });
    linear_at(&[2, 2, 5, 8], 17, |g| {
        let x = g.x();
        resize_scales(g, &x, &[1.0, 1.0, 1.6, 0.75], vec![
            a_s("mode", "cubic"), a_f("cubic_coeff_a", -0.5), a_i("exclude_outside", 1),
        ])
    });
}

#[test]
fn resize_opset18_axes_and_keep_aspect_ratio() {
    // sizes for axes [2, 3] only; not_larger: one scale min(10/7, 12/8) for both axes, W = round(8 * 10/7) = 11.
    linear_at(&[2, 2, 7, 8], 18, |g| {
        let x = g.x();
        let sizes = g.ints(&[10, 12]);
        g.op("Resize", &[&x, "", "", &sizes], vec![
            a_s("mode", "linear"), a_is("axes", &[2, 3]), a_s("keep_aspect_ratio_policy", "not_larger"),
        ])
    });
    // Negative axes, scales for W only; antialias has no effect when upsampling.
    linear_at(&[2, 2, 7, 8], 18, |g| {
        let x = g.x();
        let s = g.init(&[1], vec![1.5]);
        g.op("Resize", &[&x, "", &s], vec![a_s("mode", "linear"), a_is("axes", &[-1]), a_i("antialias", 1)])
    });
}

#[test]
fn resize_refusals() {
    let channel = rewrite_error(&[2, 2, 4, 4], 17, |g| {
        let x = g.x();
        resize_scales(g, &x, &[1.0, 2.0, 1.0, 1.0], vec![])
    });
    assert!(channel.contains("only the last two"), "{channel}");
    let antialias = rewrite_error(&[2, 2, 8, 8], 18, |g| {
        let x = g.x();
        resize_scales(g, &x, &[1.0, 1.0, 0.5, 0.5], vec![a_s("mode", "linear"), a_i("antialias", 1)])
    });
    assert!(antialias.contains("antialias"), "{antialias}");
    let crop = rewrite_error(&[2, 2, 4, 4], 17, |g| {
        let x = g.x();
        let roi = g.init(&[8], vec![0.0, 0.0, 0.1, 0.1, 1.0, 1.0, 0.9, 0.9]);
        let s = g.init(&[4], vec![1.0, 1.0, 2.0, 2.0]);
        g.op("Resize", &[&x, &roi, &s], vec![a_s("mode", "linear"), a_s("coordinate_transformation_mode", "tf_crop_and_resize")])
    });
    assert!(crop.contains("tf_crop_and_resize"), "{crop}");
}

// ---------------------------------------------------------------- Pad

#[test]
fn pad_edge_asymmetric_spatial() {
    // Keras SAME-style asymmetric padding (more after than before), edge mode.
    linear_at(&[2, 2, 6, 7], 17, |g| {
        let x = g.x();
        let p = g.ints(&[0, 0, 0, 1, 0, 0, 1, 2]);
        g.op("Pad", &[&x, &p], vec![a_s("mode", "edge")])
    });
}

#[test]
fn pad_reflect() {
    linear_at(&[2, 2, 6, 7], 17, |g| {
        let x = g.x();
        let p = g.ints(&[0, 0, 2, 1, 0, 0, 1, 3]);
        g.op("Pad", &[&x, &p], vec![a_s("mode", "reflect")])
    });
}

#[test]
fn pad_wrap_opset19() {
    linear_at(&[2, 2, 5, 4], 19, |g| {
        let x = g.x();
        let p = g.ints(&[0, 0, 3, 1, 0, 0, 2, 3]);
        g.op("Pad", &[&x, &p], vec![a_s("mode", "wrap")])
    });
}

#[test]
fn pad_channel_axis_with_axes_input() {
    // opset 18: pads for the listed axes only (negative axis included), on the channel axis too.
    for mode in ["edge", "reflect"] {
        linear_at(&[2, 3, 5, 5], 18, |g| {
            let x = g.x();
            let (p, a) = (g.ints(&[1, 2, 2, 0]), g.ints(&[1, -1]));
            g.op("Pad", &[&x, &p, "", &a], vec![a_s("mode", mode)])
        });
    }
}

#[test]
fn pad_edge_then_conv() {
    // The gradient of the padded border comes from a conv, so every border element gets a distinct gradient.
    linear_at(&[2, 2, 5, 5], 17, |g| {
        let x = g.x();
        let p = g.ints(&[0, 0, 2, 2, 0, 0, 2, 2]);
        let y = g.op("Pad", &[&x, &p], vec![a_s("mode", "reflect")]);
        let w = g.rand(&[3, 2, 3, 3], 0.5);
        g.op("Conv", &[&y, &w], vec![])
    });
}

// ---------------------------------------------------------------- InstanceNormalization, GroupNormalization

#[test]
fn instance_norm() {
    smooth_at(&[2, 3, 5, 6], 17, |g| {
        let x = g.x();
        let scale = g.rand(&[3], 2.0);
        let bias = g.rand(&[3], 1.0);
        let y = g.op("InstanceNormalization", &[&x, &scale, &bias], vec![a_f("epsilon", 1e-3)]);
        times_random(g, &y, &[1, 3, 5, 6])
    });
}

#[test]
fn group_norm_exporter_pattern() {
    // GroupNorm(2, 4) as the PyTorch exporter writes it: Reshape [N, C, H, W] -> [N, G, -1],
    // InstanceNormalization with unit scale and zero bias, Reshape back, then the per-channel affine.
    smooth_at(&[2, 4, 5, 5], 17, |g| {
        let x = g.x();
        let grouped = g.ints(&[0, 2, -1]);
        let r = g.op("Reshape", &[&x, &grouped], vec![]);
        let (ones, zeros) = (g.init(&[2], vec![1.0; 2]), g.init(&[2], vec![0.0; 2]));
        let n = g.op("InstanceNormalization", &[&r, &ones, &zeros], vec![a_f("epsilon", 1e-5)]);
        let shape = g.op("Shape", &[&x], vec![]);
        let back = g.op("Reshape", &[&n, &shape], vec![]);
        let w = g.rand(&[4, 1, 1], 2.0);
        let b = g.rand(&[4, 1, 1], 1.0);
        let m = g.op("Mul", &[&back, &w], vec![]);
        let y = g.op("Add", &[&m, &b], vec![]);
        times_random(g, &y, &[1, 4, 5, 5])
    });
}

/// GroupNormalization with 6 channels in `groups` groups, scale and bias of `affine` elements, at `opset`.
fn group_norm(opset: i64, groups: i64, affine: i64) -> f64 {
    smooth_at(&[2, 6, 4, 5], opset, |g| {
        let x = g.x();
        let scale = g.rand(&[affine], 2.0);
        let bias = g.rand(&[affine], 1.0);
        let y = g.op("GroupNormalization", &[&x, &scale, &bias], vec![a_i("num_groups", groups), a_f("epsilon", 1e-3)]);
        times_random(g, &y, &[1, 6, 4, 5])
    })
}

#[test]
fn group_norm_opset18_per_group_scale() {
    group_norm(18, 3, 3);
}

#[test]
fn group_norm_opset21_per_channel_scale() {
    group_norm(21, 3, 6);
    group_norm(21, 1, 6);
}

// ---------------------------------------------------------------- GridSample

/// GridSample of x at a grid that itself depends on x (as deformable attention's sampling offsets do): a constant
/// grid at half-integer pixel positions, some past the border (their outer corners read the zero padding, one
/// location wholly outside), plus 0.05 tanh(1x1 conv of x), which moves a sample by at most 0.175 pixel, so no
/// sample crosses a pixel boundary within the step and the map is smooth in x: SMOOTH, step 1e-2. Checks dX and
/// dgrid together (x reaches the output through both).
fn grid_sample_of_x(align_corners: i64) -> f64 {
    let dims = [2usize, 2, 7, 7];
    let mut g = G::new(&dims_i64(&dims), 11);
    let x = g.x();
    // Pixel positions -1.5 (wholly outside), -0.5 .. 6.5 (the outer two half outside), in normalised coordinates.
    let mut r = rng(21);
    let to_norm = |p: f32| if align_corners == 1 { 2.0 * p / 6.0 - 1.0 } else { (2.0 * p + 1.0) / 7.0 - 1.0 };
    let base: Vec<f32> = (0..7 * 7 * 2).map(|_| to_norm(r.random_range(-1i32..=7) as f32 - 0.5)).collect();
    let c0 = g.init(&[1, 7, 7, 2], base);
    let w = g.rand(&[2, 2, 1, 1], 1.0);
    let conv = g.op("Conv", &[&x, &w], vec![]);
    let t = g.op("Tanh", &[&conv], vec![]);
    let s = g.scalar(0.05);
    let t = g.op("Mul", &[&t, &s], vec![]);
    let t = g.op("Transpose", &[&t], vec![a_is("perm", &[0, 2, 3, 1])]);
    let grid = g.op("Add", &[&c0, &t], vec![]);
    let y = g.op("GridSample", &[&x, &grid], vec![a_s("mode", "bilinear"), a_s("padding_mode", "zeros"), a_i("align_corners", align_corners)]);
    let model = g.finish(&y);
    check_gradients(&model, &uniform(&mut rng(4), &dims, -1.0, 1.0), 1e-2, SMOOTH)
}

#[test]
fn grid_sample_bilinear_zeros_through_map_and_grid() {
    grid_sample_of_x(0);
}

#[test]
fn grid_sample_align_corners_through_map_and_grid() {
    grid_sample_of_x(1);
}

/// The map alone, at a constant grid of arbitrary positions (integers included): linear in x, LINEAR.
#[test]
fn grid_sample_of_a_constant_grid_is_linear() {
    let dims = [2usize, 3, 5, 6];
    let mut g = G::new(&dims_i64(&dims), 11);
    let x = g.x();
    let mut r = rng(22);
    let pos: Vec<f32> = (0..4 * 9 * 2).map(|i| if i % 7 == 0 { 0.0 } else { r.random_range(-1.3f32..1.3) }).collect();
    let c = g.init(&[1, 4, 9, 2], pos);
    // One grid per batch item: the constant expanded over the run-time batch.
    let shape = g.op("Shape", &[&x], vec![]);
    let (st, en) = (g.ints(&[0]), g.ints(&[1]));
    let n = g.op("Slice", &[&shape, &st, &en], vec![]);
    let rest = g.ints(&[4, 9, 2]);
    let full = g.op("Concat", &[&n, &rest], vec![a_i("axis", 0)]);
    let grid = g.op("Expand", &[&c, &full], vec![]);
    let y = g.op("GridSample", &[&x, &grid], vec![]);
    let model = g.finish(&y);
    check_gradients(&model, &uniform(&mut rng(1), &dims, -1.0, 1.0), 0.5, LINEAR);
}

#[test]
fn grid_sample_other_modes_are_refused() {
    for (attr, value) in [("padding_mode", "border"), ("mode", "nearest")] {
        let err = rewrite_error(&[1, 2, 4, 4], 17, |g| {
            let x = g.x();
            let w = g.rand(&[2, 2, 1, 1], 1.0);
            let conv = g.op("Conv", &[&x, &w], vec![]);
            let grid = g.op("Transpose", &[&conv], vec![a_is("perm", &[0, 2, 3, 1])]);
            g.op("GridSample", &[&x, &grid], vec![a_s(attr, value)])
        });
        assert!(err.contains(value), "{err}");
    }
}

// ---------------------------------------------------------------- RoiAlign

/// RoIs `x0, y0, x1, y1` in image pixels (the map is a quarter of the image, `spatial_scale` 0.5 on a 7 x 7 map):
/// boxes inside, one across the border (samples in [-1, 0) read the clamped edge, samples past -1 read nothing),
/// one wholly outside, one under a pixel wide (its side is raised to 1 with `output_half_pixel`), one that covers
/// the map.
const ROIS: [[f32; 4]; 6] = [
    [2.3, 1.1, 9.7, 8.2],
    [-5.0, 4.4, 3.1, 13.9],
    [20.0, 20.0, 30.0, 26.0],
    [6.1, 6.3, 6.9, 6.7],
    [0.0, 0.0, 14.0, 14.0],
    [10.6, 0.4, 13.8, 12.2],
];

/// RoiAlign of the map x [N, C, 7, 7] with constant RoIs (it is then linear in x: LINEAR, step 0.5). The batch is
/// folded into the channels first, `[1, N * C, 7, 7]`, since the rule supports one map per run (torchvision's
/// detectors run one image per graph) and the check runs a batch of 2; then unfolded.
fn roi_align_of_x(mode: &str, sampling_ratio: i64) -> f64 {
    let dims = [2usize, 2, 7, 7];
    let mut g = G::new(&dims_i64(&dims), 11);
    let x = g.x();
    let fold = g.ints(&[1, -1, 7, 7]);
    let folded = g.op("Reshape", &[&x, &fold], vec![]);
    let rois = g.init(&[ROIS.len() as i64, 4], ROIS.iter().flatten().copied().collect());
    let batch_indices = g.int64_zeros(ROIS.len());
    let y = g.op(
        "RoiAlign",
        &[&folded, &rois, &batch_indices],
        vec![
            a_s("coordinate_transformation_mode", mode),
            a_i("output_height", 3),
            a_i("output_width", 2),
            a_i("sampling_ratio", sampling_ratio),
            a_f("spatial_scale", 0.5),
        ],
    );
    // [R, N * C, 3, 2] -> [R, N, C * 6] -> [N, R, C * 6]
    let unfold = g.ints(&[ROIS.len() as i64, -1, 12]);
    let y = g.op("Reshape", &[&y, &unfold], vec![]);
    let y = g.op("Transpose", &[&y], vec![a_is("perm", &[1, 0, 2])]);
    let model = g.finish(&y);
    check_gradients(&model, &uniform(&mut rng(3), &dims, -1.0, 1.0), 0.5, LINEAR)
}

#[test]
fn roi_align_output_half_pixel_as_torchvision_exports_it() {
    roi_align_of_x("output_half_pixel", 2);
    roi_align_of_x("output_half_pixel", 3);
}

#[test]
fn roi_align_half_pixel() {
    roi_align_of_x("half_pixel", 2);
}

#[test]
fn roi_align_max_and_adaptive_sampling_are_refused() {
    for (attr, value, says) in [("mode", 1, "max"), ("sampling_ratio", 0, "sampling_ratio 0")] {
        let err = rewrite_error(&[1, 2, 7, 7], 17, |g| {
            let x = g.x();
            let w = g.rand(&[2, 2, 1, 1], 1.0);
            let conv = g.op("Conv", &[&x, &w], vec![]);
            let rois = g.init(&[1, 4], vec![1.0, 1.0, 5.0, 5.0]);
            let bi = g.int64_zeros(1);
            let a = if attr == "mode" { a_s("mode", "max") } else { a_i("sampling_ratio", value) };
            g.op("RoiAlign", &[&conv, &rois, &bi], vec![a])
        });
        assert!(err.contains(says), "{err}");
    }
}
