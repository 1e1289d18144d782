//! Pooling and reductions over spatial axes.

use std::collections::HashMap;

use super::conv::Window;
use super::{dy0, input, norm_axis, BackwardRule, RuleCtx};
use crate::onnx::probe::Probe;
use crate::onnx::proto::NodeProto;
use crate::onnx::{attr, tensor, OnnxError, Result};

pub(super) fn register(m: &mut HashMap<&'static str, BackwardRule>) {
    m.insert("MaxPool", max_pool);
    m.insert("GlobalMaxPool", max_pool);
    m.insert("AveragePool", average_pool);
    m.insert("GlobalAveragePool", global_average_pool);
    m.insert("ReduceMean", reduce_mean);
    m.insert("ReduceSum", reduce_sum);
}

/// Suffix of the Indices output the rewrite gives MaxPool nodes whose gradient it needs.
const INDICES_SUFFIX: &str = "/camserve.indices";

/// Changes a forward node so that its gradient can be computed: MaxPool gets its Indices output;
/// GlobalMaxPool becomes the equivalent MaxPool (kernel = spatial size) with Indices, so that ties and the
/// ReLU zeros of dead channels route the gradient to one element like PyTorch, not to all of them.
/// Only nodes on a chain's path are changed: Indices take MaxPool off ONNX Runtime's fastest CPU kernel.
pub fn prepare_forward(node: &mut NodeProto, probe: &Probe) -> Result<()> {
    match node.op_type() {
        "GlobalMaxPool" => {
            let xd = probe.dims(&node.input[0]).ok_or_else(|| OnnxError::node(node, "input shape unknown"))?;
            let kernel = xd[2..].to_vec();
            node.op_type = Some("MaxPool".into());
            node.attribute = vec![attr::make_ints("kernel_shape", &kernel)];
        }
        "MaxPool" => {}
        _ => return Ok(()),
    }
    if attr::int_or(node, "storage_order", 0) != 0 {
        return Err(OnnxError::node(node, "MaxPool with storage_order=1"));
    }
    if node.output.len() < 2 || node.output[1].is_empty() {
        let name = format!("{}{INDICES_SUFFIX}", node.output[0]);
        node.output.truncate(1);
        node.output.push(name);
    }
    Ok(())
}

fn max_pool(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], _needs: &[bool]) -> Result<Vec<Option<String>>> {
    // The Indices output holds flat offsets over the whole input (batch and channel included), so one
    // ScatterElements with reduction=add routes every output's gradient to its maximum; "add" matters where
    // overlapping windows (3x3 stride 2) pick the same element.
    let dy = dy0(node, dy)?;
    let indices = node.output.get(1).filter(|s| !s.is_empty()).ok_or_else(|| {
        OnnxError::node(node, "MaxPool has no Indices output (prepare_forward was not applied). This is a bug.")
    })?;
    let x = &node.input[0];
    let flat = ctx.e.ints(&[-1]);
    let idx = ctx.e.op("Reshape", &[indices, &flat], vec![], "maxpool_idx");
    let g = ctx.e.op("Reshape", &[dy, &flat], vec![], "maxpool_dy");
    let size = ctx.e.op("Size", &[x], vec![], "maxpool_size");
    let size1 = ctx.e.op("Reshape", &[&size, &flat], vec![], "maxpool_size1");
    let zero = tensor::f32_tensor("", &[1], &[0.0]);
    let zeros = ctx.e.op("ConstantOfShape", &[&size1], vec![attr::make_tensor("value", zero)], "maxpool_zeros");
    let scattered = ctx.e.op(
        "ScatterElements",
        &[&zeros, &idx, &g],
        vec![attr::make_int("axis", 0), attr::make_string("reduction", "add")],
        "maxpool_scatter",
    );
    Ok(vec![Some(ctx.reshape_like(&scattered, x))])
}

fn average_pool(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], _needs: &[bool]) -> Result<Vec<Option<String>>> {
    // dX = ConvTranspose(dY / count, ones[C,1,k..], group=C): each output spreads dY/count over its window.
    let dy = dy0(node, dy)?;
    let x = &node.input[0];
    let xd = ctx.dims(x)?;
    let yd = ctx.dims(&node.output[0])?;
    let kernel = attr::ints(node, "kernel_shape").ok_or_else(|| OnnxError::node(node, "no kernel_shape"))?;
    if xd.len() != kernel.len() + 2 || yd.len() != xd.len() {
        return Err(OnnxError::node(node, "unexpected ranks"));
    }
    let win = Window::read(node, kernel, &xd[2..])?;
    if win.dilations.iter().any(|&d| d != 1) {
        return Err(OnnxError::node(node, "AveragePool with dilations"));
    }
    let include_pad = attr::int_or(node, "count_include_pad", 0) != 0;
    let n = win.kernel.len();
    // Per-axis counts; the window's count is their product.
    let counts: Vec<Vec<f32>> = (0..n)
        .map(|i| {
            let (h, k, s, pb, pe) = (xd[2 + i], win.kernel[i], win.strides[i], win.pads_begin[i], win.pads_end[i]);
            (0..yd[2 + i])
                .map(|o| {
                    let start = o * s - pb;
                    let end = start + k;
                    let (lo, hi) = if include_pad { (-pb, h + pe) } else { (0, h) };
                    (end.min(hi) - start.max(lo)).max(0) as f32
                })
                .collect()
        })
        .collect();
    let out_spatial = &yd[2..];
    let total = tensor::numel(out_spatial);
    let mut inv = vec![1f32; total];
    for (flat, v) in inv.iter_mut().enumerate() {
        let mut rem = flat;
        let mut c = 1f32;
        for i in (0..n).rev() {
            let o = rem % out_spatial[i] as usize;
            rem /= out_spatial[i] as usize;
            c *= counts[i][o];
        }
        *v = if c > 0.0 { 1.0 / c } else { 0.0 };
    }
    let mut inv_dims = vec![1, 1];
    inv_dims.extend_from_slice(out_spatial);
    let inv_name = ctx.e.const_f32(&inv_dims, &inv);
    let scaled = ctx.mul(dy, &inv_name);
    let channels = xd[1];
    let mut wdims = vec![channels, 1];
    wdims.extend_from_slice(&win.kernel);
    let ones = ctx.e.const_f32(&wdims, &vec![1.0; tensor::numel(&wdims)]);
    let (pads, output_padding) = win.transpose_geometry(&xd[2..], out_spatial);
    let attrs = vec![
        attr::make_ints("strides", &win.strides),
        attr::make_ints("pads", &pads),
        attr::make_ints("output_padding", &output_padding),
        attr::make_ints("kernel_shape", &win.kernel),
        attr::make_int("group", channels),
    ];
    Ok(vec![Some(ctx.e.op("ConvTranspose", &[&scaled, &ones], attrs, "avgpool_grad"))])
}

fn global_average_pool(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], _needs: &[bool]) -> Result<Vec<Option<String>>> {
    let dy = dy0(node, dy)?;
    let x = &node.input[0];
    let xd = ctx.dims(x)?;
    let count = tensor::numel(&xd[2..]) as f32;
    let scaled = ctx.div_scalar(dy, count);
    // dY is [N, C, 1, ...]: expanding to the constant [1, C, H, ...] gives [N, C, H, ...] and, unlike a
    // Shape-fed Expand, keeps the batch symbol for shape inference (see the Flatten rule).
    let mut shape = xd.clone();
    shape[0] = 1;
    let shape = ctx.e.ints(&shape);
    let dx = ctx.e.op("Expand", &[&scaled, &shape], vec![], "gap_grad");
    Ok(vec![Some(if xd.len() == 4 { ctx.layout_hint(x, dx) } else { dx })])
}

/// The axes a Reduce* node reduces, non-negative, sorted and deduplicated, in either form: the `axes` attribute
/// (ReduceMean/Max/Min/L2/LogSumExp before opset 18, ReduceSum before 13) or the optional second input (from
/// those opsets on). Empty or missing axes mean all axes, or none (the identity) with `noop_with_empty_axes`.
/// Reducing over the batch axis mixes the images of a batch, which no per-image explanation can have.
pub(super) fn reduce_axes(ctx: &RuleCtx, node: &NodeProto, rank: usize) -> Result<Vec<i64>> {
    let axes = match input(node, 1) {
        Some(a) => ctx.const_i64(a).ok_or_else(|| OnnxError::node(node, "its axes input is not a constant"))?,
        None => attr::ints(node, "axes").unwrap_or_default(),
    };
    let mut axes: Vec<i64> = if axes.is_empty() {
        if attr::int_or(node, "noop_with_empty_axes", 0) != 0 {
            return Ok(vec![]);
        }
        (0..rank as i64).collect()
    } else {
        axes.iter().map(|&a| norm_axis(a, rank)).collect()
    };
    axes.sort_unstable();
    axes.dedup();
    if axes.iter().any(|&a| a < 0 || a >= rank as i64) {
        return Err(OnnxError::node(node, format!("reduction axes out of range for a rank-{rank} input")));
    }
    if axes.contains(&0) {
        return Err(OnnxError::node(
            node,
            "reduction over the batch axis (axis 0; no axes means all axes): it mixes the images of a batch",
        ));
    }
    Ok(axes)
}

/// `t`, shaped like a Reduce* node's output, with the reduced `axes` as size-1 dims (Unsqueeze where
/// keepdims = 0), so that it broadcasts against the input.
pub(super) fn keep_reduced(ctx: &mut RuleCtx, node: &NodeProto, t: &str, axes: &[i64]) -> String {
    if attr::int_or(node, "keepdims", 1) != 0 {
        return t.to_string();
    }
    let a = ctx.e.ints(axes);
    ctx.e.op("Unsqueeze", &[t, &a], vec![], "reduce_unsqueeze")
}

/// ReduceSum: dx = Expand(dy) over the reduced axes; ReduceMean: the same divided by the reduced count.
fn reduce(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], mean: bool) -> Result<Vec<Option<String>>> {
    let dy = dy0(node, dy)?;
    let x = &node.input[0];
    let xd = ctx.dims(x)?;
    let axes = reduce_axes(ctx, node, xd.len())?;
    if axes.is_empty() {
        return Ok(vec![Some(dy.to_string()), None]);
    }
    let mut g = keep_reduced(ctx, node, dy, &axes);
    if mean {
        let count: i64 = axes.iter().map(|&a| xd[a as usize]).product();
        g = ctx.div_scalar(&g, count as f32);
    }
    let shape = ctx.shape_of(x);
    Ok(vec![Some(ctx.e.op("Expand", &[&g, &shape], vec![], "reduce_grad")), None])
}

fn reduce_mean(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], _needs: &[bool]) -> Result<Vec<Option<String>>> {
    reduce(ctx, node, dy, true)
}

fn reduce_sum(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], _needs: &[bool]) -> Result<Vec<Option<String>>> {
    reduce(ctx, node, dy, false)
}
