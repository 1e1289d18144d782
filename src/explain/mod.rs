//! The explanation methods' mathematics as pure functions of arrays (no ORT, no HTTP); the methods themselves
//! (what each reads, costs and computes) are the registry in `crate::methods`.
//!
//! CAM methods read the target layer's activations `A [K, h, w]` and gradients `g = dy/dA`; the gradient
//! methods read an input gradient `[C, H, W]`; the attention rollouts read a transformer's attention
//! probabilities (and their gradients) of every block. Formulas follow docs/DESIGN.md §5, docs/METHODS.md and
//! pytorch-grad-cam.

pub mod cam;
pub mod maps;
pub mod rollout;
