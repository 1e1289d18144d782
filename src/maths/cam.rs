//! The Grad-CAM family: maps at the layer's resolution from activations `A [K, h, w]` and gradients `g`.

use ndarray::{Array2, ArrayView3, Axis, Zip};

fn relu(mut m: Array2<f32>) -> Array2<f32> {
    m.mapv_inplace(|v| v.max(0.0));
    m
}

/// sum_k w_k * A_k
fn weighted_sum(a: ArrayView3<f32>, w: &[f32]) -> Array2<f32> {
    let mut out = Array2::<f32>::zeros((a.shape()[1], a.shape()[2]));
    for (ak, &wk) in a.outer_iter().zip(w) {
        out.scaled_add(wk, &ak);
    }
    out
}

/// relu(sum_k w_k * A_k) with weights computed elsewhere: plain CAM (the linear head's weights), Score-CAM (softmax
/// of the masked inputs' scores), Ablation-CAM (relative score drops).
pub fn weighted(a: ArrayView3<f32>, w: &[f32]) -> Array2<f32> {
    relu(weighted_sum(a, w))
}

/// Grad-CAM: relu(sum_k mean_ij(g_k) * A_k).
pub fn gradcam(a: ArrayView3<f32>, g: ArrayView3<f32>) -> Array2<f32> {
    let w: Vec<f32> = g.outer_iter().map(|gk| gk.mean().unwrap_or(0.0)).collect();
    relu(weighted_sum(a, &w))
}

/// Grad-CAM++ (closed form of pytorch-grad-cam): alpha = g^2 / (2 g^2 + sum_ab(A) g^3), 0 where g = 0;
/// weights = sum_ij alpha * relu(g).
pub fn gradcam_pp(a: ArrayView3<f32>, g: ArrayView3<f32>) -> Array2<f32> {
    const EPS: f32 = 1e-6; // as pytorch-grad-cam
    let w: Vec<f32> = a
        .outer_iter()
        .zip(g.outer_iter())
        .map(|(ak, gk)| {
            let sum_a: f32 = ak.sum();
            gk.iter()
                .map(|&gv| {
                    if gv == 0.0 {
                        return 0.0;
                    }
                    let g2 = gv * gv;
                    let alpha = g2 / (2.0 * g2 + sum_a * g2 * gv + EPS);
                    alpha * gv.max(0.0)
                })
                .sum()
        })
        .collect();
    relu(weighted_sum(a, &w))
}

/// XGrad-CAM: weights = sum_ij (A / sum_ab A) * g.
pub fn xgradcam(a: ArrayView3<f32>, g: ArrayView3<f32>) -> Array2<f32> {
    const EPS: f32 = 1e-7;
    let w: Vec<f32> = a
        .outer_iter()
        .zip(g.outer_iter())
        .map(|(ak, gk)| {
            let sum_a = ak.sum();
            Zip::from(&ak).and(&gk).fold(0.0f32, |acc, &av, &gv| acc + av / (sum_a + EPS) * gv)
        })
        .collect();
    relu(weighted_sum(a, &w))
}

/// HiResCAM: relu(sum_k g_k * A_k) (element-wise, no spatial averaging).
pub fn hirescam(a: ArrayView3<f32>, g: ArrayView3<f32>) -> Array2<f32> {
    let prod = &a * &g;
    relu(prod.sum_axis(Axis(0)))
}

/// LayerCAM: relu(sum_k relu(g_k) * A_k).
pub fn layercam(a: ArrayView3<f32>, g: ArrayView3<f32>) -> Array2<f32> {
    let prod = Zip::from(&a).and(&g).map_collect(|&av, &gv| av * gv.max(0.0));
    relu(prod.sum_axis(Axis(0)))
}

/// Eigen-CAM: the activations as an (h*w) x K matrix, centred over positions, projected on their first
/// principal direction; the sign is chosen so that the map's largest magnitude is positive.
pub fn eigencam(a: ArrayView3<f32>) -> Array2<f32> {
    let (k, h, w) = (a.shape()[0], a.shape()[1], a.shape()[2]);
    let n = h * w;
    // M[p, c], centred over p, in f64.
    let mut m = vec![0f64; n * k];
    for (c, ak) in a.outer_iter().enumerate() {
        let mean = ak.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
        for (p, &v) in ak.iter().enumerate() {
            m[p * k + c] = v as f64 - mean;
        }
    }
    // The projection M v1 equals sigma1 * u1, the top eigenvector of the n x n Gram matrix M M^T.
    let mut gram = vec![0f64; n * n];
    for i in 0..n {
        for j in i..n {
            let s: f64 = (0..k).map(|c| m[i * k + c] * m[j * k + c]).sum();
            gram[i * n + j] = s;
            gram[j * n + i] = s;
        }
    }
    let (lambda, u) = top_eigenvector(&gram, n);
    let sigma = lambda.max(0.0).sqrt();
    let mut proj: Vec<f32> = u.iter().map(|&x| (x * sigma) as f32).collect();
    let extreme = proj.iter().copied().fold(0f32, |m, v| if v.abs() > m.abs() { v } else { m });
    if extreme < 0.0 {
        proj.iter_mut().for_each(|v| *v = -*v);
    }
    Array2::from_shape_vec((h, w), proj).expect("h*w values. This is a bug.")
}

/// The largest eigenvalue and its unit eigenvector of a symmetric positive semi-definite matrix (power
/// iteration; f64; up to 10,000 steps, stops when the Rayleigh quotient settles).
fn top_eigenvector(a: &[f64], n: usize) -> (f64, Vec<f64>) {
    // Start from the row with the largest norm: never orthogonal to the top eigenvector unless a = 0.
    let best = (0..n)
        .max_by(|&i, &j| {
            let ni: f64 = a[i * n..(i + 1) * n].iter().map(|x| x * x).sum();
            let nj: f64 = a[j * n..(j + 1) * n].iter().map(|x| x * x).sum();
            ni.partial_cmp(&nj).unwrap_or(std::cmp::Ordering::Equal)
        })
        .unwrap_or(0);
    let mut v: Vec<f64> = a[best * n..(best + 1) * n].iter().enumerate().map(|(i, &x)| x + 1e-3 * ((i % 7) as f64 - 3.0)).collect();
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let nv = norm(&v);
    if nv == 0.0 {
        return (0.0, vec![0.0; n]);
    }
    v.iter_mut().for_each(|x| *x /= nv);
    let mut lambda = 0.0;
    for _ in 0..10_000 {
        let mut next = vec![0f64; n];
        for i in 0..n {
            next[i] = (0..n).map(|j| a[i * n + j] * v[j]).sum();
        }
        let l = norm(&next);
        if l == 0.0 {
            return (0.0, vec![0.0; n]);
        }
        next.iter_mut().for_each(|x| *x /= l);
        let done = (l - lambda).abs() <= 1e-13 * l;
        lambda = l;
        v = next;
        if done {
            break;
        }
    }
    (lambda, v)
}
