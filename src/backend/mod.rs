//! The backend: per model, a queue and a dynamic-batching worker ([`batcher`]) in front of the ONNX Runtime
//! sessions of the model's plans ([`engine`]), ONNX Runtime's library ([`runtime`]), and the shape probe's runner
//! ([`probe`]). The worker runs any
//! [`batcher::Runner`]: the engine's `ModelRunner`, or a stand-in in the API's tests.

pub mod batcher;
pub mod engine;
pub mod probe;
pub mod runtime;
