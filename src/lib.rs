//! camserve: explanations (Grad-CAM and its family, guided backprop, ...) for ONNX image classifiers.
//!
//! Data path: [`api`] (routes, request forms, problem+json, one encoder per protocol) -> [`core`] (the model
//! registry, the request pipeline, options, tasks, and the typed answer every protocol encodes) -> [`backend`]
//! (per-model queue and batching worker, ONNX Runtime sessions) -> [`methods`] (each method's entry and its extra passes) -> [`maths`] (the maths on arrays) -> [`render`]
//! (pictures). [`server`] is the listener, signals and drain around the router. The graph rewrite that makes
//! gradients available from ONNX Runtime lives in [`onnx`] and has no server code in it. docs/DESIGN.md has the
//! table of what each owns.

pub mod api;
pub mod backend;
pub mod config;
pub mod detection;
pub mod error;
pub mod core;
pub mod maths;
pub mod letterbox;
pub mod methods;
pub mod onnx;
pub mod preprocess;
pub mod render;
pub mod server;
