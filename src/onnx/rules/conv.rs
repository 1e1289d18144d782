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
    /// The end pad absorbs any excess; output_padding (< stride) makes up a shortfall.
    pub fn transpose_geometry(&self, input: &[i64], out: &[i64]) -> (Vec<i64>, Vec<i64>) {
        let n = self.kernel.len();
        let mut pe = vec![0; n];
        let mut op = vec![0; n];
        for i in 0..n {
            let eff = self.dilations[i] * (self.kernel[i] - 1) + 1;
            let excess = self.strides[i] * (out[i] - 1) + eff - self.pads_begin[i] - input[i];
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
