//! Reading and writing `ModelProto` files.
//!
//! Tensor payloads are `bytes::Bytes` slices of the file buffer (zero-copy decode). Weights stored in external
//! data files are read into the model at load time, so the in-memory model is self-contained: it can be handed
//! to ONNX Runtime from memory and saved anywhere.

use std::collections::HashMap;
use std::path::{Component, Path};

use bytes::Bytes;
use prost::Message;

use super::proto::tensor_proto::DataLocation;
use super::proto::{ModelProto, TensorProto};
use super::{OnnxError, Result};

/// Protobuf messages cannot exceed 2 GiB.
const PROTOBUF_LIMIT: usize = (1usize << 31) - 1;

/// Reads a model file, resolving external data relative to the file's folder.
pub fn load_model(path: &Path) -> Result<ModelProto> {
    let bytes = std::fs::read(path).map_err(|source| OnnxError::Io { path: path.to_path_buf(), source })?;
    decode_model(Bytes::from(bytes), path.parent())
}

/// Decodes a model from bytes. `base_dir` is where external data files are looked up; without it a model with
/// external data is an error.
pub fn decode_model(bytes: Bytes, base_dir: Option<&Path>) -> Result<ModelProto> {
    let mut model = ModelProto::decode(bytes)?;
    let graph = model.graph.as_mut().ok_or_else(|| OnnxError::Invalid("the model has no graph".into()))?;
    let mut files: HashMap<String, Bytes> = HashMap::new();
    for t in graph.initializer.iter_mut() {
        inline_external(t, base_dir, &mut files)?;
    }
    for node in graph.node.iter_mut() {
        for a in node.attribute.iter_mut() {
            if let Some(t) = a.t.as_mut() {
                inline_external(t, base_dir, &mut files)?;
            }
        }
    }
    drop_initializer_inputs(&mut model);
    declare_dynamic_dims(&mut model);
    check_declared_shapes(&model)?;
    Ok(model)
}

/// Paddle writes a dynamic dimension of a graph input or output as `-1`, and some exporters as `0`: both become
/// symbols (`dynamic_<k>`), which is what ONNX says a dynamic dimension is. Other negative values stay, and
/// `check_declared_shapes` refuses them.
pub fn declare_dynamic_dims(model: &mut ModelProto) {
    use super::proto::{tensor_shape_proto::dimension::Value, type_proto};
    let Some(g) = model.graph.as_mut() else { return };
    for vi in g.input.iter_mut().chain(g.output.iter_mut()) {
        let Some(type_proto::Value::TensorType(t)) = vi.r#type.as_mut().and_then(|t| t.value.as_mut()) else { continue };
        let Some(shape) = t.shape.as_mut() else { continue };
        for (k, d) in shape.dim.iter_mut().enumerate() {
            if matches!(d.value, Some(Value::DimValue(-1 | 0))) {
                d.value = Some(Value::DimParam(format!("dynamic_{k}")));
            }
        }
    }
}

/// Graph inputs and outputs may declare unknown (symbolic) dimensions, not negative ones other than Paddle's -1
/// (made symbolic by `declare_dynamic_dims` first), and initializers need
/// non-negative dimensions. ONNX Runtime's shape inference turns such values into shapes that the `ort` crate
/// panics on (found by tests/fuzz.rs), so they stop here.
pub fn check_declared_shapes(model: &ModelProto) -> Result<()> {
    use super::proto::{tensor_shape_proto::dimension::Value, type_proto};
    let Some(g) = model.graph.as_ref() else { return Ok(()) };
    if let Some(t) = g.initializer.iter().find(|t| t.dims.iter().any(|&d| d < 0)) {
        return Err(OnnxError::Invalid(format!("initializer `{}` has a negative dimension {:?}", t.name(), t.dims)));
    }
    for (kind, list) in [("input", &g.input), ("output", &g.output)] {
        for vi in list {
            let Some(type_proto::Value::TensorType(t)) = vi.r#type.as_ref().and_then(|t| t.value.as_ref()) else { continue };
            let negative = t.shape.as_ref().is_some_and(|s| s.dim.iter().any(|d| matches!(d.value, Some(Value::DimValue(v)) if v < 0)));
            if negative {
                return Err(OnnxError::Invalid(format!("{kind} `{}` declares a negative dimension", vi.name())));
            }
        }
    }
    Ok(())
}

/// IR-3 files list initializers among the graph inputs; ONNX Runtime then treats weights as overridable inputs
/// and skips constant folding. camserve never feeds them, so they are not inputs.
pub fn drop_initializer_inputs(model: &mut ModelProto) {
    if let Some(g) = model.graph.as_mut() {
        let inits: std::collections::HashSet<String> = g.initializer.iter().map(|t| t.name().to_string()).collect();
        g.input.retain(|i| !inits.contains(i.name()));
    }
}

fn inline_external(t: &mut TensorProto, base_dir: Option<&Path>, files: &mut HashMap<String, Bytes>) -> Result<()> {
    if t.data_location() != DataLocation::External {
        return Ok(());
    }
    let name = t.name().to_string();
    let err = |reason: String| OnnxError::ExternalData { tensor: name.clone(), reason };
    let mut location = None;
    let mut offset = 0usize;
    let mut length = None;
    for kv in &t.external_data {
        match kv.key() {
            "location" => location = Some(kv.value().to_string()),
            "offset" => offset = kv.value().parse().map_err(|_| err(format!("bad offset `{}`", kv.value())))?,
            "length" => length = Some(kv.value().parse::<usize>().map_err(|_| err(format!("bad length `{}`", kv.value())))?),
            _ => {}
        }
    }
    let location = location.ok_or_else(|| err("no `location` key".into()))?;
    let rel = Path::new(&location);
    // The file must stay inside the model's folder: no absolute paths, no `..`.
    if rel.components().any(|c| !matches!(c, Component::Normal(_) | Component::CurDir)) {
        return Err(err(format!("location `{location}` leaves the model's folder")));
    }
    let base = base_dir.ok_or_else(|| err("the model was loaded from memory, external data cannot be resolved".into()))?;
    let data = match files.get(&location) {
        Some(d) => d.clone(),
        None => {
            let path = base.join(rel);
            let d = Bytes::from(std::fs::read(&path).map_err(|e| err(format!("{}: {e}", path.display())))?);
            files.insert(location.clone(), d.clone());
            d
        }
    };
    let end = match length {
        Some(l) => offset.checked_add(l).ok_or_else(|| err("offset + length overflows".into()))?,
        None => data.len(),
    };
    if offset > end || end > data.len() {
        return Err(err(format!("range {offset}..{end} is outside `{location}` ({} bytes)", data.len())));
    }
    t.raw_data = Some(data.slice(offset..end));
    t.external_data.clear();
    t.data_location = Some(DataLocation::Default as i32);
    Ok(())
}

/// Serialises a model (all tensors inline).
pub fn encode_model(model: &ModelProto) -> Result<Vec<u8>> {
    let len = model.encoded_len();
    if len > PROTOBUF_LIMIT {
        return Err(OnnxError::Invalid(format!("the model is {len} bytes, over protobuf's 2 GiB limit")));
    }
    Ok(model.encode_to_vec())
}

pub fn save_model(model: &ModelProto, path: &Path) -> Result<()> {
    let bytes = encode_model(model)?;
    std::fs::write(path, bytes).map_err(|source| OnnxError::Io { path: path.to_path_buf(), source })
}
