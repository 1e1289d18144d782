//! Resize (nearest, linear, cubic) over the last two axes, GridSample (bilinear, zero padding), and RoiAlign (avg).
//!
//! Along each resized axis the forward is a constant interpolation matrix A [out, in] (each output reads fixed
//! inputs with fixed weights that depend only on the static sizes and the attributes), so Y = A_h · X · A_w^T
//! and dX = A_h^T · dY · A_w: two MatMuls with constant initializers, built here exactly as ONNX Runtime's CPU
//! kernel computes its coordinates (in f32). Integer nearest upsampling, where every input pixel is copied to a
//! k x k block, takes a cheaper path: a Reshape that splits each block out, then a ReduceSum.

use std::collections::HashMap;

use super::{dy0, input, not_differentiable, BackwardRule, RuleCtx};
use crate::onnx::proto::NodeProto;
use crate::onnx::{attr, OnnxError, Result};

pub(super) fn register(m: &mut HashMap<&'static str, BackwardRule>) {
    m.insert("Resize", resize);
    m.insert("GridSample", grid_sample);
    m.insert("RoiAlign", roi_align);
}

type Grads = Result<Vec<Option<String>>>;

/// How Resize maps an output coordinate to an input coordinate (`coordinate_transformation_mode`).
#[derive(Clone, Copy, PartialEq)]
enum Coord {
    HalfPixel,
    HalfPixelSymmetric,
    PytorchHalfPixel,
    AlignCorners,
    Asymmetric,
}

#[derive(Clone, Copy, PartialEq)]
enum Nearest {
    RoundPreferFloor,
    RoundPreferCeil,
    Floor,
    Ceil,
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Nearest(Nearest),
    Linear,
    /// `cubic_coeff_a`, `exclude_outside`.
    Cubic(f32, bool),
}

/// The input coordinate of output index `o` (ONNX Runtime's `GetOriginalCoordinateFromResizedCoordinate`, in f32).
fn original_coordinate(coord: Coord, o: usize, scale: f32, out_len: usize, in_len: usize) -> f32 {
    let (x, out_f, in_f) = (o as f32, out_len as f32, in_len as f32);
    match coord {
        Coord::HalfPixel => (x + 0.5) / scale - 0.5,
        Coord::HalfPixelSymmetric => {
            let adjustment = out_f / (scale * in_f);
            let offset = in_f / 2.0 * (1.0 - adjustment);
            offset + (x + 0.5) / scale - 0.5
        }
        Coord::PytorchHalfPixel => {
            if out_len > 1 {
                (x + 0.5) / scale - 0.5
            } else {
                0.0
            }
        }
        Coord::AlignCorners => {
            if out_len == 1 {
                0.0
            } else {
                x * (in_f - 1.0) / (out_f - 1.0)
            }
        }
        Coord::Asymmetric => x / scale,
    }
}

fn nearest_pixel(mode: Nearest, x: f32) -> i64 {
    match mode {
        Nearest::RoundPreferFloor => {
            if x == (x as i64) as f32 + 0.5 {
                x.floor() as i64
            } else {
                x.round() as i64
            }
        }
        // f32::round rounds halves away from zero, as std::round does.
        Nearest::RoundPreferCeil => x.round() as i64,
        Nearest::Floor => x.floor() as i64,
        Nearest::Ceil => x.ceil() as i64,
    }
}

/// Keys's cubic convolution weights of the 4 neighbours floor(x)-1 ..= floor(x)+2 at fractional offset `s`.
fn cubic_coeffs(s: f32, a: f32) -> [f32; 4] {
    let s = s.abs();
    let (s1, t, t1) = (s + 1.0, 1.0 - s, 2.0 - s);
    [
        ((a * s1 - 5.0 * a) * s1 + 8.0 * a) * s1 - 4.0 * a,
        ((a + 2.0) * s - (a + 3.0)) * s * s + 1.0,
        ((a + 2.0) * t - (a + 3.0)) * t * t + 1.0,
        ((a * t1 - 5.0 * a) * t1 + 8.0 * a) * t1 - 4.0 * a,
    ]
}

/// The interpolation matrix of one axis, row-major [out_len, in_len]: Y[o] = sum_i A[o, i] X[i].
fn interpolation_matrix(mode: Mode, coord: Coord, scale: f32, out_len: usize, in_len: usize) -> Vec<f32> {
    let mut a = vec![0f32; out_len * in_len];
    let last = in_len as i64 - 1;
    let clamp = |i: i64| i.clamp(0, last) as usize;
    for o in 0..out_len {
        // As ONNX Runtime: an axis with scale 1 maps every index to itself, whatever the coordinate mode.
        let x = if scale == 1.0 { o as f32 } else { original_coordinate(coord, o, scale, out_len, in_len) };
        let row = &mut a[o * in_len..(o + 1) * in_len];
        match mode {
            Mode::Nearest(n) => row[clamp(nearest_pixel(n, x))] = 1.0,
            Mode::Linear => {
                let x = x.clamp(0.0, last as f32);
                let i1 = (x as i64).min(last);
                let i2 = (i1 + 1).min(last);
                if i1 == i2 {
                    row[i1 as usize] += 1.0;
                } else {
                    row[i1 as usize] += (x - i2 as f32).abs();
                    row[i2 as usize] += (x - i1 as f32).abs();
                }
            }
            Mode::Cubic(coeff_a, exclude_outside) => {
                let xi = x.floor() as i64;
                let mut c = cubic_coeffs(x - x.floor(), coeff_a);
                let taps: Vec<i64> = (xi - 1..=xi + 2).collect();
                if exclude_outside {
                    let inside = |j: i64| (0..=last).contains(&j);
                    let sum: f32 = taps.iter().zip(&c).filter(|(j, _)| inside(**j)).map(|(_, w)| *w).sum();
                    for (w, &j) in c.iter_mut().zip(&taps) {
                        *w = if inside(j) { *w / sum } else { 0.0 };
                    }
                }
                for (&j, &w) in taps.iter().zip(&c) {
                    row[clamp(j)] += w;
                }
            }
        }
    }
    a
}

/// `Some(k)` when the matrix copies input i to outputs k*i ..= k*i + k-1 (integer nearest upsampling).
fn block_factor(a: &[f32], out_len: usize, in_len: usize) -> Option<usize> {
    if in_len == 0 || !out_len.is_multiple_of(in_len) {
        return None;
    }
    let k = out_len / in_len;
    let ok = (0..out_len).all(|o| (0..in_len).all(|i| a[o * in_len + i] == if i == o / k { 1.0 } else { 0.0 }));
    ok.then_some(k)
}

fn is_identity(a: &[f32], out_len: usize, in_len: usize) -> bool {
    out_len == in_len && block_factor(a, out_len, in_len) == Some(1)
}

fn parse_coord(node: &NodeProto) -> Result<Coord> {
    let s = attr::string(node, "coordinate_transformation_mode").unwrap_or_else(|| "half_pixel".into());
    Ok(match s.as_str() {
        "half_pixel" => Coord::HalfPixel,
        "half_pixel_symmetric" => Coord::HalfPixelSymmetric,
        "pytorch_half_pixel" => Coord::PytorchHalfPixel,
        "align_corners" => Coord::AlignCorners,
        "asymmetric" => Coord::Asymmetric,
        other => return Err(OnnxError::node(node, format!("Resize with coordinate_transformation_mode `{other}`"))),
    })
}

fn parse_mode(node: &NodeProto) -> Result<Mode> {
    let s = attr::string(node, "mode").unwrap_or_else(|| "nearest".into());
    Ok(match s.as_str() {
        "nearest" => {
            let n = attr::string(node, "nearest_mode").unwrap_or_else(|| "round_prefer_floor".into());
            Mode::Nearest(match n.as_str() {
                "round_prefer_floor" => Nearest::RoundPreferFloor,
                "round_prefer_ceil" => Nearest::RoundPreferCeil,
                "floor" => Nearest::Floor,
                "ceil" => Nearest::Ceil,
                other => return Err(OnnxError::node(node, format!("Resize with nearest_mode `{other}`"))),
            })
        }
        "linear" => Mode::Linear,
        "cubic" => Mode::Cubic(attr::float_or(node, "cubic_coeff_a", -0.75), attr::int_or(node, "exclude_outside", 0) != 0),
        other => return Err(OnnxError::node(node, format!("Resize with mode `{other}`"))),
    })
}

/// The scale of every axis, as ONNX Runtime computes it: the `scales` input, or sizes / input sizes (with the
/// aspect-ratio policy applied).
fn axis_scales(ctx: &RuleCtx, node: &NodeProto, xd: &[i64]) -> Result<Vec<f32>> {
    let rank = xd.len();
    let axes: Vec<usize> = match attr::ints(node, "axes") {
        Some(a) => a
            .iter()
            .map(|&v| {
                let v = if v < 0 { v + rank as i64 } else { v };
                usize::try_from(v).ok().filter(|&v| v < rank).ok_or_else(|| OnnxError::node(node, "axes out of range"))
            })
            .collect::<Result<_>>()?,
        None => (0..rank).collect(),
    };
    let mut scales = vec![1f32; rank];
    let given_scales = match input(node, 2) {
        None => None,
        Some(name) => match ctx.const_f32(name) {
            Some((_, v)) if v.is_empty() => None,
            Some((_, v)) => Some(v),
            None if ctx.dims(name).is_ok_and(|d| d.contains(&0)) => None,
            None => return Err(OnnxError::node(node, "Resize scales computed at run time (not a constant)")),
        },
    };
    if let Some(v) = given_scales {
        if v.len() != axes.len() {
            return Err(OnnxError::node(node, format!("{} scales for {} axes", v.len(), axes.len())));
        }
        for (&a, &s) in axes.iter().zip(&v) {
            scales[a] = s;
        }
        return Ok(scales);
    }
    let sizes_name = input(node, 3).ok_or_else(|| OnnxError::node(node, "Resize without scales or sizes"))?;
    let sizes = ctx.const_i64(sizes_name).ok_or_else(|| OnnxError::node(node, "Resize sizes are not known"))?;
    if sizes.len() != axes.len() {
        return Err(OnnxError::node(node, format!("{} sizes for {} axes", sizes.len(), axes.len())));
    }
    let ratios: Vec<f32> = axes.iter().zip(&sizes).map(|(&a, &s)| s as f32 / xd[a] as f32).collect();
    let policy = attr::string(node, "keep_aspect_ratio_policy").unwrap_or_else(|| "stretch".into());
    let uniform = match policy.as_str() {
        "stretch" => None,
        "not_larger" => Some(ratios.iter().copied().fold(f32::INFINITY, f32::min)),
        "not_smaller" => Some(ratios.iter().copied().fold(f32::NEG_INFINITY, f32::max)),
        other => return Err(OnnxError::node(node, format!("Resize with keep_aspect_ratio_policy `{other}`"))),
    };
    for (&a, &r) in axes.iter().zip(&ratios) {
        scales[a] = uniform.unwrap_or(r);
    }
    Ok(scales)
}

fn resize(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], needs: &[bool]) -> Grads {
    // Per resized axis (the last two only): Y = A · X along that axis with a constant A [out, in], so
    // dX = A^T · dY along it; for H and W:  dX = A_h^T · dY · A_w.
    if needs.iter().skip(1).any(|&n| n) {
        return Err(not_differentiable(node, "roi, scales or sizes"));
    }
    let dy = dy0(node, dy)?;
    let x = &node.input[0];
    let (xd, yd) = (ctx.dims(x)?, ctx.dims(&node.output[0])?);
    let rank = xd.len();
    if yd.len() != rank || rank < 3 {
        return Err(OnnxError::node(node, format!("Resize of a rank-{rank} input")));
    }
    let mode = parse_mode(node)?;
    let coord = parse_coord(node)?;
    let scales = axis_scales(ctx, node, &xd)?;
    let antialias = attr::int_or(node, "antialias", 0) != 0;
    let mut mats: Vec<Option<(usize, Vec<f32>)>> = vec![None; rank];
    for ax in 0..rank {
        let (in_len, out_len) = (xd[ax] as usize, yd[ax] as usize);
        if in_len == out_len && scales[ax] == 1.0 {
            continue;
        }
        if ax < 2 || ax + 2 < rank {
            return Err(OnnxError::node(node, format!("Resize along axis {ax}: only the last two (spatial) axes are supported")));
        }
        if in_len == 0 || out_len == 0 {
            return Err(OnnxError::node(node, "Resize to or from an empty axis"));
        }
        // Antialiasing widens the filter only when downsampling (linear and cubic modes).
        if antialias && !matches!(mode, Mode::Nearest(_)) && scales[ax] < 1.0 {
            return Err(OnnxError::node(node, "Resize with antialias when downsampling"));
        }
        let a = interpolation_matrix(mode, coord, scales[ax], out_len, in_len);
        if !is_identity(&a, out_len, in_len) {
            mats[ax] = Some((out_len, a));
        }
    }
    let (h, w) = (rank - 2, rank - 1);
    if mats[h].is_none() && mats[w].is_none() {
        return Ok(vec![Some(dy.to_string())]);
    }
    // Integer nearest upsampling: dX[.., i, j] = sum of the kh x kw block of dY.
    let factor = |ax: usize| match &mats[ax] {
        None => Some(1),
        Some((out_len, a)) => block_factor(a, *out_len, xd[ax] as usize),
    };
    if let (Some(kh), Some(kw)) = (factor(h), factor(w)) {
        let mut shape = vec![0i64];
        shape.extend_from_slice(&xd[1..h]);
        shape.extend([xd[h], kh as i64, xd[w], kw as i64]);
        let s = ctx.e.ints(&shape);
        let blocks = ctx.e.op("Reshape", &[dy, &s], vec![], "resize_blocks");
        let axes = ctx.e.ints(&[h as i64 + 1, w as i64 + 2]);
        let dx = ctx.e.op("ReduceSum", &[&blocks, &axes], vec![attr::make_int("keepdims", 0)], "resize_grad");
        return Ok(vec![Some(dx)]);
    }
    let mut g = dy.to_string();
    if let Some((out_len, a)) = &mats[w] {
        // [.., Ho, Wo] · A_w [Wo, Wi]
        let m = ctx.e.const_f32(&[*out_len as i64, xd[w]], a);
        g = ctx.e.op("MatMul", &[&g, &m], vec![], "resize_grad_w");
    }
    if let Some((out_len, a)) = &mats[h] {
        // A_h^T [Hi, Ho] · [.., Ho, Wi]
        let in_len = xd[h] as usize;
        let mut t = vec![0f32; a.len()];
        for o in 0..*out_len {
            for i in 0..in_len {
                t[i * out_len + o] = a[o * in_len + i];
            }
        }
        let m = ctx.e.const_f32(&[xd[h], *out_len as i64], &t);
        g = ctx.e.op("MatMul", &[&m, &g], vec![], "resize_grad_h");
    }
    Ok(vec![Some(g)])
}


/// GridSample (opset 16; `linear` in opset 20), `bilinear` with `padding_mode` `zeros`, either `align_corners`:
/// y[n, c, i, j] = sum over the four corners k around (x, y) of w_k X[n, c, y_k, x_k], where
/// x = gx * sx + (W - 1) / 2 with sx = W / 2 (align_corners 0) or (W - 1) / 2 (align_corners 1), likewise y, and a
/// corner outside the map reads 0 (Deformable DETR's and RT-DETR's multi-scale deformable attention).
/// - dX: each dy[n, c, i, j] w_k added into its corner: ScatterElements "add" over the flattened map, per corner.
/// - dgrid: the weights are linear in x between corners, so dy/dx = (1 - fy)(v10 - v00) + fy (v11 - v01) and
///   dy/dy = (1 - fx)(v01 - v00) + fx (v11 - v10) with the corners' values v (GatherElements), summed over the
///   channels against dy, times sx (sy). At an integer coordinate the map has a kink and this is the right-hand
///   derivative, as PyTorch's.
fn grid_sample(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], needs: &[bool]) -> Grads {
    let dy = dy0(node, dy)?;
    let mode = attr::string(node, "mode").unwrap_or_else(|| "bilinear".into());
    if mode != "bilinear" && mode != "linear" {
        return Err(OnnxError::node(node, format!("mode `{mode}` (bilinear is supported)")));
    }
    let padding = attr::string(node, "padding_mode").unwrap_or_else(|| "zeros".into());
    if padding != "zeros" {
        return Err(OnnxError::node(node, format!("padding_mode `{padding}` (zeros is supported)")));
    }
    let align = attr::int_or(node, "align_corners", 0) != 0;
    let (x, grid) = (&node.input[0], &node.input[1]);
    let xd = ctx.dims(x)?;
    let [_, c, h, w] = xd[..] else {
        return Err(OnnxError::node(node, format!("a {}-D input (4-D is supported)", xd.len())));
    };
    if (1..4).any(|a| ctx.is_batch_axis(x, a)) {
        return Err(OnnxError::node(node, "the batch folded into the channel or spatial axes"));
    }
    let e = &mut *ctx.e;
    let f = |e: &mut crate::onnx::builder::Emitter, v: f32| e.scalar(v);
    // Per sampled location, flattened to [N, 1, L] so that it broadcasts against [N, C, L].
    let flat = e.ints(&[0, 1, -1]);
    let split = e.ints(&[1, 1]);
    let parts = e.op_n("Split", &[grid, &split], vec![attr::make_int("axis", 3)], "grid_sample_xy", 2);
    let gx = e.op("Reshape", &[&parts[0], &flat], vec![], "grid_sample_gx");
    let gy = e.op("Reshape", &[&parts[1], &flat], vec![], "grid_sample_gy");
    let scale = |n: i64| if align { (n - 1) as f32 / 2.0 } else { n as f32 / 2.0 };
    let (sx, sy) = (scale(w), scale(h));
    let coord = |e: &mut crate::onnx::builder::Emitter, g: &str, s: f32, n: i64, label: &str| {
        let (sc, off) = (f(e, s), f(e, (n - 1) as f32 / 2.0));
        let t = e.op("Mul", &[g, &sc], vec![], label);
        e.op("Add", &[&t, &off], vec![], label)
    };
    let px = coord(e, &gx, sx, w, "grid_sample_x");
    let py = coord(e, &gy, sy, h, "grid_sample_y");
    let x0 = e.op("Floor", &[&px], vec![], "grid_sample_x0");
    let y0 = e.op("Floor", &[&py], vec![], "grid_sample_y0");
    let fx = e.op("Sub", &[&px, &x0], vec![], "grid_sample_fx");
    let fy = e.op("Sub", &[&py, &y0], vec![], "grid_sample_fy");
    let one = f(e, 1.0);
    let gx_ = e.op("Sub", &[&one, &fx], vec![], "grid_sample_1_fx");
    let gy_ = e.op("Sub", &[&one, &fy], vec![], "grid_sample_1_fy");
    let x1 = e.op("Add", &[&x0, &one], vec![], "grid_sample_x1");
    let y1 = e.op("Add", &[&y0, &one], vec![], "grid_sample_y1");
    // The map and dy as [N, C, H * W] and [N, C, L].
    let mshape = e.ints(&[0, c, h * w]);
    let xf = e.op("Reshape", &[x, &mshape], vec![], "grid_sample_map");
    let lshape = e.ints(&[0, c, -1]);
    let dyf = e.op("Reshape", &[dy, &lshape], vec![], "grid_sample_dy");
    let expand = e.op("Shape", &[&dyf], vec![], "grid_sample_dy_shape");
    // Each corner: its flat index [N, C, L] (clamped into the map), and its in-map mask [N, 1, L] as 0/1.
    let zero = f(e, 0.0);
    let (wmax, hmax) = (f(e, (w - 1) as f32), f(e, (h - 1) as f32));
    let wf = f(e, w as f32);
    let mut corners = Vec::new();
    for (cx, cy) in [(&x0, &y0), (&x1, &y0), (&x0, &y1), (&x1, &y1)] {
        let inside = |e: &mut crate::onnx::builder::Emitter, v: &str, max: &str| {
            let lo = e.op("GreaterOrEqual", &[v, &zero], vec![], "grid_sample_lo");
            let hi = e.op("LessOrEqual", &[v, max], vec![], "grid_sample_hi");
            e.op("And", &[&lo, &hi], vec![], "grid_sample_in")
        };
        let ix = inside(e, cx, &wmax);
        let iy = inside(e, cy, &hmax);
        let both = e.op("And", &[&ix, &iy], vec![], "grid_sample_inside");
        let mask = e.op("Cast", &[&both], vec![attr::make_int("to", 1)], "grid_sample_mask");
        let cxc = e.op("Clip", &[cx, &zero, &wmax], vec![], "grid_sample_cx");
        let cyc = e.op("Clip", &[cy, &zero, &hmax], vec![], "grid_sample_cy");
        let row = e.op("Mul", &[&cyc, &wf], vec![], "grid_sample_row");
        let flat_idx = e.op("Add", &[&row, &cxc], vec![], "grid_sample_flat");
        let idx = e.op("Cast", &[&flat_idx], vec![attr::make_int("to", 7)], "grid_sample_index");
        let idx = e.op("Expand", &[&idx, &expand], vec![], "grid_sample_index_c");
        corners.push((idx, mask));
    }
    let weights = [(&gx_, &gy_), (&fx, &gy_), (&gx_, &fy), (&fx, &fy)];
    let mut out = vec![None; node.input.len()];
    if needs.first().copied().unwrap_or(false) {
        let mut acc = ctx.zeros_like(&xf);
        let e = &mut *ctx.e;
        for ((idx, mask), (wa, wb)) in corners.iter().zip(weights) {
            let wk = e.op("Mul", &[wa, wb], vec![], "grid_sample_w");
            let wk = e.op("Mul", &[&wk, mask], vec![], "grid_sample_w_in");
            let upd = e.op("Mul", &[&dyf, &wk], vec![], "grid_sample_upd");
            let attrs = vec![attr::make_int("axis", 2), attr::make_string("reduction", "add")];
            acc = e.op("ScatterElements", &[&acc, idx, &upd], attrs, "grid_sample_dx");
        }
        out[0] = Some(ctx.reshape_like(&acc, x));
    }
    if needs.get(1).copied().unwrap_or(false) {
        let e = &mut *ctx.e;
        let v: Vec<String> = corners
            .iter()
            .map(|(idx, mask)| {
                let g = e.op("GatherElements", &[&xf, idx], vec![attr::make_int("axis", 2)], "grid_sample_v");
                e.op("Mul", &[&g, mask], vec![], "grid_sample_v_in")
            })
            .collect();
        // dy/dx and dy/dy per channel, [N, C, L].
        let d10 = e.op("Sub", &[&v[1], &v[0]], vec![], "grid_sample_d");
        let d32 = e.op("Sub", &[&v[3], &v[2]], vec![], "grid_sample_d");
        let d20 = e.op("Sub", &[&v[2], &v[0]], vec![], "grid_sample_d");
        let d31 = e.op("Sub", &[&v[3], &v[1]], vec![], "grid_sample_d");
        let lerp = |e: &mut crate::onnx::builder::Emitter, a: &str, b: &str, ta: &str, tb: &str| {
            let pa = e.op("Mul", &[a, ta], vec![], "grid_sample_l");
            let pb = e.op("Mul", &[b, tb], vec![], "grid_sample_l");
            e.op("Add", &[&pa, &pb], vec![], "grid_sample_l")
        };
        let dydx = lerp(e, &d10, &d32, &gy_, &fy);
        let dydy = lerp(e, &d20, &d31, &gx_, &fx);
        let axis1 = e.ints(&[1]);
        let reduce = |e: &mut crate::onnx::builder::Emitter, d: &str, s: f32, label: &str| {
            let p = e.op("Mul", &[&dyf, d], vec![], label);
            let r = e.op("ReduceSum", &[&p, &axis1], vec![attr::make_int("keepdims", 1)], label);
            let sc = e.scalar(s);
            e.op("Mul", &[&r, &sc], vec![], label)
        };
        let dgx = reduce(e, &dydx, sx, "grid_sample_dgx");
        let dgy = reduce(e, &dydy, sy, "grid_sample_dgy");
        // [N, 1, L] each -> [N, Ho, Wo, 1] -> [N, Ho, Wo, 2].
        let dgx = ctx.reshape_like(&dgx, &parts[0]);
        let dgy = ctx.reshape_like(&dgy, &parts[1]);
        out[1] = Some(ctx.e.op("Concat", &[&dgx, &dgy], vec![attr::make_int("axis", 3)], "grid_sample_dgrid"));
    }
    Ok(out)
}


/// RoiAlign (opset 16, `mode` avg, `sampling_ratio` > 0), as ONNX Runtime and torchvision's `roi_align` compute it:
/// for RoI r (`x0, y0, x1, y1` times `spatial_scale`, minus 0.5 with `half_pixel`; with `output_half_pixel` each side
/// at least 1), bin (ph, pw) averages G x G bilinear samples at y = y0 + ph b_h + (iy + 0.5) b_h / G (b_h = RoI
/// height / output_height), likewise x. A sample outside [-1, H] x [-1, W] reads 0; one inside reads the map at
/// (clamp(y, 0, H - 1), clamp(x, 0, W - 1)). Its bilinear weights are the tent max(0, 1 - |y' - h|) times the
/// tent in x, so the whole op is separable: Y[r, c] = A_y[r] X[b_r, c] A_x[r]^T with A_y[r] [output_height, H]
/// the tents summed over a bin's G samples, over G (likewise A_x), both built at run time from the RoIs.
/// - dX = sum over r of A_y[r]^T dY[r, c] A_x[r]: a batched MatMul with A_x, then one MatMul with A_y that
///   contracts the RoIs and the output rows together ([H, R * output_height] x [R * output_height, C * W]), so no
///   [R, C, H, W] tensor exists. The map's batch must be 1 (every RoI reads image 0): torchvision's detectors run one
///   image per graph.
/// - The RoIs get no gradient, as in torchvision (`roi_align`'s backward returns none for them; Faster R-CNN also
///   detaches its proposals), and `flow` treats them as not differentiable.
fn roi_align(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], _needs: &[bool]) -> Grads {
    let dy = dy0(node, dy)?;
    let mode = attr::string(node, "mode").unwrap_or_else(|| "avg".into());
    if mode != "avg" {
        return Err(OnnxError::node(node, format!("mode `{mode}` (avg is supported)")));
    }
    let g = attr::int_or(node, "sampling_ratio", 0);
    if g <= 0 {
        return Err(OnnxError::node(node, "sampling_ratio 0: the sampling grid adapts to each RoI's size (a positive sampling_ratio is supported; torchvision's MultiScaleRoIAlign uses 2)"));
    }
    let half_pixel = match attr::string(node, "coordinate_transformation_mode").as_deref() {
        None | Some("half_pixel") => true,
        Some("output_half_pixel") => false,
        Some(other) => return Err(OnnxError::node(node, format!("coordinate_transformation_mode `{other}`"))),
    };
    let (ph, pw) = (attr::int_or(node, "output_height", 1), attr::int_or(node, "output_width", 1));
    let scale = attr::float_or(node, "spatial_scale", 1.0);
    let (x, rois) = (&node.input[0], &node.input[1]);
    let xd = ctx.dims(x)?;
    let [n, _, h, w] = xd[..] else {
        return Err(OnnxError::node(node, format!("a {}-D input (4-D is supported)", xd.len())));
    };
    // The channels may fold in a batch (read at run time); the RoIs' batch indices all name image 0.
    if n != 1 || [0, 2, 3].into_iter().any(|a| ctx.is_batch_axis(x, a)) {
        return Err(OnnxError::node(node, "a batch of several maps (one image per run is supported, as torchvision's detectors export)"));
    }
    let offset = if half_pixel { 0.5 } else { 0.0 };
    // One axis: `first`/`last` are the RoI's columns (0 and 2 for x), `bins` its output size, `size` the map's.
    let axis = |ctx: &mut RuleCtx, first: i64, last: i64, bins: i64, size: i64, label: &str| -> String {
        let e = &mut *ctx.e;
        let axes = e.ints(&[1]);
        let (s0, e0) = (e.ints(&[first]), e.ints(&[first + 1]));
        let (s1, e1) = (e.ints(&[last]), e.ints(&[last + 1]));
        let lo = e.op("Slice", &[rois, &s0, &e0, &axes], vec![], &format!("roi_align_{label}0"));
        let hi = e.op("Slice", &[rois, &s1, &e1, &axes], vec![], &format!("roi_align_{label}1"));
        let sc = e.scalar(scale);
        let off = e.scalar(offset);
        let lo_s = e.op("Mul", &[&lo, &sc], vec![], "roi_align_scaled");
        let lo = e.op("Sub", &[&lo_s, &off], vec![], "roi_align_start");
        let hi_s = e.op("Mul", &[&hi, &sc], vec![], "roi_align_scaled");
        let hi = e.op("Sub", &[&hi_s, &off], vec![], "roi_align_end");
        let mut extent = e.op("Sub", &[&hi, &lo], vec![], "roi_align_extent");
        if !half_pixel {
            let one = e.scalar(1.0);
            extent = e.op("Max", &[&extent, &one], vec![], "roi_align_extent_min1");
        }
        let nb = e.scalar(bins as f32);
        let bin = e.op("Div", &[&extent, &nb], vec![], "roi_align_bin");
        // Sample k = bin * G + i sits at (bin + (i + 0.5) / G) bin sizes from the start: [R, bins * G].
        let steps: Vec<f32> = (0..bins).flat_map(|b| (0..g).map(move |i| b as f32 + (i as f32 + 0.5) / g as f32)).collect();
        let st = e.const_f32(&[1, bins * g], &steps);
        let at = e.op("Mul", &[&bin, &st], vec![], "roi_align_at");
        let pos = e.op("Add", &[&lo, &at], vec![], "roi_align_pos");
        let (m1, sz) = (e.scalar(-1.0), e.scalar(size as f32));
        let ge = e.op("GreaterOrEqual", &[&pos, &m1], vec![], "roi_align_ge");
        let le = e.op("LessOrEqual", &[&pos, &sz], vec![], "roi_align_le");
        let inside = e.op("And", &[&ge, &le], vec![], "roi_align_inside");
        let inside = e.op("Cast", &[&inside], vec![attr::make_int("to", crate::onnx::tensor::FLOAT as i64)], "roi_align_inside_f");
        let (zero, top) = (e.scalar(0.0), e.scalar((size - 1) as f32));
        let clamped = e.op("Clip", &[&pos, &zero, &top], vec![], "roi_align_clamped");
        // No -1: a pyramid level may get no RoI at all (R = 0), and a -1 next to a zero size is ambiguous.
        let expand = e.ints(&[0, bins * g, 1]);
        let col = e.op("Reshape", &[&clamped, &expand], vec![], "roi_align_col");
        let pixels: Vec<f32> = (0..size).map(|p| p as f32).collect();
        let px = e.const_f32(&[1, 1, size], &pixels);
        let d = e.op("Sub", &[&col, &px], vec![], "roi_align_dist");
        let d = e.op("Abs", &[&d], vec![], "roi_align_absdist");
        let one = e.scalar(1.0);
        let tent = e.op("Sub", &[&one, &d], vec![], "roi_align_tent");
        let tent = e.op("Relu", &[&tent], vec![], "roi_align_tent_pos");
        let inside = e.op("Reshape", &[&inside, &expand], vec![], "roi_align_inside_col");
        let wts = e.op("Mul", &[&tent, &inside], vec![], "roi_align_weights");
        // [R, bins, G, size] summed over the samples, over G.
        let split = e.ints(&[0, bins, g, size]);
        let wts = e.op("Reshape", &[&wts, &split], vec![], "roi_align_per_bin");
        let ax2 = e.ints(&[2]);
        let summed = e.op("ReduceSum", &[&wts, &ax2], vec![attr::make_int("keepdims", 0)], "roi_align_bin_weights");
        let count = e.scalar(g as f32);
        e.op("Div", &[&summed, &count], vec![], &format!("roi_align_a{label}"))
    };
    let ax = axis(ctx, 0, 2, pw, w, "x"); // [R, pw, W]
    let ay = axis(ctx, 1, 3, ph, h, "y"); // [R, ph, H]
    let e = &mut *ctx.e;
    // V[r, c, i, x] = sum_j dY[r, c, i, j] A_x[r, j, x]
    let u1 = e.ints(&[1]);
    let ax4 = e.op("Unsqueeze", &[&ax, &u1], vec![], "roi_align_ax4");
    let v = e.op("MatMul", &[dy, &ax4], vec![], "roi_align_v");
    let vt = e.op("Transpose", &[&v], vec![attr::make_ints("perm", &[0, 2, 1, 3])], "roi_align_vt");
    let vt = e.op("Flatten", &[&vt], vec![attr::make_int("axis", 2)], "roi_align_vk");
    let flat_a = e.ints(&[-1, h]);
    let ayk = e.op("Reshape", &[&ay, &flat_a], vec![], "roi_align_ayk");
    let ayt = e.op("Transpose", &[&ayk], vec![attr::make_ints("perm", &[1, 0])], "roi_align_ayt");
    let dx = e.op("MatMul", &[&ayt, &vt], vec![], "roi_align_dx_hcw");
    let hcw = e.ints(&[1, h, -1, w]);
    let dx = e.op("Reshape", &[&dx, &hcw], vec![], "roi_align_dx4");
    let dx = e.op("Transpose", &[&dx], vec![attr::make_ints("perm", &[0, 2, 1, 3])], "roi_align_dx");
    let mut out = vec![None; node.input.len()];
    out[0] = Some(dx);
    Ok(out)
}
