use std::path::PathBuf;

/// Everything that can go wrong while reading, analysing or rewriting an ONNX model.
#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("not a valid ONNX model: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("external data of tensor `{tensor}`: {reason}")]
    ExternalData { tensor: String, reason: String },
    #[error("invalid model: {0}")]
    Invalid(String),
    #[error("node `{node}` ({op}): {reason}")]
    Node { node: String, op: String, reason: String },
    #[error("no gradient rule for op `{op}` (node `{node}`) on the gradient path")]
    Unsupported { node: String, op: String },
    #[error("layer `{0}` is not a 4-D float tensor on the path from the input to the logits")]
    BadLayer(String),
    #[error("cannot upgrade the model to opset {target}: {reason}")]
    Upgrade { target: i64, reason: String },
    #[error("shape probe with ONNX Runtime failed: {0}")]
    Probe(String),
}

pub type Result<T, E = OnnxError> = std::result::Result<T, E>;

impl OnnxError {
    pub(crate) fn node(node: &crate::onnx::NodeProto, reason: impl Into<String>) -> Self {
        OnnxError::Node { node: crate::onnx::graph::node_label(node), op: node.op_type().to_string(), reason: reason.into() }
    }
}
