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

/// Softmax of one row of logits, summed in float64; the scores every answer reports. The request pipeline computes
/// it once per row of its explain pass; Score-CAM uses it for its channel weights.
pub fn softmax(logits: ndarray::ArrayView1<f32>) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f64> = logits.iter().map(|&v| ((v - max) as f64).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.iter().map(|&e| (e / sum) as f32).collect()
}
