//! camserve: explanations (Grad-CAM and its family, guided backprop, ...) for ONNX image classifiers.
//!
//! Data path: [`http`] -> [`batcher`] -> [`engine`] -> [`explain`] -> [`render`]. The graph rewrite that
//! makes gradients available from ONNX Runtime lives in [`onnx`] and has no server code in it.

pub mod onnx;
pub mod options;
pub mod preprocess;
pub mod render;
pub mod batcher;
pub mod config;
pub mod engine;
pub mod explain;
pub mod http;
pub mod methods;
pub mod registry;
pub mod server;
pub mod runtime;
pub mod service;
