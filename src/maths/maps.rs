//! From a raw map to what is shown: bilinear resizing, normalisation, peak, box, gradient images.

use ndarray::{Array2, Array3, ArrayView2, ArrayView3, Axis};

/// Bilinear resize with half-pixel centres (OpenCV `INTER_LINEAR`, PyTorch `align_corners=False`, no
/// antialiasing): source coordinate = (dst + 0.5) * in/out - 0.5, clamped to the edge.
pub fn resize_bilinear(src: ArrayView2<f32>, out_h: usize, out_w: usize) -> Array2<f32> {
    let (in_h, in_w) = src.dim();
    let ys = axis_weights(in_h, out_h);
    let xs = axis_weights(in_w, out_w);
    let mut out = Array2::<f32>::zeros((out_h, out_w));
    for (oy, &(y0, y1, wy)) in ys.iter().enumerate() {
        let (r0, r1) = (src.row(y0), src.row(y1));
        let mut row = out.row_mut(oy);
        for (ox, &(x0, x1, wx)) in xs.iter().enumerate() {
            let top = r0[x0] + (r0[x1] - r0[x0]) * wx;
            let bottom = r1[x0] + (r1[x1] - r1[x0]) * wx;
            row[ox] = top + (bottom - top) * wy;
        }
    }
    out
}

/// Bilinear resize with corner pixels aligned (PyTorch `align_corners=True`, `nn.UpsamplingBilinear2d`): source
/// coordinate = dst * (in - 1) / (out - 1). Score-CAM upsamples its masks so.
pub fn resize_bilinear_corners(src: ArrayView2<f32>, out_h: usize, out_w: usize) -> Array2<f32> {
    let (in_h, in_w) = src.dim();
    let axis = |input: usize, output: usize| -> Vec<(usize, usize, f32)> {
        let scale = if output > 1 { (input - 1) as f64 / (output - 1) as f64 } else { 0.0 };
        (0..output)
            .map(|o| {
                let s = o as f64 * scale;
                let i0 = (s.floor() as usize).min(input - 1);
                let i1 = (i0 + 1).min(input - 1);
                (i0, i1, if i1 == i0 { 0.0 } else { (s - i0 as f64) as f32 })
            })
            .collect()
    };
    let (ys, xs) = (axis(in_h, out_h), axis(in_w, out_w));
    let mut out = Array2::<f32>::zeros((out_h, out_w));
    for (oy, &(y0, y1, wy)) in ys.iter().enumerate() {
        let (r0, r1) = (src.row(y0), src.row(y1));
        for (ox, &(x0, x1, wx)) in xs.iter().enumerate() {
            let top = r0[x0] + (r0[x1] - r0[x0]) * wx;
            let bottom = r1[x0] + (r1[x1] - r1[x0]) * wx;
            out[[oy, ox]] = top + (bottom - top) * wy;
        }
    }
    out
}

/// Per output index: (lower source index, upper source index, weight of the upper one).
fn axis_weights(input: usize, output: usize) -> Vec<(usize, usize, f32)> {
    let scale = input as f64 / output as f64;
    (0..output)
        .map(|o| {
            let src = ((o as f64 + 0.5) * scale - 0.5).max(0.0);
            let i0 = (src.floor() as usize).min(input - 1);
            let i1 = (i0 + 1).min(input - 1);
            let w = if i1 == i0 { 0.0 } else { (src - i0 as f64) as f32 };
            (i0, i1, w)
        })
        .collect()
}

/// Resizes every channel of a `[C, H, W]` array.
pub fn resize_channels(src: ArrayView3<f32>, out_h: usize, out_w: usize) -> Array3<f32> {
    let mut out = Array3::<f32>::zeros((src.shape()[0], out_h, out_w));
    for (c, ch) in src.outer_iter().enumerate() {
        out.index_axis_mut(Axis(0), c).assign(&resize_bilinear(ch, out_h, out_w));
    }
    out
}

/// Min-max normalisation to [0, 1] (as pytorch-grad-cam's `scale_cam_image`: (m - min) / (max - min + 1e-7)).
pub fn normalize(m: &Array2<f32>) -> Array2<f32> {
    let (lo, hi) = m.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    if !lo.is_finite() || !hi.is_finite() {
        return Array2::zeros(m.dim());
    }
    m.mapv(|v| (v - lo) / (hi - lo + 1e-7))
}

/// The display map of a CAM: normalised, then resized to the output size.
pub fn display_map(raw: &Array2<f32>, out_h: usize, out_w: usize) -> Array2<f32> {
    let n = normalize(raw);
    if n.dim() == (out_h, out_w) { n } else { resize_bilinear(n.view(), out_h, out_w) }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Point {
    pub x: usize,
    pub y: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct BBox {
    pub x: usize,
    pub y: usize,
    pub width: usize,
    pub height: usize,
}

/// The position of the maximum (the first one in row-major order).
pub fn peak(m: &Array2<f32>) -> Point {
    let (mut best, mut at) = (f32::NEG_INFINITY, (0, 0));
    for ((y, x), &v) in m.indexed_iter() {
        if v > best {
            best = v;
            at = (y, x);
        }
    }
    Point { x: at.1, y: at.0 }
}

/// The Grad-CAM paper's box: threshold at `fraction` of the maximum, box around the largest 8-connected
/// region above it. None for an all-zero map.
pub fn bbox(m: &Array2<f32>, fraction: f32) -> Option<BBox> {
    let max = m.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max.is_nan() || max <= 0.0 {
        return None;
    }
    let thr = max * fraction;
    let (h, w) = m.dim();
    let mut label = vec![0u32; h * w];
    let mut best: Option<(usize, BBox)> = None;
    let mut next = 0u32;
    let mut stack = Vec::new();
    for start in 0..h * w {
        if label[start] != 0 || m[[start / w, start % w]] < thr {
            continue;
        }
        next += 1;
        label[start] = next;
        stack.push(start);
        let (mut count, mut x0, mut y0, mut x1, mut y1) = (0usize, usize::MAX, usize::MAX, 0, 0);
        while let Some(p) = stack.pop() {
            let (y, x) = (p / w, p % w);
            count += 1;
            (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
            for dy in -1i64..=1 {
                for dx in -1i64..=1 {
                    let (ny, nx) = (y as i64 + dy, x as i64 + dx);
                    if ny < 0 || nx < 0 || ny >= h as i64 || nx >= w as i64 {
                        continue;
                    }
                    let q = ny as usize * w + nx as usize;
                    if label[q] == 0 && m[[ny as usize, nx as usize]] >= thr {
                        label[q] = next;
                        stack.push(q);
                    }
                }
            }
        }
        let b = BBox { x: x0, y: y0, width: x1 - x0 + 1, height: y1 - y0 + 1 };
        if best.is_none_or(|(c, _)| count > c) {
            best = Some((count, b));
        }
    }
    best.map(|(_, b)| b)
}

/// pytorch-grad-cam's `deprocess_image` on a `[C, H, W]` gradient: standardise over all values, scale by 0.1,
/// shift by 0.5, clip to [0, 1]. Returns `[H, W, C]` in [0, 1].
pub fn deprocess(grad: ArrayView3<f32>) -> Array3<f32> {
    let n = grad.len().max(1) as f64;
    let mean = grad.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = grad.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    let std = var.sqrt();
    let hwc = grad.permuted_axes([1, 2, 0]);
    hwc.mapv(|v| ((((v as f64 - mean) / (std + 1e-5)) * 0.1 + 0.5).clamp(0.0, 1.0)) as f32)
}

/// Per-pixel max of absolute values over channels, normalised to [0, 1].
pub fn magnitude(grad: ArrayView3<f32>) -> Array2<f32> {
    let m = grad.map_axis(Axis(0), |c| c.iter().fold(0f32, |a, &v| a.max(v.abs())));
    normalize(&m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn bbox_takes_largest_8_connected_region() {
        let m = array![
            [1.0, 0.0, 0.0, 0.0, 0.0],
            [0.0, 0.5, 0.0, 0.0, 0.9],
            [0.0, 0.0, 0.3, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.0, 0.0],
        ];
        // Diagonal cells are 8-connected: (0,0),(1,1),(2,2) form one region of 3; (1,4) is alone.
        assert_eq!(bbox(&m, 0.15), Some(BBox { x: 0, y: 0, width: 3, height: 3 }));
        // Raise the threshold above 0.3: the diagonal region shrinks to 2 cells, still the largest.
        assert_eq!(bbox(&m, 0.4), Some(BBox { x: 0, y: 0, width: 2, height: 2 }));
        assert_eq!(bbox(&Array2::zeros((3, 3)), 0.15), None);
        assert_eq!(peak(&m), Point { x: 0, y: 0 });
    }

    #[test]
    fn bbox_below_threshold_excluded() {
        let m = array![[0.1, 1.0, 0.1], [0.16, 0.0, 0.0], [0.0, 0.0, 0.0]];
        // 0.1 < 0.15: only (0,1) and (1,0) (diagonal neighbours) remain.
        assert_eq!(bbox(&m, 0.15), Some(BBox { x: 0, y: 0, width: 2, height: 2 }));
    }

    #[test]
    fn resize_identity_and_constant() {
        let m = array![[1.0f32, 2.0], [3.0, 4.0]];
        assert_eq!(resize_bilinear(m.view(), 2, 2), m);
        let c = Array2::from_elem((3, 5), 0.25f32);
        assert!(resize_bilinear(c.view(), 17, 4).iter().all(|&v| (v - 0.25).abs() < 1e-7));
    }

    #[test]
    fn normalize_constant_map_is_zero() {
        let m = Array2::from_elem((2, 2), 3.0f32);
        assert!(normalize(&m).iter().all(|&v| v == 0.0));
    }
}
