//! Gemm and MatMul.

use std::collections::HashMap;

use super::{dy0, BackwardRule, RuleCtx};
use crate::onnx::proto::NodeProto;
use crate::onnx::{attr, OnnxError, Result};

pub(super) fn register(m: &mut HashMap<&'static str, BackwardRule>) {
    m.insert("Gemm", gemm);
    m.insert("MatMul", matmul);
}

fn gemm(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], needs: &[bool]) -> Result<Vec<Option<String>>> {
    // Y = alpha * A' B' + beta * C with A' = transA ? A^T : A, B' likewise.
    let dy = dy0(node, dy)?;
    let alpha = attr::float_or(node, "alpha", 1.0);
    let beta = attr::float_or(node, "beta", 1.0);
    let ta = attr::int_or(node, "transA", 0);
    let tb = attr::int_or(node, "transB", 0);
    let (a, b) = (node.input[0].clone(), node.input[1].clone());
    let g = |ctx: &mut RuleCtx, x: &str, y: &str, ta: i64, tb: i64, label: &str| {
        let attrs = vec![attr::make_float("alpha", alpha), attr::make_int("transA", ta), attr::make_int("transB", tb)];
        ctx.e.op("Gemm", &[x, y], attrs, label)
    };
    let mut out = vec![None, None, None];
    if needs[0] {
        // dA' = alpha dY B'^T; dA = transA ? (dA')^T = alpha B' dY^T : dA'
        out[0] = Some(if ta == 0 { g(ctx, dy, &b, 0, 1 - tb, "gemm_da") } else { g(ctx, &b, dy, tb, 1, "gemm_da") });
    }
    if needs[1] {
        // dB' = alpha A'^T dY; dB = transB ? (dB')^T = alpha dY^T A' : dB'
        out[1] = Some(if tb == 0 { g(ctx, &a, dy, 1 - ta, 0, "gemm_db") } else { g(ctx, dy, &a, 1, ta, "gemm_db") });
    }
    if needs.get(2).copied().unwrap_or(false) {
        let c = node.input[2].clone();
        let scaled = ctx.mul_scalar(dy, beta);
        let yd = ctx.dims(&node.output[0])?;
        let cd = ctx.dims(&c)?;
        out[2] = Some(ctx.unbroadcast(&scaled, &yd, &c, &cd));
    }
    Ok(out)
}

fn matmul(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], needs: &[bool]) -> Result<Vec<Option<String>>> {
    // Y = A B (batched, broadcasting): dA = dY B^T, dB = A^T dY, each summed over broadcast axes.
    let dy = dy0(node, dy)?;
    let (a, b) = (node.input[0].clone(), node.input[1].clone());
    let (ad, bd, yd) = (ctx.dims(&a)?, ctx.dims(&b)?, ctx.dims(&node.output[0])?);
    if ad.len() < 2 || bd.len() < 2 {
        return Err(OnnxError::node(node, "MatMul with a 1-D operand"));
    }
    let swap = |r: usize| -> Vec<i64> {
        let mut p: Vec<i64> = (0..r as i64).collect();
        p.swap(r - 2, r - 1);
        p
    };
    let mut out = vec![None, None];
    if needs[0] {
        let bt = ctx.e.op("Transpose", &[&b], vec![attr::make_ints("perm", &swap(bd.len()))], "matmul_bt");
        let g = ctx.e.op("MatMul", &[dy, &bt], vec![], "matmul_da");
        let mut gd = yd.clone();
        let r = gd.len();
        gd[r - 1] = ad[ad.len() - 1];
        out[0] = Some(ctx.unbroadcast(&g, &gd, &a, &ad));
    }
    if needs[1] {
        let at = ctx.e.op("Transpose", &[&a], vec![attr::make_ints("perm", &swap(ad.len()))], "matmul_at");
        let g = ctx.e.op("MatMul", &[&at, dy], vec![], "matmul_db");
        let mut gd = yd.clone();
        let r = gd.len();
        gd[r - 2] = bd[bd.len() - 2];
        out[1] = Some(ctx.unbroadcast(&g, &gd, &b, &bd));
    }
    Ok(out)
}
