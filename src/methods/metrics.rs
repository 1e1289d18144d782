//! Faithfulness metrics of a map, each a batch of forward passes through the batcher:
//!
//! - `deletion` and `insertion`: RISE's `CausalMetric` (Petsiuk et al. 2018, evaluation.py), transcribed. Pixels
//!   are ranked by the map at the model's input size, most salient first. Deletion starts from the image and
//!   replaces `step` pixels per step with a zero substrate (zero in model space); insertion starts from a blurred
//!   copy (RISE's `gkern(11, 5)` Gaussian) and puts the image's pixels back. `step` is 224 pixels per step at
//!   224x224, the published default, and keeps about 224 steps at other sizes. The value is the area under the
//!   target's softmax curve (trapezoid, normalised to [0, 1]): low is good for deletion, high for insertion. RISE
//!   follows the top-1 class; here the explanation's target. Ties in the map are ranked as numpy's stable argsort
//!   flipped (later pixels first), where RISE's quicksort leaves them unspecified.
//! - `confidence_change`: pytorch-grad-cam's `CamMultImageConfidenceChange`: the target's softmax score on
//!   image x normalised map, minus on the image.

use ndarray::{Array2, Array3, ArrayView2, Axis};

use super::Passes;
use crate::backend::engine::ModelInfo;
use crate::error::ServiceError;

/// A faithfulness metric: the registry of them is [`Metric::ALL`], the one source of their names (the request
/// options, `GET /v1/models`' `metric_costs`, the documents).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Metric {
    Deletion,
    Insertion,
    ConfidenceChange,
}

impl Metric {
    pub const ALL: [Metric; 3] = [Metric::Deletion, Metric::Insertion, Metric::ConfidenceChange];

    pub fn as_str(self) -> &'static str {
        match self {
            Metric::Deletion => "deletion",
            Metric::Insertion => "insertion",
            Metric::ConfidenceChange => "confidence_change",
        }
    }

    pub fn parse(name: &str) -> Option<Metric> {
        Metric::ALL.into_iter().find(|m| m.as_str() == name)
    }

    /// Whether it has a curve (`outputs=curves`).
    pub fn has_curve(self) -> bool {
        matches!(self, Metric::Deletion | Metric::Insertion)
    }

    /// Forward passes it costs on one map of `info`'s input size.
    pub fn cost(self, info: &ModelInfo) -> u64 {
        match self {
            Metric::Deletion | Metric::Insertion => steps(info.input_shape[1], info.input_shape[2]).1 as u64 + 1,
            Metric::ConfidenceChange => 1,
        }
    }
}

impl serde::Serialize for Metric {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// `(step, n_steps)`: pixels per step and steps for an `h x w` input (RISE: 224 at 224x224).
pub fn steps(h: usize, w: usize) -> (usize, usize) {
    let hw = h * w;
    let step = hw.div_ceil(224).max(1);
    (step, hw.div_ceil(step))
}

/// RISE's `gkern(11, 5)`: a delta at the centre of an 11x11 array through scipy's `gaussian_filter(sigma=5)`
/// (truncate 4, so radius 20 > 5: mode `reflect` folds the tails back in). Separable: the outer product of the 1-D
/// filter of a delta.
pub fn gkern(klen: usize, sigma: f64) -> Array2<f32> {
    let radius = (4.0 * sigma + 0.5) as i64;
    let g: Vec<f64> = (-radius..=radius).map(|t| (-0.5 * (t as f64 / sigma).powi(2)).exp()).collect();
    let gsum: f64 = g.iter().sum();
    let n = klen as i64;
    // scipy's `reflect` (d c b a | a b c d | d c b a): index -1 -> 0, n -> n - 1.
    let reflect = |mut i: i64| -> usize {
        let period = 2 * n;
        i = i.rem_euclid(period);
        (if i < n { i } else { period - 1 - i }) as usize
    };
    let mut delta = vec![0f64; klen];
    delta[klen / 2] = 1.0;
    let k1: Vec<f64> = (0..n)
        .map(|i| (-radius..=radius).map(|t| g[(t + radius) as usize] / gsum * delta[reflect(i + t)]).sum())
        .collect();
    Array2::from_shape_fn((klen, klen), |(y, x)| (k1[y] * k1[x]) as f32)
}

/// RISE's blur: each channel convolved with `kernel`, zero padding of half its size.
pub fn blur(image: &Array3<f32>, kernel: &Array2<f32>) -> Array3<f32> {
    let (c, h, w) = image.dim();
    let (kh, kw) = kernel.dim();
    let (ph, pw) = (kh / 2, kw / 2);
    let mut out = Array3::<f32>::zeros((c, h, w));
    for ch in 0..c {
        let src = image.index_axis(Axis(0), ch);
        for y in 0..h {
            for x in 0..w {
                let mut s = 0f64;
                for ky in 0..kh {
                    let sy = y + ky;
                    if sy < ph || sy - ph >= h {
                        continue;
                    }
                    for kx in 0..kw {
                        let sx = x + kx;
                        if sx < pw || sx - pw >= w {
                            continue;
                        }
                        s += kernel[[ky, kx]] as f64 * src[[sy - ph, sx - pw]] as f64;
                    }
                }
                out[[ch, y, x]] = s as f32;
            }
        }
    }
    out
}

/// Pixel indices (row-major) most salient first: numpy's `flip(argsort(map, kind="stable"))`.
pub fn salient_order(map: ArrayView2<f32>) -> Vec<usize> {
    let v: Vec<f32> = map.iter().copied().collect();
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    idx.reverse();
    idx
}

fn softmax_at(row: ndarray::ArrayView1<f32>, class: usize) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let z: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
    (row[class] as f64 - max).exp() / z
}

/// The area under a curve sampled at equal steps, normalised to [0, 1] (RISE's `auc`).
pub fn auc(curve: &[f64]) -> f64 {
    match curve {
        [] => 0.0,
        [only] => *only,
        [first, .., last] => (curve.iter().sum::<f64>() - first / 2.0 - last / 2.0) / (curve.len() - 1) as f64,
    }
}

/// The causal curve from `start` to `finish`, pixels in `order`, `step` per step: the target's softmax score on
/// each of the `n_steps + 1` states.
async fn causal_curve(
    passes: &Passes<'_>,
    start: &Array3<f32>,
    finish: &Array3<f32>,
    order: &[usize],
    class: usize,
    label: &str,
) -> Result<Vec<f64>, ServiceError> {
    let (c, h, w) = start.dim();
    let (step, n_steps) = steps(h, w);
    let logits = passes
        .logits(n_steps + 1, label, |i| {
            let mut state = start.clone();
            for &p in &order[..(step * i).min(order.len())] {
                let (y, x) = (p / w, p % w);
                for ch in 0..c {
                    state[[ch, y, x]] = finish[[ch, y, x]];
                }
            }
            state
        })
        .await?;
    Ok(logits.outer_iter().map(|r| softmax_at(r, class)).collect())
}

/// One metric's value, and its curve for deletion and insertion.
#[derive(Debug, Clone, PartialEq)]
pub struct Score {
    pub metric: Metric,
    pub value: f64,
    pub curve: Option<Vec<f64>>,
}

/// `metric` of `map` (`[H, W]`, the model's input size, normalised to [0, 1]) for target `class` at `input`,
/// whose softmax score of `class` is `score`.
pub async fn evaluate(passes: &Passes<'_>, metric: Metric, input: &Array3<f32>, map: &Array2<f32>, class: usize, score: f64) -> Result<Score, ServiceError> {
    let label = format!("metric:{}", metric.as_str());
    Ok(match metric {
        Metric::Deletion | Metric::Insertion => {
            let order = salient_order(map.view());
            let curve = if metric == Metric::Deletion {
                causal_curve(passes, input, &Array3::zeros(input.dim()), &order, class, &label).await?
            } else {
                causal_curve(passes, &blur(input, &gkern(11, 5.0)), input, &order, class, &label).await?
            };
            Score { metric, value: auc(&curve), curve: Some(curve) }
        }
        Metric::ConfidenceChange => {
            let masked = input * &map.view().insert_axis(Axis(0));
            let logits = passes.logits(1, &label, |_| masked.clone()).await?;
            Score { metric, value: softmax_at(logits.row(0), class) - score, curve: None }
        }
    })
}
