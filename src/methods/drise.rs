//! D-RISE (Petsiuk et al., "Black-box Explanation of Object Detectors via Saliency Maps", CVPR 2021), a detector's
//! gradient-free method, as Microsoft's vision-explanation-methods 0.1.1 (`explanations/drise.py`) implements it:
//!
//! - masks: a `grid` x `grid` array of cells, each 1 with probability 1/2, upsampled nearest-neighbour to
//!   (H + pad) x (W + pad) with pad = max(H, W) / grid (integer division), then cropped at a random offset in
//!   0..=pad: `mask[y][x] = cells[(y + i) * grid / (H + pad)][(x + j) * grid / (W + pad)]`. Binary masks, as
//!   that implementation (the paper upsamples bilinearly);
//! - each masked input (`input * mask`: masked pixels are 0 in the model's input, black for a YOLO's pixel / 255)
//!   is run through the detector, and its detections are found with the request's thresholds;
//! - the weight of a mask for the target detection is the best similarity over the masked image's detections:
//!   IoU of the boxes x cosine of the class vectors (objectness 1: YOLO has none), 0 without detections;
//! - the map is `sum_i (w_i - mean w) M_i` (the reference's fusion, before its min-max normalisation).
//!
//! The cells and offsets come from ChaCha8 seeded per request, one stream per mask, so a mask is a function of
//! (seed, index): the masked inputs and the fusion regenerate it instead of holding the masks, and only two chunks of
//! masked outputs are alive at a time (`Passes::run_each`).

use ndarray::{Array2, Array3, Axis, Zip};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::params::{Param, ParamKind};
use super::{Compute, Kind, MethodDef, PassesCtx, Pending, RawMap, Returned};
use crate::backend::engine::PlanKey;
use crate::backend::batcher::Target;
use crate::error::ServiceError;

/// A detection as D-RISE compares them: its box `x0, y0, x1, y1` in input pixels and its class vector (the scores of
/// every class at its output row).
#[derive(Debug, Clone, PartialEq)]
pub struct Proposal {
    pub xyxy: [f32; 4],
    pub classes: Vec<f32>,
}

/// What D-RISE needs of a detector, which `core` knows: the detections of one output row (a masked image's) and the
/// detection each explain row explains.
pub trait Proposals: Sync {
    /// The detections in one image's output (the first output, flattened), with the request's thresholds.
    fn proposals(&self, out: &[f32]) -> Vec<Proposal>;
    /// The detection explain row `row` explains.
    fn target(&self, row: usize) -> Option<&Proposal>;
}

/// The reference's padding: `int(max(H / grid, W / grid))`.
pub fn padding(grid: usize, h: usize, w: usize) -> usize {
    (h / grid).max(w / grid)
}

/// A mask `[H, W]` from its cells (`grid` x `grid`, row-major, 0 or 1) and its crop offsets `(i, j)` (rows, columns).
pub fn mask_from(cells: &[u8], grid: usize, (i, j): (usize, usize), h: usize, w: usize) -> Array2<f32> {
    let pad = padding(grid, h, w);
    let (hp, wp) = (h + pad, w + pad);
    let rows: Vec<usize> = (0..h).map(|y| (y + i) * grid / hp).collect();
    let cols: Vec<usize> = (0..w).map(|x| (x + j) * grid / wp).collect();
    Array2::from_shape_fn((h, w), |(y, x)| cells[rows[y] * grid + cols[x]] as f32)
}

/// Mask `index` of the masks seeded with `seed`: its cells and offsets from ChaCha8 stream `index`.
pub fn mask(seed: u64, index: usize, grid: usize, h: usize, w: usize) -> Array2<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(index as u64);
    let cells: Vec<u8> = (0..grid * grid).map(|_| rng.random_bool(0.5) as u8).collect();
    let pad = padding(grid, h, w);
    let crop = (rng.random_range(0..=pad), rng.random_range(0..=pad));
    mask_from(&cells, grid, crop, h, w)
}

/// Intersection over union of two `x0, y0, x1, y1` boxes, no +1 in the areas, as `compute_affinity_matrix`.
fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let inter = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0) * (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter;
    if union > 0.0 { inter / union } else { 0.0 }
}

/// The similarity of two detections: IoU x cosine of the class vectors.
pub fn similarity(a: &Proposal, b: &Proposal) -> f32 {
    let dot: f32 = a.classes.iter().zip(&b.classes).map(|(x, y)| x * y).sum();
    let na = a.classes.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb = b.classes.iter().map(|x| x * x).sum::<f32>().sqrt();
    let cos = if na > 0.0 && nb > 0.0 { dot / (na * nb) } else { 0.0 };
    iou(&a.xyxy, &b.xyxy) * cos
}

/// A mask's weight for `target`: the best similarity over the masked image's detections, 0 without any.
pub fn weight(target: &Proposal, found: &[Proposal]) -> f32 {
    found.iter().map(|p| similarity(target, p)).fold(0.0, f32::max)
}

/// The fusion `sum_i (w_i - mean w) M_i`, accumulated in float64 one mask at a time.
pub struct Fusion {
    weighted: Array2<f64>,
    coverage: Array2<f64>,
    weights: f64,
    n: usize,
}

impl Fusion {
    pub fn new(h: usize, w: usize) -> Fusion {
        Fusion { weighted: Array2::zeros((h, w)), coverage: Array2::zeros((h, w)), weights: 0.0, n: 0 }
    }

    pub fn add(&mut self, mask: &Array2<f32>, w: f32) {
        Zip::from(&mut self.weighted).and(&mut self.coverage).and(mask).for_each(|s, c, &m| {
            *s += w as f64 * m as f64;
            *c += m as f64;
        });
        self.weights += w as f64;
        self.n += 1;
    }

    /// The map `[H, W]`.
    pub fn finish(self) -> Array2<f32> {
        let mean = if self.n > 0 { self.weights / self.n as f64 } else { 0.0 };
        Zip::from(&self.weighted).and(&self.coverage).map_collect(|&s, &c| (s - mean * c) as f32)
    }
}

/// Its masks.
pub const MASKS: Param = Param { name: "masks", kind: ParamKind::Count { default: 1000, max: 4000 }, help: "D-RISE's random masks" };
/// Its mask grid: cells per side.
pub const GRID: Param = Param { name: "mask_grid", kind: ParamKind::Count { default: 16, max: 64 }, help: "D-RISE's mask cells per side" };

/// The registry's entry: one forward pass per mask. Detectors only (`core::task` refuses it for a classifier).
pub const DEF: MethodDef = MethodDef {
    uses_layer: false,
    cost: |_, _, params| params.count(&MASKS) as u64,
    params: &[&MASKS, &GRID, &super::smoothgrad::SEED],
    ..MethodDef::new("drise", Kind::Cam, Compute::Passes(start))
};

/// Runs with the request's seed, or a fresh one, which the explanation returns.
fn start<'a>(cx: &'a PassesCtx<'a>) -> Pending<'a> {
    Box::pin(async move {
        let seed = cx.params.integer(&super::smoothgrad::SEED).unwrap_or_else(rand::random);
        let Some(proposals) = cx.proposals else {
            return Err(ServiceError::Unprocessable("method `drise` explains a detection: it needs a detector".into()));
        };
        let target = proposals.target(cx.row).ok_or_else(|| ServiceError::Internal("D-RISE has no target for this row. This is a bug.".into()))?;
        let map = run(cx, proposals, target, seed).await?;
        Ok(super::Computed { map: RawMap::Cam(map), returned: Returned { seed: Some(seed), ..Default::default() } })
    })
}

async fn run(cx: &PassesCtx<'_>, proposals: &dyn Proposals, target: &Proposal, seed: u64) -> Result<Array2<f32>, ServiceError> {
    let input: &Array3<f32> = cx.input;
    let (h, w) = (input.shape()[1], input.shape()[2]);
    let (n, grid) = (cx.params.count(&MASKS), cx.params.count(&GRID).min(h.min(w)).max(1));
    let mut fusion = Fusion::new(h, w);
    cx.passes
        .run_each(
            &PlanKey::Predict,
            n,
            cx.label,
            |i| (input * &mask(seed, i, grid, h, w).insert_axis(Axis(0)), Target::Rank(0)),
            |start, out| {
                for (k, row) in out.logits.outer_iter().enumerate() {
                    let found = match row.as_slice() {
                        Some(v) => proposals.proposals(v),
                        None => proposals.proposals(&row.to_vec()),
                    };
                    fusion.add(&mask(seed, start + k, grid, h, w), weight(target, &found));
                }
                Ok(())
            },
        )
        .await?;
    Ok(fusion.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_are_binary_cells_of_the_grid_and_reproducible() {
        let m = mask(7, 3, 4, 40, 40);
        assert_eq!(m, mask(7, 3, 4, 40, 40));
        assert_ne!(m, mask(7, 4, 4, 40, 40));
        assert!(m.iter().all(|&v| v == 0.0 || v == 1.0));
        // Cells of (40 + 10) / 4 = 12.5 pixels: from any crop, rows 0..=9 lie in at most two cells.
        let cells = [1, 0, 1, 0, 0, 1, 0, 1, 1, 1, 0, 0, 0, 0, 1, 1];
        let m = mask_from(&cells, 4, (0, 0), 40, 40);
        assert_eq!(m[[0, 0]], 1.0);
        assert_eq!(m[[0, 12]], 1.0, "x = 12: column 12 * 4 / 50 = 0");
        assert_eq!(m[[0, 13]], 0.0, "x = 13: column 1");
        assert_eq!(m[[13, 13]], 1.0, "row 1, column 1");
    }

    #[test]
    fn weights_and_fusion() {
        let a = Proposal { xyxy: [0.0, 0.0, 10.0, 10.0], classes: vec![1.0, 0.0] };
        let half = Proposal { xyxy: [0.0, 0.0, 10.0, 5.0], classes: vec![1.0, 1.0] };
        assert!((similarity(&a, &half) - 0.5 * std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-6);
        assert_eq!(weight(&a, &[]), 0.0);
        assert_eq!(weight(&a, &[half.clone(), a.clone()]), 1.0);
        let mut f = Fusion::new(1, 2);
        f.add(&Array2::from_shape_vec((1, 2), vec![1.0, 0.0]).unwrap(), 1.0);
        f.add(&Array2::from_shape_vec((1, 2), vec![0.0, 1.0]).unwrap(), 0.0);
        assert_eq!(f.finish().into_raw_vec_and_offset().0, vec![0.5, -0.5]);
    }
}
