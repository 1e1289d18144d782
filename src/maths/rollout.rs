//! Attention-native maps of a vision transformer, on its token grid `[h, w]`, from the attention probabilities
//! `A [heads, T, T]` of every block (first block first) and, for the gradient rollout, their gradients
//! `dA = dy/dA` (one image: the batch row of the explain run). Token 0 is the class token; the `prefix` leading
//! tokens are not on the grid; the grid tokens follow row by row (docs/DESIGN.md, "Transformer layers").
//!
//! - Attention rollout (Abnar & Zuidema, 2020, as vit-explain and Chefer et al.'s `compute_rollout_attention`
//!   compute it, without discarding): per block `Ā = rownorm(mean_heads(A) + I)`, `R = Ā_L ⋯ Ā_2 Ā_1`.
//! - Gradient rollout (Chefer et al., 2021, "Generic attention-model explainability", ViT rule): per block
//!   `Ā = mean_heads((dA ⊙ A)^+)`, `R ← R + Ā R` from `R = I`, first block to last: `R = (I + Ā_L) ⋯ (I + Ā_1)`.
//!
//! The map is the class token's row of R over the grid tokens. Only that row is needed, so it is computed as a
//! row vector `r = e_0ᵀ M_L ⋯ M_1`, multiplied from the last block down (O(T²) per block instead of O(T³)); the
//! sums are in f64.

use ndarray::{Array1, Array2, ArrayView3, Axis};

/// Where the grid lies among a transformer's T tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenGrid {
    /// Leading tokens not on the grid (class, distillation, register tokens).
    pub prefix: usize,
    pub h: usize,
    pub w: usize,
}

impl TokenGrid {
    pub fn tokens(&self) -> usize {
        self.prefix + self.h * self.w
    }
}

fn check(a: &ArrayView3<f32>, grid: TokenGrid, block: usize) -> Result<(), String> {
    let (heads, t, t2) = a.dim();
    if heads == 0 || t != t2 || t != grid.tokens() || grid.h * grid.w == 0 {
        return Err(format!(
            "attention block {block} is {:?}, not [heads, T, T] with T = {} + {}x{}",
            a.shape(),
            grid.prefix,
            grid.h,
            grid.w
        ));
    }
    Ok(())
}

/// Mean over heads, `[T, T]`, of `f(A)` (and of `f(A, dA)` for the gradient rollout), in f64.
fn head_mean(a: &ArrayView3<f32>, f: impl Fn(usize, usize, usize) -> f64) -> Array2<f64> {
    let (heads, t, _) = a.dim();
    let mut m = Array2::<f64>::zeros((t, t));
    for h in 0..heads {
        for i in 0..t {
            for j in 0..t {
                m[[i, j]] += f(h, i, j);
            }
        }
    }
    m / heads as f64
}

/// `r ← r M` for a row vector `r`.
fn row_times(r: &Array1<f64>, m: &Array2<f64>) -> Array1<f64> {
    r.dot(m)
}

/// The class token's row of the rolled-out matrix over the grid tokens, as `[h, w]`.
fn grid_map(r: &Array1<f64>, grid: TokenGrid) -> Array2<f32> {
    let cells: Vec<f32> = r.iter().skip(grid.prefix).take(grid.h * grid.w).map(|&v| v as f32).collect();
    Array2::from_shape_vec((grid.h, grid.w), cells).expect("h*w grid tokens were checked. This is a bug.")
}

/// Attention rollout: `R = Ā_L ⋯ Ā_1` with `Ā = rownorm(mean_heads(A) + I)`; the map is `R[0, grid tokens]`.
pub fn attention_rollout(blocks: &[ArrayView3<f32>], grid: TokenGrid) -> Result<Array2<f32>, String> {
    if blocks.is_empty() {
        return Err("no attention blocks".into());
    }
    let t = grid.tokens();
    let mut r = Array1::<f64>::zeros(t);
    r[0] = 1.0;
    for (b, a) in blocks.iter().enumerate().rev() {
        check(a, grid, b)?;
        let mut m = head_mean(a, |h, i, j| a[[h, i, j]] as f64);
        m.diag_mut().mapv_inplace(|v| v + 1.0);
        for mut row in m.axis_iter_mut(Axis(0)) {
            let s = row.sum();
            if s != 0.0 {
                row /= s;
            }
        }
        r = row_times(&r, &m);
    }
    Ok(grid_map(&r, grid))
}

/// Gradient rollout: `R = (I + Ā_L) ⋯ (I + Ā_1)` (`R ← R + Ā R` from `R = I`) with `Ā = mean_heads((dA ⊙ A)^+)`;
/// the map is `R[0, grid tokens]`. `blocks` pairs each block's probabilities with their gradients.
pub fn gradient_rollout(blocks: &[(ArrayView3<f32>, ArrayView3<f32>)], grid: TokenGrid) -> Result<Array2<f32>, String> {
    if blocks.is_empty() {
        return Err("no attention blocks".into());
    }
    let t = grid.tokens();
    let mut r = Array1::<f64>::zeros(t);
    r[0] = 1.0;
    for (b, (a, g)) in blocks.iter().enumerate().rev() {
        check(a, grid, b)?;
        if g.dim() != a.dim() {
            return Err(format!("attention block {b}: gradients {:?} for probabilities {:?}", g.shape(), a.shape()));
        }
        let mut m = head_mean(a, |h, i, j| (g[[h, i, j]] as f64 * a[[h, i, j]] as f64).max(0.0));
        m.diag_mut().mapv_inplace(|v| v + 1.0);
        r = row_times(&r, &m);
    }
    Ok(grid_map(&r, grid))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{arr2, Array3};

    /// Two blocks of 3 tokens (class token + a 1x2 grid), two heads, worked by hand.
    #[test]
    fn two_blocks_by_hand() {
        let grid = TokenGrid { prefix: 1, h: 1, w: 2 };
        // Block 1: head means [[.5,.25,.25],[0,1,0],[0,0,1]]; block 2: [[.2,.6,.2],[.5,.5,0],[0,.5,.5]].
        let a1 = Array3::from_shape_vec((2, 3, 3), vec![
            0.5, 0.5, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, //
            0.5, 0.0, 0.5, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0,
        ])
        .unwrap();
        let a2 = Array3::from_shape_vec((2, 3, 3), vec![
            0.4, 0.6, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, //
            0.0, 0.6, 0.4, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0,
        ])
        .unwrap();
        // (A + I) row-normalised = (A + I) / 2 (rows of A sum to 1):
        // Ā1 = [[.75,.125,.125],[0,1,0],[0,0,1]], Ā2 = [[.6,.3,.1],[.25,.75,0],[0,.25,.75]].
        // Row 0 of Ā2 Ā1 = .6*[.75,.125,.125] + .3*[0,1,0] + .1*[0,0,1] = [.45, .375, .175].
        let map = attention_rollout(&[a1.view(), a2.view()], grid).unwrap();
        let want = arr2(&[[0.375f32, 0.175]]);
        assert!((&map - &want).iter().all(|d| d.abs() < 1e-6), "{map:?}");

        // Gradients: block 1's products g*A have negative entries that the positive part drops.
        let g1 = Array3::from_shape_vec((2, 3, 3), vec![
            2.0, -1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, //
            0.0, 0.0, 4.0, 0.0, -3.0, 0.0, 0.0, 0.0, 0.0,
        ])
        .unwrap();
        let g2 = Array3::from_shape_vec((2, 3, 3), vec![
            1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, //
            0.0, -1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
        ])
        .unwrap();
        // Ā1 = mean_h (g1*A1)^+ = mean([[1,0,0],[0,1,0],0], [[0,0,2],0,0]) = [[.5,0,1],[0,.5,0],[0,0,0]].
        // Ā2 = mean([[.4,.6,0],0,0], [[0,0,.8],0,0]) = [[.2,.3,.4],0,0].
        // R = I; R += Ā1 R -> I + Ā1 = [[1.5,0,1],[0,1.5,0],[0,0,1]]; R += Ā2 R -> (I + Ā2)(I + Ā1):
        // row 0 = [1.2,.3,.4] (I + Ā1) = [1.8, .45, 1.6].
        let map = gradient_rollout(&[(a1.view(), g1.view()), (a2.view(), g2.view())], grid).unwrap();
        let want = arr2(&[[0.45f32, 1.6]]);
        assert!((&map - &want).iter().all(|d| d.abs() < 1e-6), "{map:?}");

        // The full-matrix recurrences give the same row 0.
        let eye = Array2::<f64>::eye(3);
        let bar1 = head_mean(&a1.view(), |h, i, j| a1[[h, i, j]] as f64);
        let bar2 = head_mean(&a2.view(), |h, i, j| a2[[h, i, j]] as f64);
        let norm = |m: Array2<f64>| {
            let s = m.sum_axis(Axis(1)).insert_axis(Axis(1));
            &m / &s
        };
        let joint = norm(&bar2 + &eye).dot(&norm(&bar1 + &eye));
        // (the inputs are f32: 0.6f32 is 0.6 within 3e-8)
        assert!((joint[[0, 1]] - 0.375).abs() < 1e-6 && (joint[[0, 2]] - 0.175).abs() < 1e-6, "{joint:?}");
    }

    #[test]
    fn refuses_shapes_off_the_grid() {
        let grid = TokenGrid { prefix: 1, h: 2, w: 2 };
        let a = Array3::<f32>::zeros((2, 4, 4));
        assert!(attention_rollout(&[a.view()], grid).unwrap_err().contains("T = 1 + 2x2"));
        assert!(attention_rollout(&[], grid).is_err());
        let ok = Array3::<f32>::zeros((2, 5, 5));
        let bad = Array3::<f32>::zeros((1, 5, 5));
        assert!(gradient_rollout(&[(ok.view(), bad.view())], grid).is_err());
    }
}
