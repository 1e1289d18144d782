//! RISE (Petsiuk, Das & Saenko, "RISE: Randomized Input Sampling for Explanation of Black-box Models", BMVC 2018),
//! as the authors' code computes it (github.com/eclique/RISE, `explanations.py`):
//!
//! - masks: an `s` x `s` grid of cells (`rise_grid`, default 8), each 1 with probability `p` (`rise_p`, default
//!   0.5), upsampled bilinearly to `(s + 1) * ceil(H / s)` rows by `(s + 1) * ceil(W / s)` columns, then cropped to
//!   H x W at a random offset, rows `0..ceil(H / s)` and columns `0..ceil(W / s)`. The upsampling is scikit-image's
//!   `resize(order=1, mode='reflect', anti_aliasing=False)`: output pixel r reads the grid at
//!   `(r + 0.5) * s / up - 0.5`, linearly between its two neighbours, mirrored about the first and last cell's centre
//!   (SciPy's `mirror`) beyond them;
//! - each masked input, `input * mask` (in the model's normalised input, as the authors multiply the tensor), runs
//!   through the model;
//! - the map is `sum_i P_i(c) M_i / (N p)` at the input's size, where `P_i(c)` is the target class's probability on
//!   masked input i: the softmax of the logits for a classifier (the authors' model ends in one), the sigmoid score
//!   for a multi-label classifier.
//!
//! The cells and offsets come from ChaCha8 seeded per request, one stream per mask, so a mask is a function of
//! (seed, index), as D-RISE's. `rise_masks` masks (default 4,000) cost that many forwards: run it as a job.

use ndarray::{Array2, Array3, Axis, Zip};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::params::{Param, ParamKind};
use super::{Compute, Kind, MethodDef, PassesCtx, Pending, RawMap, Returned};
use crate::backend::batcher::Target;
use crate::backend::engine::PlanKey;
use crate::error::ServiceError;

/// A mask's cell size along an axis of `n` pixels: `ceil(n / s)`.
pub fn cell_size(n: usize, s: usize) -> usize {
    n.div_ceil(s)
}

/// One axis of the upsampling: per cropped output pixel, (lower cell, upper cell, weight of the upper one). Output
/// pixel `r + shift` of the `(s + 1) * cell`-pixel upsampled grid, half-pixel centres, mirrored about the first and
/// last cell centres.
fn axis(s: usize, n: usize, shift: usize) -> Vec<(usize, usize, f64)> {
    let up = ((s + 1) * cell_size(n, s)) as f64;
    let mirror = |i: i64| -> usize {
        if s == 1 {
            return 0;
        }
        let period = 2 * (s as i64 - 1);
        let m = i.rem_euclid(period);
        (if m < s as i64 { m } else { period - m }) as usize
    };
    (0..n)
        .map(|r| {
            let u = ((r + shift) as f64 + 0.5) * s as f64 / up - 0.5;
            let f = u.floor();
            let i0 = f as i64;
            (mirror(i0), mirror(i0 + 1), u - f)
        })
        .collect()
}

/// A mask `[H, W]` from its cells (`s` x `s`, row-major, 0 or 1) and its crop offsets (rows, columns).
pub fn mask_from(cells: &[u8], s: usize, (dy, dx): (usize, usize), h: usize, w: usize) -> Array2<f32> {
    let (ys, xs) = (axis(s, h, dy), axis(s, w, dx));
    let cell = |i: usize, j: usize| cells[i * s + j] as f64;
    Array2::from_shape_fn((h, w), |(y, x)| {
        let (y0, y1, wy) = ys[y];
        let (x0, x1, wx) = xs[x];
        let top = cell(y0, x0) * (1.0 - wx) + cell(y0, x1) * wx;
        let bottom = cell(y1, x0) * (1.0 - wx) + cell(y1, x1) * wx;
        (top * (1.0 - wy) + bottom * wy) as f32
    })
}

/// Mask `index` of the masks seeded with `seed`: its cells (each 1 with probability `p`) and offsets from ChaCha8
/// stream `index`.
pub fn mask(seed: u64, index: usize, s: usize, p: f64, h: usize, w: usize) -> Array2<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(index as u64);
    let cells: Vec<u8> = (0..s * s).map(|_| rng.random_bool(p) as u8).collect();
    let shift = (rng.random_range(0..cell_size(h, s)), rng.random_range(0..cell_size(w, s)));
    mask_from(&cells, s, shift, h, w)
}

/// The fusion `sum_i P_i M_i / (N p)`, accumulated in float64 one mask at a time.
pub struct Fusion {
    sum: Array2<f64>,
    n: usize,
}

impl Fusion {
    pub fn new(h: usize, w: usize) -> Fusion {
        Fusion { sum: Array2::zeros((h, w)), n: 0 }
    }

    pub fn add(&mut self, mask: &Array2<f32>, probability: f32) {
        Zip::from(&mut self.sum).and(mask).for_each(|s, &m| *s += probability as f64 * m as f64);
        self.n += 1;
    }

    /// The map `[H, W]`.
    pub fn finish(self, p: f64) -> Array2<f32> {
        let scale = if self.n > 0 { 1.0 / (self.n as f64 * p) } else { 0.0 };
        self.sum.mapv(|v| (v * scale) as f32)
    }
}

/// Its masks.
pub const MASKS: Param = Param { name: "rise_masks", kind: ParamKind::Count { default: 4000, max: 16000 }, help: "RISE's random masks" };
/// Its mask grid: cells per side.
pub const GRID: Param = Param { name: "rise_grid", kind: ParamKind::Count { default: 8, max: 64 }, help: "RISE's mask cells per side" };
/// The probability of a cell being on.
pub const P: Param = Param { name: "rise_p", kind: ParamKind::Number { default: 0.5, min: 0.01, max: 1.0 }, help: "RISE's probability that a mask cell is on" };

/// The registry's entry: one forward pass per mask. Classifiers only (`core::task` refuses it elsewhere).
pub const DEF: MethodDef = MethodDef {
    uses_layer: false,
    cost: |_, _, params| params.count(&MASKS) as u64,
    params: &[&MASKS, &GRID, &P, &super::smoothgrad::SEED],
    ..MethodDef::new("rise", Kind::Cam, Compute::Passes(start))
};

/// Runs with the request's seed, or a fresh one, which the explanation returns.
fn start<'a>(cx: &'a PassesCtx<'a>) -> Pending<'a> {
    Box::pin(async move {
        let seed = cx.params.integer(&super::smoothgrad::SEED).unwrap_or_else(rand::random);
        let map = run(cx, seed).await?;
        Ok(super::Computed { map: RawMap::Cam(map), returned: Returned { seed: Some(seed), ..Default::default() } })
    })
}

async fn run(cx: &PassesCtx<'_>, seed: u64) -> Result<Array2<f32>, ServiceError> {
    let input: &Array3<f32> = cx.input;
    let (h, w) = (input.shape()[1], input.shape()[2]);
    let (n, s, p) = (cx.params.count(&MASKS), cx.params.count(&GRID).min(h.min(w)).max(1), cx.params.number(&P) as f64);
    let class = cx.class;
    let probabilities = cx.probabilities;
    let mut fusion = Fusion::new(h, w);
    cx.passes
        .run_each(
            &PlanKey::Predict,
            n,
            cx.label,
            |i| (input * &mask(seed, i, s, p, h, w).insert_axis(Axis(0)), Target::Rank(0)),
            |start, out| {
                for (k, row) in out.logits.outer_iter().enumerate() {
                    let score = probabilities.of(row, class);
                    fusion.add(&mask(seed, start + k, s, p, h, w), score);
                }
                Ok(())
            },
        )
        .await?;
    Ok(fusion.finish(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_interpolate_the_cells_and_mirror_at_the_edges() {
        // One axis, 2 cells, 4 pixels: cell 2 px, upsampled to 6 px, shift 0: u = (r + 0.5) / 3 - 0.5.
        let a = axis(2, 4, 0);
        let u = |r: f64| (r + 0.5) / 3.0 - 0.5;
        // r = 0: u = -1/3, mirrored: 2/3 of cell 0 and 1/3 of cell 1 (about cell 0's centre).
        let (i0, i1, t) = a[0];
        let v = |c: [f64; 2]| c[i0] * (1.0 - t) + c[i1] * t;
        assert!((v([0.0, 1.0]) - 1.0 / 3.0).abs() < 1e-12, "{:?}", a[0]);
        // r = 2: u = 1/3: between cells 0 and 1.
        let (i0, i1, t) = a[2];
        assert_eq!((i0, i1), (0, 1));
        assert!((t - u(2.0)).abs() < 1e-12);
        // A constant grid gives a constant mask; a mask lies in [0, 1] and is reproducible.
        assert!(mask_from(&[1; 9], 3, (1, 2), 10, 7).iter().all(|&v| (v - 1.0).abs() < 1e-6));
        let m = mask(5, 2, 8, 0.5, 32, 40);
        assert_eq!(m, mask(5, 2, 8, 0.5, 32, 40));
        assert_ne!(m, mask(5, 3, 8, 0.5, 32, 40));
        assert!(m.iter().all(|&v| (0.0..=1.0).contains(&v)));
    }

    #[test]
    fn fusion_weights_masks_by_their_probability() {
        let mut f = Fusion::new(1, 2);
        f.add(&Array2::from_shape_vec((1, 2), vec![1.0, 0.0]).unwrap(), 0.8);
        f.add(&Array2::from_shape_vec((1, 2), vec![1.0, 1.0]).unwrap(), 0.2);
        // (0.8 + 0.2, 0.2) / (2 * 0.5)
        let m = f.finish(0.5);
        assert!((m[[0, 0]] - 1.0).abs() < 1e-6 && (m[[0, 1]] - 0.2).abs() < 1e-6, "{m:?}");
    }
}
