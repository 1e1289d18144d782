//! Candidate layers: which tensors map to the image's spatial grid, and how.
//!
//! CAM methods read a layer as `[N, C, h, w]`. A CNN's feature maps are that already. A vision transformer's are
//! tokens `[N, prefix + h*w, C]` (ViT, DeiT: a class token, a distillation token, register tokens, then the patch
//! grid row by row), and Swin's or a channels-last ConvNeXt's are `[N, h, w, C]`. The explain graph maps such a
//! tensor, and its gradient, to `[N, C, h, w]` (Slice, Reshape, Transpose): what pytorch-grad-cam's users write
//! by hand as a `reshape_transform` (docs/DESIGN.md, "Transformer layers").

use std::collections::HashSet;

use super::builder::Emitter;
use super::graph::GraphIndex;
use super::probe::Probe;
use super::proto::GraphProto;
use super::rewrite::{LayerInfo, LayerLayout};

/// The most leading tokens that are not on the grid: class + distillation + up to 8 register tokens, with room.
const MAX_PREFIX: i64 = 16;

/// Whether `h x w` is the grid of an `in_h x in_w` image at some stride: `ceil(in / s)` on both axes.
fn is_grid(h: i64, w: i64, in_h: i64, in_w: i64) -> bool {
    h > 0 && w > 0 && (1..=in_h.max(in_w)).any(|s| (in_h + s - 1) / s == h && (in_w + s - 1) / s == w)
}

/// How a tensor of `dims` (batch 1) maps to the grid of an `in_h x in_w` image, and its grid dims `[1, C, h, w]`.
/// 4-D tensors are NCHW unless only the NHWC reading is a grid of the image; 3-D tensors are tokens when some
/// number of leading tokens leaves a grid. Anything else is not a layer.
pub fn grid_layout(dims: &[i64], in_h: i64, in_w: i64) -> Option<(LayerLayout, Vec<i64>)> {
    match *dims {
        [1, c, h, w] => {
            if !is_grid(h, w, in_h, in_w) && h * w > 1 && is_grid(c, h, in_h, in_w) {
                Some((LayerLayout::Nhwc, vec![1, w, c, h]))
            } else {
                Some((LayerLayout::Nchw, dims.to_vec()))
            }
        }
        [1, t, c] => (0..=MAX_PREFIX.min(t - 2)).find_map(|prefix| {
            let n = t - prefix;
            (1..=in_h.max(in_w)).find_map(|s| {
                let (h, w) = ((in_h + s - 1) / s, (in_w + s - 1) / s);
                (h * w == n && n > 1).then(|| (LayerLayout::Tokens { prefix: prefix as usize }, vec![1, c, h, w]))
            })
        }),
        _ => None,
    }
}

/// Emits the grid view `[N, C, h, w]` of `tensor` (the layer's activations or their gradient).
pub fn to_grid(e: &mut Emitter, layer: &LayerInfo, tensor: &str) -> String {
    use super::attr::make_ints;
    let (c, h, w) = (layer.dims[1], layer.dims[2], layer.dims[3]);
    match layer.layout {
        LayerLayout::Nchw => tensor.to_string(),
        LayerLayout::Nhwc => e.op("Transpose", &[tensor], vec![make_ints("perm", &[0, 3, 1, 2])], "nhwc_to_nchw"),
        LayerLayout::Tokens { prefix } => {
            let t = layer.native_dims[1];
            let mut grid = tensor.to_string();
            if prefix > 0 {
                let (st, en, ax) = (e.ints(&[prefix as i64]), e.ints(&[t]), e.ints(&[1]));
                grid = e.op("Slice", &[&grid, &st, &en, &ax], vec![], "grid_tokens");
            }
            let shape = e.ints(&[0, h, w, c]);
            let nhwc = e.op("Reshape", &[&grid, &shape], vec![], "tokens_to_nhwc");
            e.op("Transpose", &[&nhwc], vec![make_ints("perm", &[0, 3, 1, 2])], "tokens_to_nchw")
        }
    }
}

/// A layer by tensor name, else by module path: the last layer inside that module (its output).
pub fn find<'a>(layers: &'a [LayerInfo], name: &str) -> Option<&'a LayerInfo> {
    if let Some(l) = layers.iter().find(|l| l.name == name) {
        return Some(l);
    }
    let inside = |m: &str| m == name || m.strip_prefix(name).is_some_and(|rest| rest.starts_with('.'));
    layers.iter().rev().find(|l| l.module.as_deref().is_some_and(inside))
}

/// The PyTorch module path of every node, where the exporter recorded it: the dynamo exporter in the metadata
/// `pkg.torch.onnx.name_scopes` (a Python list of the nested module names), the TorchScript exporter in the node
/// name (`/layer4/layer4.1/conv2/Conv`, `/blocks/blocks.11/norm1/LayerNormalization`).
pub fn module_paths(graph: &GraphProto) -> Vec<Option<String>> {
    graph
        .node
        .iter()
        .map(|n| {
            let scoped = n.metadata_props.iter().find(|p| p.key() == "pkg.torch.onnx.name_scopes").map(|p| p.value());
            match scoped {
                Some(v) => from_name_scopes(v),
                None => from_node_name(n.name()),
            }
        })
        .collect()
}

/// `['', 'blocks.11', 'norm1']` or `['', 'blocks.11', 'blocks.11.norm1']` -> `blocks.11.norm1`.
fn from_name_scopes(v: &str) -> Option<String> {
    let parts: Vec<&str> = v
        .trim()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .split(',')
        .map(|p| p.trim().trim_matches(|c| c == '\'' || c == '"'))
        .filter(|p| !p.is_empty())
        .collect();
    join_scopes(&parts)
}

/// `/layer4/layer4.1/conv2/Conv` -> `layer4.1.conv2` (the last component is the op).
fn from_node_name(name: &str) -> Option<String> {
    let name = name.strip_prefix('/')?;
    let mut parts: Vec<&str> = name.split('/').collect();
    parts.pop();
    join_scopes(&parts)
}

/// Nested scope names, each relative to the one before, where a scope may repeat the tail of the path so far:
/// `layers`, `layers.1`, `blocks`, `blocks.1`, `norm1` -> `layers.1.blocks.1.norm1` (a container's items are
/// named from the container on).
fn join_scopes(parts: &[&str]) -> Option<String> {
    let mut path: Vec<String> = Vec::new();
    for p in parts {
        let segs: Vec<&str> = p.split('.').collect();
        // The longest tail of the path that `p` starts with (as whole segments) is replaced by `p`.
        let overlap = (1..=path.len().min(segs.len())).rev().find(|&k| path[path.len() - k..].iter().map(String::as_str).eq(segs[..k].iter().copied()));
        if let Some(k) = overlap {
            path.truncate(path.len() - k);
        }
        path.extend(segs.iter().map(|s| s.to_string()));
    }
    (!path.is_empty()).then(|| path.join("."))
}

/// The default layer.
/// - A transformer's (attention Softmax inside the network, token or NHWC layers): the output of the last
///   normalisation that feeds an attention block, which is the last block's first LayerNorm (`blocks[-1].norm1`
///   in ViT, `layers[-1].blocks[-1].norm1` in Swin), as pytorch-grad-cam's ViT and Swin tutorials choose it. The
///   layers after it reach the logits only through the class token or pooling, so their grid gradients are zero
///   or carry no attention.
/// - Otherwise the last layer with spatial size > 1 before global pooling (for class maps, [`classifier_input`]
///   comes first). A tensor counts only if the input
///   reaches it without passing a global pooling: squeeze-excitation gates (pooled, then multiplied back) keep
///   the main path, while ConvNeXt's LayerNorm2d after its pooling (which permutes [N,C,1,1] to [N,1,1,C]) does
///   not.
pub fn default_layer(
    graph: &GraphProto,
    index: &GraphIndex,
    probe: &Probe,
    path: &[usize],
    carry: &HashSet<String>,
    layers: &[LayerInfo],
    input: &str,
) -> Option<String> {
    let on_path: HashSet<usize> = path.iter().copied().collect();
    let attention: Vec<usize> = path
        .iter()
        .copied()
        .filter(|&i| graph.node[i].op_type() == "Softmax" && probe.dims(&graph.node[i].output[0]).is_some_and(|d| d.len() >= 3))
        .collect();
    let token_layers = layers.iter().any(|l| l.layout != LayerLayout::Nchw);
    if let (Some(&last_attention), true) = (attention.last(), token_layers) {
        let feeds_attention = |t: &str| {
            let mut seen: HashSet<usize> = HashSet::new();
            let mut stack: Vec<usize> = index.consumers_of(t).iter().copied().filter(|c| on_path.contains(c)).collect();
            while let Some(i) = stack.pop() {
                if i == last_attention || attention.contains(&i) {
                    return true;
                }
                if seen.insert(i) {
                    for o in &graph.node[i].output {
                        stack.extend(index.consumers_of(o).iter().copied().filter(|c| on_path.contains(c)));
                    }
                }
            }
            false
        };
        let norm = |l: &&LayerInfo| {
            l.layout != LayerLayout::Nchw
                && index.producer.get(&l.name).is_some_and(|&p| {
                    matches!(graph.node[p].op_type(), "LayerNormalization" | "RMSNormalization" | "SimplifiedLayerNormalization")
                })
        };
        if let Some(l) = layers.iter().rev().filter(norm).find(|l| feeds_attention(&l.name)) {
            return Some(l.name.clone());
        }
        // Decomposed LayerNorms: the last grid layer that still feeds an attention block.
        if let Some(l) = layers.iter().rev().filter(|l| l.layout != LayerLayout::Nchw).find(|l| feeds_attention(&l.name)) {
            return Some(l.name.clone());
        }
    }
    let spatial = |t: &str| probe.dims(t).filter(|d| d.len() == 4).map(|d| d[2] * d[3]);
    let pooled: HashSet<&str> = path
        .iter()
        .map(|&i| &graph.node[i])
        .filter(|n| n.output.first().and_then(|o| spatial(o)) == Some(1) && spatial(&n.input[0]).is_some_and(|s| s > 1))
        .map(|n| n.output[0].as_str())
        .collect();
    let mut unpooled: HashSet<&str> = HashSet::from([input]);
    let mut stack = vec![input];
    while let Some(t) = stack.pop() {
        for &c in index.consumers_of(t) {
            for o in graph.node[c].output.iter().map(String::as_str) {
                if carry.contains(o) && !pooled.contains(o) && unpooled.insert(o) {
                    stack.push(o);
                }
            }
        }
    }
    layers
        .iter()
        .rev()
        .find(|l| l.dims[2] * l.dims[3] > 1 && unpooled.contains(l.name.as_str()))
        .map(|l| l.name.clone())
}

/// A segmenter's default layer: when the logits are class maps `[N, classes, h, w]` (a grid larger than 1 x 1), the
/// feature map that enters its classifier, the decoder's last. Walking back from the logits through the ops that
/// only resample or combine class maps (Resize, Upsample, Add, Sum, Identity, Cast), the classifier is the last
/// Conv reached in the graph's order (LRASPP adds a low-level branch's 1x1 conv to its main one; the main one comes
/// last); the layer is that Conv's input. `None` when the logits are not class maps or no Conv is reached.
pub fn classifier_input(graph: &GraphProto, index: &GraphIndex, probe: &Probe, logits: &str, layers: &[LayerInfo]) -> Option<String> {
    let dims = probe.dims(logits)?;
    if dims.len() != 4 || dims[1] < 2 || dims[2] * dims[3] <= 1 {
        return None;
    }
    let mut stack = vec![logits.to_string()];
    let mut seen = HashSet::new();
    let mut convs = Vec::new();
    while let Some(t) = stack.pop() {
        let Some(&p) = index.producer.get(&t) else { continue };
        if !seen.insert(p) {
            continue;
        }
        let node = &graph.node[p];
        match node.op_type() {
            "Conv" => convs.push(p),
            // A resize's data is its first input; its scales and sizes are not class maps.
            "Resize" | "Upsample" | "Identity" | "Cast" => stack.extend(node.input.first().cloned()),
            "Add" | "Sum" => stack.extend(node.input.iter().filter(|i| probe.dims(i).is_some_and(|d| d.len() == 4)).cloned()),
            _ => {}
        }
    }
    let conv = &graph.node[*convs.iter().max()?];
    let input = conv.input.first()?;
    layers.iter().any(|l| &l.name == input).then(|| input.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grids_of_transformers_and_cnns() {
        // ViT-B/16 at 224: class token + 14x14.
        assert_eq!(grid_layout(&[1, 197, 768], 224, 224), Some((LayerLayout::Tokens { prefix: 1 }, vec![1, 768, 14, 14])));
        // DeiT distilled: two prefix tokens.
        assert_eq!(grid_layout(&[1, 198, 192], 224, 224), Some((LayerLayout::Tokens { prefix: 2 }, vec![1, 192, 14, 14])));
        // No class token (Swin-style tokens), non-square image 32x48 with stride 8.
        assert_eq!(grid_layout(&[1, 24, 16], 32, 48), Some((LayerLayout::Tokens { prefix: 0 }, vec![1, 16, 4, 6])));
        // Swin [N, H, W, C] and a CNN's [N, C, H, W].
        assert_eq!(grid_layout(&[1, 7, 7, 768], 224, 224), Some((LayerLayout::Nhwc, vec![1, 768, 7, 7])));
        assert_eq!(grid_layout(&[1, 2048, 7, 7], 224, 224), Some((LayerLayout::Nchw, vec![1, 2048, 7, 7])));
        // Inception's valid convs (149 != ceil(299/2)) stay NCHW.
        assert_eq!(grid_layout(&[1, 32, 149, 149], 299, 299), Some((LayerLayout::Nchw, vec![1, 32, 149, 149])));
        // Pooled features and the logits are not token layers.
        assert_eq!(grid_layout(&[1, 768], 224, 224), None);
        assert_eq!(grid_layout(&[1, 1, 768], 224, 224), None);
    }

    #[test]
    fn module_paths_from_both_exporters() {
        assert_eq!(from_node_name("/layer4/layer4.1/conv2/Conv").as_deref(), Some("layer4.1.conv2"));
        assert_eq!(from_node_name("/blocks/blocks.11/norm1/LayerNormalization").as_deref(), Some("blocks.11.norm1"));
        assert_eq!(
            from_node_name("/layers/layers.1/blocks/blocks.1/norm1/LayerNormalization").as_deref(),
            Some("layers.1.blocks.1.norm1")
        );
        assert_eq!(from_node_name("/features/features.5/features.5.0/block/Conv").as_deref(), Some("features.5.0.block"));
        assert_eq!(from_node_name("/Gemm"), None);
        assert_eq!(from_node_name("node_Conv_0"), None);
        assert_eq!(from_name_scopes("['', 'blocks.11', 'blocks.11.norm1']").as_deref(), Some("blocks.11.norm1"));
        assert_eq!(from_name_scopes("['', 'layer4', '1', 'conv2']").as_deref(), Some("layer4.1.conv2"));
        let layers = vec![
            LayerInfo { module: Some("layer4.0.relu".into()), ..LayerInfo::nchw("a", vec![1, 8, 2, 2]) },
            LayerInfo { module: Some("layer4.1.relu".into()), ..LayerInfo::nchw("b", vec![1, 8, 2, 2]) },
            LayerInfo { module: Some("layer40.relu".into()), ..LayerInfo::nchw("c", vec![1, 8, 2, 2]) },
        ];
        assert_eq!(find(&layers, "layer4").map(|l| l.name.as_str()), Some("b"));
        assert_eq!(find(&layers, "layer4.0").map(|l| l.name.as_str()), Some("a"));
        assert_eq!(find(&layers, "c").map(|l| l.name.as_str()), Some("c"));
        assert_eq!(find(&layers, "layer5"), None);
    }
}
