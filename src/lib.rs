//! camserve: explanations (Grad-CAM and its family, guided backprop, ...) for ONNX image classifiers.
//!
//! Data path: [`http`] -> [`batcher`] -> [`engine`] -> [`explain`] -> [`render`]. The graph rewrite that
//! makes gradients available from ONNX Runtime lives in [`onnx`] and has no server code in it.

pub mod onnx;
pub mod render;
pub mod engine;
pub mod explain;
pub mod runtime;
