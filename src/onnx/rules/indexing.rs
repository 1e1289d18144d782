//! Indexing and selection: Gather, GatherElements, GatherND, ScatterElements, ScatterND (reduction "none"),
//! Where, Tile, Compress, TopK (its values; the indices carry no gradient).
//!
//! The gathers' gradients scatter-add the output gradient into zeros (ScatterElements / ScatterND with
//! reduction "add", opset 16+), which accumulates repeated indices and takes indices computed at run time. Only
//! indices that are true constants (initializers, Constant nodes) are read at build time: the shape probe runs
//! on a zero image, so its values of an index tensor computed from the image would be wrong for other images.
//! The batch axis is the one the shape probe sees grow with the batch size (not always axis 0: attention stacks
//! q, k, v as `[3, ...]`). Along it, only a Gather with run-time indices is differentiated (every size read at
//! run time); constant indices there, GatherElements and ScatterElements along it, and Tile repeating it are
//! refused.

use std::collections::HashMap;

use super::{dy0, input, norm_axis, BackwardRule, RuleCtx};
use crate::onnx::proto::NodeProto;
use crate::onnx::tensor::INT64;
use crate::onnx::{attr, OnnxError, Result};

pub(super) fn register(m: &mut HashMap<&'static str, BackwardRule>) {
    m.insert("Gather", gather);
    m.insert("GatherElements", gather_elements);
    m.insert("GatherND", gather_nd);
    m.insert("ScatterElements", scatter_elements);
    m.insert("ScatterND", scatter_nd);
    m.insert("Where", where_);
    m.insert("Tile", tile);
    m.insert("Compress", compress);
    m.insert("TopK", top_k);
}

type Grads = Result<Vec<Option<String>>>;

/// The values of an index tensor that is a true constant (never the probe's values: see the module comment).
fn constant_indices(ctx: &RuleCtx, name: &str) -> Option<Vec<i64>> {
    ctx.index.const_i64(ctx.graph, name)
}

fn indices_input<'a>(node: &'a NodeProto) -> Result<&'a str> {
    input(node, 1).ok_or_else(|| OnnxError::node(node, "no indices input"))
}

/// The `axis` attribute normalised against `rank`. An axis of `data` that grows with the batch size (the shape
/// probe tells; axis 0 is not always it: timm and torchvision attention stack q, k, v as `[3, ...]`) is refused
/// unless `batch_ok`: the rule would bake its size at batch 1 into the graph.
fn indexed_axis(ctx: &RuleCtx, node: &NodeProto, data: &str, rank: usize, batch_ok: bool) -> Result<usize> {
    let axis = attr::int_or(node, "axis", 0);
    let a = norm_axis(axis, rank);
    if a < 0 || a as usize >= rank {
        return Err(OnnxError::node(node, format!("axis {axis} is out of range for rank {rank}")));
    }
    if !batch_ok && ctx.is_batch_axis(data, a as usize) {
        return Err(OnnxError::node(node, format!("indexing along axis {axis}, the batch axis, is not supported")));
    }
    Ok(a as usize)
}

/// Run-time indices (int32 or int64) as int64 in [0, size): `i + size * (i < 0)`. `size` is an int64 tensor
/// that broadcasts against the indices (a scalar, or one size per index column for the ND ops).
fn normalised_indices(ctx: &mut RuleCtx, idx: &str, size: &str) -> String {
    let key = format!("NormalisedIndices({idx},{size})");
    if let Some(n) = ctx.memo.get(&key) {
        return n.clone();
    }
    let to_i64 = || vec![attr::make_int("to", INT64 as i64)];
    let i = ctx.e.op("Cast", &[idx], to_i64(), "indices_i64");
    let zero = ctx.e.const_i64(&[], &[0]);
    let neg = ctx.e.op("Less", &[&i, &zero], vec![], "indices_neg");
    let neg = ctx.e.op("Cast", &[&neg], to_i64(), "indices_neg_i64");
    let shift = ctx.e.op("Mul", &[&neg, size], vec![], "indices_shift");
    let n = ctx.e.op("Add", &[&i, &shift], vec![], "indices_norm");
    ctx.memo.insert(key, n.clone());
    n
}

fn scatter_add(ctx: &mut RuleCtx, zeros: &str, idx: &str, g: &str, axis: usize, label: &str) -> String {
    let attrs = vec![attr::make_int("axis", axis as i64), attr::make_string("reduction", "add")];
    ctx.e.op("ScatterElements", &[zeros, idx, g], attrs, label)
}

fn gather(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], _needs: &[bool]) -> Grads {
    // y = data.take(indices, axis): y[a.., i.., b..] = data[a.., indices[i..], b..]. The gradient adds each
    // dy[a.., i.., b..] into dx[a.., indices[i..], b..] (repeated indices accumulate). Constant indices that
    // form one ascending run (a scalar index such as ViT's class token, a slice written as a Gather) are a Pad;
    // others a ScatterElements "add" of dy, the indices axes flattened to one, into zeros.
    let dy = dy0(node, dy)?;
    let data = &node.input[0];
    let idx = indices_input(node)?;
    let xd = ctx.dims(data)?;
    let rank = xd.len();
    let constant = constant_indices(ctx, idx);
    // Run-time indices may gather along an axis that holds the batch (the dynamo exporter's `as_strided` over a
    // flattened [N * C] tensor): the scatter below reads every size at run time. Constant ones may not.
    let axis = indexed_axis(ctx, node, data, rank, constant.is_none())?;
    let size = xd[axis];
    // dy with the indices axes collapsed into one: [xd[..axis] (copied), m, xd[axis+1..]]. The axes after the
    // indexed one are written out, so none of them may hold the batch.
    let mut collapsed: Vec<i64> = xd.clone();
    collapsed[..axis].fill(0);
    collapsed[axis] = -1;
    let idx_rank = ctx.dims(idx)?.len();
    let needs_collapse = idx_rank >= 2 || constant.is_none();
    if needs_collapse && (axis + 1..rank).any(|k| ctx.is_batch_axis(data, k)) {
        return Err(OnnxError::node(node, "multi-dimensional or computed indices ahead of the batch axis are not supported"));
    }
    let mut out = vec![None; node.input.len()];
    if let Some(v) = constant {
        if let Some(&bad) = v.iter().find(|&&i| i < -size || i >= size) {
            return Err(OnnxError::node(node, format!("index {bad} is out of range for an axis of size {size}")));
        }
        let v: Vec<i64> = v.iter().map(|&i| if i < 0 { i + size } else { i }).collect();
        let m = v.len() as i64;
        let g = match idx_rank {
            1 => dy.to_string(),
            0 => {
                let a = ctx.e.ints(&[axis as i64]);
                ctx.e.op("Unsqueeze", &[dy, &a], vec![], "gather_grad_axis")
            }
            _ => {
                let s = ctx.e.ints(&collapsed);
                ctx.e.op("Reshape", &[dy, &s], vec![], "gather_grad_flat")
            }
        };
        if m > 0 && v.windows(2).all(|w| w[1] == w[0] + 1) {
            let mut pads = vec![0i64; 2 * rank];
            pads[axis] = v[0];
            pads[rank + axis] = size - v[0] - m;
            if pads.iter().all(|&p| p == 0) {
                out[0] = Some(g);
                return Ok(out);
            }
            let p = ctx.e.ints(&pads);
            let zero = ctx.e.scalar(0.0);
            out[0] = Some(ctx.e.op("Pad", &[&g, &p, &zero], vec![attr::make_string("mode", "constant")], "gather_grad"));
            return Ok(out);
        }
        let mut idims = vec![1i64; rank];
        idims[axis] = m;
        let ic = ctx.e.const_i64(&idims, &v);
        let shape = ctx.shape_of(&g);
        let ie = ctx.e.op("Expand", &[&ic, &shape], vec![], "gather_grad_indices");
        let zeros = ctx.zeros_like(data);
        out[0] = Some(scatter_add(ctx, &zeros, &ie, &g, axis, "gather_grad"));
        return Ok(out);
    }
    // Indices computed at run time.
    let s = ctx.e.ints(&collapsed);
    let g = ctx.e.op("Reshape", &[dy, &s], vec![], "gather_grad_flat");
    let size_t = if ctx.is_batch_axis(data, axis) {
        let shape = ctx.shape_of(data);
        let at = ctx.e.const_i64(&[], &[axis as i64]);
        ctx.e.op("Gather", &[&shape, &at], vec![], "gather_grad_size")
    } else {
        ctx.e.const_i64(&[], &[size])
    };
    let n = normalised_indices(ctx, idx, &size_t);
    let mut idims = vec![1i64; rank];
    idims[axis] = -1;
    let is = ctx.e.ints(&idims);
    let ir = ctx.e.op("Reshape", &[&n, &is], vec![], "gather_grad_indices_axis");
    let shape = ctx.shape_of(&g);
    let ie = ctx.e.op("Expand", &[&ir, &shape], vec![], "gather_grad_indices");
    let zeros = ctx.zeros_like(data);
    out[0] = Some(scatter_add(ctx, &zeros, &ie, &g, axis, "gather_grad"));
    Ok(out)
}

fn gather_elements(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], _needs: &[bool]) -> Grads {
    // y[.., i, ..] = data[.., indices[.., i, ..], ..] along `axis`: dx = ScatterElements "add" of dy at the
    // same indices into zeros.
    let dy = dy0(node, dy)?;
    let data = &node.input[0];
    let idx = indices_input(node)?;
    let xd = ctx.dims(data)?;
    let axis = indexed_axis(ctx, node, data, xd.len(), false)?;
    let size = ctx.e.const_i64(&[], &[xd[axis]]);
    let n = normalised_indices(ctx, idx, &size);
    let zeros = ctx.zeros_like(data);
    let mut out = vec![None; node.input.len()];
    out[0] = Some(scatter_add(ctx, &zeros, &n, dy, axis, "gather_elements_grad"));
    Ok(out)
}

fn top_k(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], _needs: &[bool]) -> Grads {
    // values = data gathered at the node's own `indices` output along `axis` (an end-to-end detector's
    // in-graph selection of its best boxes): dx = ScatterElements "add" of d(values) at those indices into
    // zeros. The indices are distinct and in range, so "add" only writes each kept element once; the ones not
    // kept get no gradient, as in PyTorch's topk.
    let dy = dy0(node, dy)?;
    let data = &node.input[0];
    let idx = match node.output.get(1) {
        Some(i) if !i.is_empty() => i.clone(),
        _ => return Err(OnnxError::node(node, "no indices output")),
    };
    let rank = ctx.dims(data)?.len();
    // TopK's axis defaults to -1 (the gathers' to 0).
    let axis = attr::int_or(node, "axis", -1);
    let a = norm_axis(axis, rank);
    if a < 0 || a as usize >= rank {
        return Err(OnnxError::node(node, format!("axis {axis} is out of range for rank {rank}")));
    }
    if ctx.is_batch_axis(data, a as usize) {
        return Err(OnnxError::node(node, format!("selecting along axis {axis}, the batch axis, is not supported")));
    }
    let zeros = ctx.zeros_like(data);
    let mut out = vec![None; node.input.len()];
    out[0] = Some(scatter_add(ctx, &zeros, &idx, dy, a as usize, "top_k_grad"));
    Ok(out)
}

fn gather_nd(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], _needs: &[bool]) -> Grads {
    // y[b, i..] = data[b, indices[b, i..]] (b: the first batch_dims axes, 0 or 1): dx = ScatterND "add" of dy
    // into zeros. ScatterND has no batch_dims, so with batch_dims = 1 each index row gets its batch position
    // (a Range over the run-time batch) prepended.
    let dy = dy0(node, dy)?;
    let data = &node.input[0];
    let idx = indices_input(node)?;
    let b = attr::int_or(node, "batch_dims", 0);
    if b != 0 && b != 1 {
        return Err(OnnxError::node(node, format!("GatherND with batch_dims {b} (0 and 1 are supported)")));
    }
    let b = b as usize;
    let xd = ctx.dims(data)?;
    let id = ctx.dims(idx)?;
    let (q, k) = match id.last() {
        Some(&k) if k >= 1 && b + (k as usize) <= xd.len() && id.len() > b => (id.len(), k as usize),
        _ => return Err(OnnxError::node(node, "malformed indices")),
    };
    // Negative indices: i + dim * (i < 0) with the indexed dims read at run time (axis 0 may be the batch).
    let n = match constant_indices(ctx, idx) {
        Some(v) if v.iter().all(|&i| i >= 0) => idx.to_string(),
        _ => {
            let shape = ctx.shape_of(data);
            let (st, en) = (ctx.e.ints(&[b as i64]), ctx.e.ints(&[(b + k) as i64]));
            let sizes = ctx.e.op("Slice", &[&shape, &st, &en], vec![], "gather_nd_sizes");
            normalised_indices(ctx, idx, &sizes)
        }
    };
    let full = if b == 0 {
        n
    } else {
        // [N, i.., 1] batch positions, then [N, i.., 1 + k] indices.
        let shape = ctx.shape_of(data);
        let (s0, e0) = (ctx.e.ints(&[0]), ctx.e.ints(&[1]));
        let nb = ctx.e.op("Slice", &[&shape, &s0, &e0], vec![], "gather_nd_batch");
        let sq = ctx.e.ints(&[0]);
        let nb = ctx.e.op("Squeeze", &[&nb, &sq], vec![], "gather_nd_batch_size");
        let (zero, one) = (ctx.e.const_i64(&[], &[0]), ctx.e.const_i64(&[], &[1]));
        let r = ctx.e.op("Range", &[&zero, &nb, &one], vec![], "gather_nd_batch_range");
        let mut rd = vec![1i64; q];
        rd[0] = -1;
        let rd = ctx.e.ints(&rd);
        let r = ctx.e.op("Reshape", &[&r, &rd], vec![], "gather_nd_batch_grid");
        let ishape = ctx.shape_of(&n);
        let (s1, e1) = (ctx.e.ints(&[0]), ctx.e.ints(&[q as i64 - 1]));
        let lead = ctx.e.op("Slice", &[&ishape, &s1, &e1], vec![], "gather_nd_lead");
        let one1 = ctx.e.ints(&[1]);
        let gshape = ctx.e.op("Concat", &[&lead, &one1], vec![attr::make_int("axis", 0)], "gather_nd_grid_shape");
        let grid = ctx.e.op("Expand", &[&r, &gshape], vec![], "gather_nd_grid");
        ctx.e.op("Concat", &[&grid, &n], vec![attr::make_int("axis", -1)], "gather_nd_full_indices")
    };
    let zeros = ctx.zeros_like(data);
    let attrs = vec![attr::make_string("reduction", "add")];
    let mut out = vec![None; node.input.len()];
    out[0] = Some(ctx.e.op("ScatterND", &[&zeros, &full, dy], attrs, "gather_nd_grad"));
    Ok(out)
}

fn reduction_none(node: &NodeProto) -> Result<()> {
    match attr::string(node, "reduction") {
        None => Ok(()),
        Some(r) if r == "none" => Ok(()),
        Some(r) => Err(OnnxError::node(node, format!("{} with reduction `{r}` (only `none` is supported)", node.op_type()))),
    }
}

fn scatter_elements(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], needs: &[bool]) -> Grads {
    // y = data with y[.., indices[.., i, ..], ..] = updates[.., i, ..] along `axis` (indices assumed unique, as
    // the op leaves duplicates undefined): ddata = dy with the written positions zeroed (a ScatterElements of
    // zeros), dupdates = GatherElements(dy, indices).
    reduction_none(node)?;
    let dy = dy0(node, dy)?;
    let idx = indices_input(node)?;
    let updates = input(node, 2).ok_or_else(|| OnnxError::node(node, "no updates input"))?;
    let rank = ctx.dims(&node.input[0])?.len();
    let axis = indexed_axis(ctx, node, &node.input[0], rank, false)? as i64;
    let mut out = vec![None; node.input.len()];
    if needs[0] {
        let zeros = ctx.zeros_like(updates);
        out[0] = Some(ctx.e.op("ScatterElements", &[dy, idx, &zeros], vec![attr::make_int("axis", axis)], "scatter_elements_ddata"));
    }
    if needs.get(2).copied().unwrap_or(false) {
        out[2] = Some(ctx.e.op("GatherElements", &[dy, idx], vec![attr::make_int("axis", axis)], "scatter_elements_dupdates"));
    }
    Ok(out)
}

fn scatter_nd(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], needs: &[bool]) -> Grads {
    // y = data with y[indices[i..]] = updates[i..] (indices assumed unique): ddata = dy with the written
    // positions zeroed (a ScatterND of zeros), dupdates = GatherND(dy, indices).
    reduction_none(node)?;
    let dy = dy0(node, dy)?;
    let idx = indices_input(node)?;
    let updates = input(node, 2).ok_or_else(|| OnnxError::node(node, "no updates input"))?;
    let mut out = vec![None; node.input.len()];
    if needs[0] {
        let zeros = ctx.zeros_like(updates);
        out[0] = Some(ctx.e.op("ScatterND", &[dy, idx, &zeros], vec![], "scatter_nd_ddata"));
    }
    if needs.get(2).copied().unwrap_or(false) {
        out[2] = Some(ctx.e.op("GatherND", &[dy, idx], vec![], "scatter_nd_dupdates"));
    }
    Ok(out)
}

fn where_(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], needs: &[bool]) -> Grads {
    // y = cond ? a : b (broadcast): da = dy * [cond], db = dy * [not cond], each summed back to its input's
    // shape. Multiplying by an exact 0.0 / 1.0 mask is exact for finite gradients (see RuleCtx::where_else_zero).
    let dy = dy0(node, dy)?;
    let cond = node.input[0].clone();
    let yd = ctx.dims(&node.output[0])?;
    let mut out = vec![None; node.input.len()];
    for i in 1..node.input.len().min(3) {
        if !needs[i] {
            continue;
        }
        let c = if i == 1 {
            cond.clone()
        } else {
            let key = format!("Not({cond})");
            match ctx.memo.get(&key) {
                Some(n) => n.clone(),
                None => {
                    let n = ctx.e.op("Not", &[&cond], vec![], "where_not");
                    ctx.memo.insert(key, n.clone());
                    n
                }
            }
        };
        let g = ctx.where_else_zero(&c, dy);
        let x = node.input[i].clone();
        let xd = ctx.dims(&x)?;
        out[i] = Some(ctx.unbroadcast(&g, &yd, &x, &xd));
    }
    Ok(out)
}

fn tile(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], _needs: &[bool]) -> Grads {
    // y = Tile(x, r): along each axis the output is r copies of x, laid out as [r, d]. dx sums the copies:
    // Reshape dy to [N, (r1,) d1, (r2,) d2, ..] (an r axis only where r > 1) and ReduceSum over the r axes.
    let dy = dy0(node, dy)?;
    let x = &node.input[0];
    let xd = ctx.dims(x)?;
    let reps_name = input(node, 1).ok_or_else(|| OnnxError::node(node, "no repeats input"))?;
    let reps = ctx.const_i64(reps_name).ok_or_else(|| OnnxError::node(node, "repeats are not constant"))?;
    if reps.len() != xd.len() || xd.is_empty() {
        return Err(OnnxError::node(node, "repeats do not match the input's rank"));
    }
    if reps.iter().any(|&r| r < 1) {
        return Err(OnnxError::node(node, "repeats below 1"));
    }
    if reps[0] != 1 {
        return Err(OnnxError::node(node, "Tile along axis 0, the batch axis, is not supported"));
    }
    let mut shape = vec![0i64];
    let mut axes = vec![];
    for i in 1..xd.len() {
        if reps[i] > 1 {
            axes.push(shape.len() as i64);
            shape.push(reps[i]);
        }
        shape.push(xd[i]);
    }
    let mut out = vec![None; node.input.len()];
    if axes.is_empty() {
        out[0] = Some(dy.to_string());
        return Ok(out);
    }
    let s = ctx.e.ints(&shape);
    let r = ctx.e.op("Reshape", &[dy, &s], vec![], "tile_grad_split");
    let a = ctx.e.ints(&axes);
    out[0] = Some(ctx.e.op("ReduceSum", &[&r, &a], vec![attr::make_int("keepdims", 0)], "tile_grad"));
    Ok(out)
}

fn compress(ctx: &mut RuleCtx, node: &NodeProto, dy: &[Option<String>], _needs: &[bool]) -> Grads {
    // y = x.compress(cond, axis): the slices of x along `axis` where cond holds, in order (tf2onnx's SYMMETRIC
    // MirrorPad drops the mirrored edge this way, with cond computed at run time from the shape). Slice i of x
    // is slice p(i) = cumsum(cond)[i] - 1 of y where cond[i] holds, else it gets no gradient: dX =
    // `RuleCtx::gather_behind_zero_slab` with the run-time indices (p(i) + 1) * cond[i].
    let dy = dy0(node, dy)?;
    let x = node.input[0].clone();
    let cond = input(node, 1).ok_or_else(|| OnnxError::node(node, "no condition input"))?.to_string();
    let xd = ctx.dims(&x)?;
    let rank = xd.len();
    if attr::int(node, "axis").is_none() {
        return Err(OnnxError::node(node, "Compress without an axis (on the flattened input) is not supported"));
    }
    let a = indexed_axis(ctx, node, &x, rank, false)?;
    let cd = ctx.dims(&cond)?;
    if cd.len() != 1 || cd[0] != xd[a] {
        return Err(OnnxError::node(node, "a condition shorter or longer than the compressed axis is not supported"));
    }
    let to_i64 = vec![attr::make_int("to", INT64 as i64)];
    let c = ctx.e.op("Cast", &[&cond], to_i64, "compress_cond_i64");
    let zero = ctx.e.const_i64(&[], &[0]);
    let pos = ctx.e.op("CumSum", &[&c, &zero], vec![], "compress_pos");
    // cumsum(cond)[i] is p(i) + 1 where cond holds; times cond, 0 (the zero slab) where it does not.
    let idx = ctx.e.op("Mul", &[&pos, &c], vec![], "compress_index");
    // The slab from X: dY is empty along the axis when cond holds nowhere.
    let mut out = vec![None; node.input.len()];
    out[0] = Some(ctx.gather_behind_zero_slab(dy, &x, a, &idx, "compress_grad"));
    Ok(out)
}
