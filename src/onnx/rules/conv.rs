//! Conv: the input gradient is a ConvTranspose with the same weights.

use std::collections::HashMap;

use super::{dy0, not_differentiable, BackwardRule, RuleCtx};
use crate::onnx::proto::NodeProto;
use crate::onnx::{attr, OnnxError, Result};

pub(super) fn register(m: &mut HashMap<&'static str, BackwardRule>) {
    m.insert("Conv", conv);
}

/// Geometry of a sliding-window op along its spatial axes, with `auto_pad` resolved into explicit pads.
#[derive(Debug, Clone)]
pub struct Window {
    pub kernel: Vec<i64>,
    pub strides: Vec<i64>,
    pub dilations: Vec<i64>,
    pub pads_begin: Vec<i64>,
    pub pads_end: Vec<i64>,
}

impl Window {
    /// Reads kernel/strides/dilations/pads of `node`; `input` are the input's spatial dims (for SAME pads).
    pub fn read(node: &NodeProto, kernel: Vec<i64>, input: &[i64]) -> Result<Window> {
        let n = kernel.len();
        let strides = attr::ints(node, "strides").unwrap_or_else(|| vec![1; n]);
        let dilations = attr::ints(node, "dilations").unwrap_or_else(|| vec![1; n]);
        if strides.len() != n || dilations.len() != n || input.len() != n {
            return Err(OnnxError::node(node, "strides/dilations do not match the kernel rank"));
        }
        if strides.iter().chain(&dilations).chain(&kernel).any(|&v| v < 1) {
            return Err(OnnxError::node(node, "non-positive kernel, stride or dilation"));
        }
        let auto_pad = attr::string(node, "auto_pad").unwrap_or_else(|| "NOTSET".into());
        let (pads_begin, pads_end) = match auto_pad.as_str() {
            "NOTSET" | "" => {
                let p = attr::ints(node, "pads").unwrap_or_else(|| vec![0; 2 * n]);
                if p.len() != 2 * n || p.iter().any(|&v| v < 0) {
                    return Err(OnnxError::node(node, "bad pads"));
                }
                (p[..n].to_vec(), p[n..].to_vec())
            }
            "VALID" => (vec![0; n], vec![0; n]),
            "SAME_UPPER" | "SAME_LOWER" => {
                let mut b = vec![0; n];
                let mut e = vec![0; n];
                for i in 0..n {
                    let out = (input[i] + strides[i] - 1) / strides[i];
                    let eff = dilations[i] * (kernel[i] - 1) + 1;
                    let total = ((out - 1) * strides[i] + eff - input[i]).max(0);
                    let small = total / 2;
                    if auto_pad == "SAME_UPPER" {
                        (b[i], e[i]) = (small, total - small);
                    } else {
                        (b[i], e[i]) = (total - small, small);
                    }
                }
                (b, e)
            }
            other => return Err(OnnxError::node(node, format!("unknown auto_pad `{other}`"))),
        };
        Ok(Window { kernel, strides, dilations, pads_begin, pads_end })
    }

    /// `pads` and `output_padding` for the ConvTranspose that maps an output of spatial size `out` back onto an
    /// input of size `input`: output length = s*(O-1) + op + d*(k-1) + 1 - pb - pe must equal H exactly.
    /// Symmetric pads (pe = pb) with output_padding (< stride) making up the difference are preferred: ONNX
    /// Runtime's CUDA ConvTranspose does not take asymmetric pads and would run the node on the CPU. Otherwise
    /// the end pad absorbs any excess and output_padding makes up a shortfall.
    pub fn transpose_geometry(&self, input: &[i64], out: &[i64]) -> (Vec<i64>, Vec<i64>) {
        let n = self.kernel.len();
        let mut pe = vec![0; n];
        let mut op = vec![0; n];
        for i in 0..n {
            let eff = self.dilations[i] * (self.kernel[i] - 1) + 1;
            let full = self.strides[i] * (out[i] - 1) + eff;
            let symmetric_op = input[i] - (full - 2 * self.pads_begin[i]);
            let limit = self.strides[i].max(self.dilations[i]);
            if (0..limit).contains(&symmetric_op) {
                pe[i] = self.pads_begin[i];
                op[i] = symmetric_op;
                continue;
            }
            let excess = full - self.pads_begin[i] - input[i];
            if excess >= 0 {
                pe[i] = excess;
            } else {
                op[i] = -excess;
            }
        }
        let mut pads = self.pads_begin.clone();
        pads.extend(pe);
        (pads, op)
    }
}

fn conv(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], needs: &[bool]) -> Result<Vec<Option<String>>> {
    if needs.iter().skip(1).any(|&n| n) {
        return Err(not_differentiable(node, "weights or bias"));
    }
    let dy = dy0(node, dy)?;
    let x = &node.input[0];
    let w = &node.input[1];
    let xd = ctx.dims(x)?;
    let wd = ctx.dims(w)?;
    let yd = ctx.dims(&node.output[0])?;
    if xd.len() < 3 || wd.len() != xd.len() || yd.len() != xd.len() {
        return Err(OnnxError::node(node, "unexpected ranks"));
    }
    let win = Window::read(node, wd[2..].to_vec(), &xd[2..])?;
    let (pads, output_padding) = win.transpose_geometry(&xd[2..], &yd[2..]);
    let group = attr::int_or(node, "group", 1);
    let shapes = ConvShapes { win: &win, xd: &xd, yd: &yd, wd: &wd, group };
    if let Some(dx) = conv_backward_as_conv(ctx, node, dy, &shapes) {
        return Ok(vec![Some(dx), None, None]);
    }
    if let Some(dx) = strided_conv_backward_polyphase(ctx, node, dy, &shapes) {
        return Ok(vec![Some(dx), None, None]);
    }
    let attrs = vec![
        attr::make_ints("strides", &win.strides),
        attr::make_ints("dilations", &win.dilations),
        attr::make_ints("pads", &pads),
        attr::make_ints("output_padding", &output_padding),
        attr::make_ints("kernel_shape", &win.kernel),
        attr::make_int("group", group),
    ];
    let dx = ctx.e.op("ConvTranspose", &[dy, w], attrs, "conv_grad");
    Ok(vec![Some(dx), None, None])
}

/// For stride-1 convolutions the input gradient is itself a convolution: dY convolved with the weights
/// transposed (in <-> out channels, per group) and flipped spatially, padded by d*(k-1) - p. ONNX Runtime runs
/// Conv on its fast NCHWc path while ConvTranspose goes through col2im, so this is the cheaper form. The
/// transposed weights are precomputed once per weight tensor (shared by every chain). Returns None where the
/// conditions do not hold (strides > 1, weights not constant, pads larger than the dilated kernel).
/// A forward Conv's geometry: window, input / output / weight dims (batch 1) and group count.
struct ConvShapes<'a> {
    win: &'a Window,
    xd: &'a [i64],
    yd: &'a [i64],
    wd: &'a [i64],
    group: i64,
}

fn conv_backward_as_conv(ctx: &mut RuleCtx, node: &NodeProto, dy: &str, shapes: &ConvShapes) -> Option<String> {
    let ConvShapes { win, xd, yd, wd, group } = *shapes;
    if win.strides.iter().any(|&s| s != 1) || group < 1 {
        return None;
    }
    let n = win.kernel.len();
    let mut pads = vec![0i64; 2 * n];
    for i in 0..n {
        let span = win.dilations[i] * (win.kernel[i] - 1);
        let begin = span - win.pads_begin[i];
        // Output length O + begin + end - span must equal H.
        let end = xd[2 + i] - yd[2 + i] + win.pads_begin[i];
        if begin < 0 || end < 0 {
            return None;
        }
        pads[i] = begin;
        pads[n + i] = end;
    }
    let w_name = &node.input[1];
    let key = format!("ConvBackwardWeights({w_name})");
    let flipped = match ctx.memo.get(&key) {
        Some(name) => name.clone(),
        None => {
            let (_, w) = ctx.const_f32(w_name)?;
            let kernel: Vec<usize> = wd[2..].iter().map(|&d| d as usize).collect();
            let flip = |t: &[usize]| Some(t.iter().zip(&kernel).map(|(&p, &k)| k - 1 - p).collect());
            let (dims, data) = transpose_weights(&w, wd, group as usize, &kernel, flip);
            let name = ctx.e.const_f32(&dims, &data);
            ctx.memo.insert(key, name.clone());
            name
        }
    };
    let attrs = vec![
        attr::make_ints("dilations", &win.dilations),
        attr::make_ints("pads", &pads),
        attr::make_ints("kernel_shape", &win.kernel),
        attr::make_int("group", group),
    ];
    Some(ctx.e.op("Conv", &[dy, &flipped], attrs, "conv_grad"))
}

/// `W [M, C/g, k..]` -> `W' [C, M/g, taps..]`: channels transposed per group and, per spatial axis, the taps
/// `tap(axis, t)` of the original kernel (flipped or subsampled by the caller's choice).
fn transpose_weights(w: &[f32], wd: &[i64], group: usize, out_kernel: &[usize], tap: impl Fn(&[usize]) -> Option<Vec<usize>>) -> (Vec<i64>, Vec<f32>) {
    let (m, cg) = (wd[0] as usize, wd[1] as usize);
    let mg = m / group;
    let kernel: Vec<usize> = wd[2..].iter().map(|&d| d as usize).collect();
    let in_spatial: usize = kernel.iter().product();
    let out_spatial: usize = out_kernel.iter().product();
    let mut out = vec![0f32; group * cg * mg * out_spatial];
    let mut t = vec![0usize; out_kernel.len()];
    for op in 0..out_spatial {
        // unravel op into t (row-major over out_kernel)
        let mut rem = op;
        for a in (0..out_kernel.len()).rev() {
            t[a] = rem % out_kernel[a];
            rem /= out_kernel[a];
        }
        let Some(src_pos) = tap(&t) else { continue };
        let ip = src_pos.iter().zip(&kernel).fold(0usize, |acc, (&p, &k)| acc * k + p);
        for gi in 0..group {
            for mm in 0..mg {
                for c in 0..cg {
                    let src = ((gi * mg + mm) * cg + c) * in_spatial + ip;
                    let dst = ((gi * cg + c) * mg + mm) * out_spatial + op;
                    out[dst] = w[src];
                }
            }
        }
    }
    let mut dims = vec![(cg * group) as i64, mg as i64];
    dims.extend(out_kernel.iter().map(|&k| k as i64));
    (dims, out)
}

/// Strided convolutions (no dilation): the input gradient split by output position modulo the stride
/// ("polyphase"). Position i = s*q + r receives only the taps k with k = r + pb (mod s), so each of the
/// s_h*s_w phases is a stride-1 Conv of dY with a flipped sub-kernel; the phases are interleaved with
/// Unsqueeze/Concat/Reshape and cropped to H x W. Same FLOPs as the forward conv, on ONNX Runtime's fast Conv
/// path instead of ConvTranspose's col2im. None (ConvTranspose is used) for dilations, more than 2 spatial
/// axes, fewer than 16 input channels, non-constant weights, or pads that would come out negative.
fn strided_conv_backward_polyphase(ctx: &mut RuleCtx, node: &NodeProto, dy: &str, shapes: &ConvShapes) -> Option<String> {
    let ConvShapes { win, xd, yd, wd, group } = *shapes;
    let n = win.kernel.len();
    // With few input channels (an RGB stem) the phase convs are too thin for ONNX Runtime's NCHWc kernels;
    // measured on ResNet-50's 7x7 stem: 3.5 ms as four phases, 1.2 ms as one ConvTranspose.
    if n != 2 || win.dilations.iter().any(|&d| d != 1) || group < 1 || xd[1] < 16 {
        return None;
    }
    let (s, k, pb) = (&win.strides, &win.kernel, &win.pads_begin);
    let (h, o) = (&xd[2..], &yd[2..]);
    let q: Vec<i64> = (0..n).map(|a| (h[a] + s[a] - 1) / s[a]).collect();
    // Per axis and residue r: (first tap k0, tap count J, pad begin, pad end) of the phase's stride-1 conv.
    let mut phases: Vec<Vec<(i64, i64, i64, i64)>> = Vec::with_capacity(n);
    for a in 0..n {
        let mut per_axis = Vec::new();
        for r in 0..s[a] {
            let k0 = (r + pb[a]).rem_euclid(s[a]);
            let j = if k0 < k[a] { (k[a] - 1 - k0) / s[a] + 1 } else { 0 };
            if j == 0 {
                per_axis.push((k0, 0, 0, 0));
                continue;
            }
            let c0 = (k0 - r - pb[a]) / s[a];
            let begin = c0 + j - 1;
            let end = q[a] - o[a] - begin + j - 1;
            if begin < 0 || end < 0 {
                return None;
            }
            per_axis.push((k0, j, begin, end));
        }
        phases.push(per_axis);
    }
    let (_, w) = ctx.const_f32(&node.input[1])?;
    let channels = xd[1];
    // The phases that some tap reaches: stride-1 convs of dY, each [N, C, Qh, Qw].
    let mut parts: Vec<Vec<Option<String>>> = vec![vec![None; s[1] as usize]; s[0] as usize];
    for rh in 0..s[0] as usize {
        for rw in 0..s[1] as usize {
            let (ph, pw) = (phases[0][rh], phases[1][rw]);
            if ph.1 == 0 || pw.1 == 0 {
                continue;
            }
            let key = format!("PolyphaseWeights({},{rh},{rw})", node.input[1]);
            let weights = match ctx.memo.get(&key) {
                Some(name) => name.clone(),
                None => {
                    let (jh, jw) = (ph.1 as usize, pw.1 as usize);
                    let tap = |t: &[usize]| -> Option<Vec<usize>> {
                        // flipped: output tap t reads original tap k0 + (J - 1 - t) * s
                        Some(vec![ph.0 as usize + (jh - 1 - t[0]) * s[0] as usize, pw.0 as usize + (jw - 1 - t[1]) * s[1] as usize])
                    };
                    let (dims, data) = transpose_weights(&w, wd, group as usize, &[jh, jw], tap);
                    let name = ctx.e.const_f32(&dims, &data);
                    ctx.memo.insert(key, name.clone());
                    name
                }
            };
            let attrs = vec![
                attr::make_ints("pads", &[ph.2, pw.2, ph.3, pw.3]),
                attr::make_ints("kernel_shape", &[ph.1, pw.1]),
                attr::make_int("group", group),
            ];
            parts[rh][rw] = Some(ctx.e.op("Conv", &[dy, &weights], attrs, "conv_grad_phase"));
        }
    }
    // No tap reaches the other phases (a 1x1 kernel with stride 2: three of four): zeros shaped like a reached
    // phase. Its Shape reuses the layout reorder that the interleave needs anyway; Shape(dY) would add one.
    let reached = parts.iter().flatten().flatten().next()?.clone();
    let mut rows = Vec::new();
    for row in parts {
        let mut cols = Vec::new();
        for part in row {
            let part = match part {
                Some(p) => p,
                None => ctx.zeros_like(&reached),
            };
            let axes = ctx.e.ints(&[3, 5]);
            cols.push(ctx.e.op("Unsqueeze", &[&part, &axes], vec![], "phase_6d"));
        }
        let refs: Vec<&str> = cols.iter().map(String::as_str).collect();
        rows.push(if refs.len() == 1 { cols[0].clone() } else { ctx.e.op("Concat", &refs, vec![attr::make_int("axis", 5)], "phase_cols") });
    }
    let refs: Vec<&str> = rows.iter().map(String::as_str).collect();
    let grid = if refs.len() == 1 { rows[0].clone() } else { ctx.e.op("Concat", &refs, vec![attr::make_int("axis", 3)], "phase_rows") };
    let shape = ctx.e.ints(&[0, channels, q[0] * s[0], q[1] * s[1]]);
    let mut dx = ctx.e.op("Reshape", &[&grid, &shape], vec![], "phase_interleaved");
    if q[0] * s[0] != h[0] || q[1] * s[1] != h[1] {
        let (st, en, ax) = (ctx.e.ints(&[0, 0]), ctx.e.ints(&[h[0], h[1]]), ctx.e.ints(&[2, 3]));
        dx = ctx.e.op("Slice", &[&dx, &st, &en, &ax], vec![], "conv_grad");
    }
    Some(ctx.layout_hint(&node.input[0], dx))
}
