//! Ultralytics' letterbox, as its `predict` prepares an image for a YOLO export: keep the aspect ratio, resize with
//! OpenCV's `INTER_LINEAR` (bilinear on 8-bit pixels in 11-bit fixed point, no antialiasing), pad with grey 114 to
//! the input size, centred. The arithmetic follows OpenCV's `resize` and Ultralytics' `LetterBox` and
//! `scale_boxes` to the bit, Python's rounding (ties to even) included; tests/detection.rs holds it to both on
//! committed fixtures (tests/fixtures/detection).
//!
//! An antialiased resize or square padding of a dynamic-size export moves YOLO scores by up to 0.13 on real
//! photos, so the detections would not equal the reference predictor's.

use image::RgbImage;

/// OpenCV's fixed-point scale of the interpolation weights (`INTER_RESIZE_COEF_BITS` = 11).
const COEF_SCALE: f32 = 2048.0;

/// Where the resized image sits in the letterboxed input: the gains (input pixels per upload pixel, per axis, from
/// the rounded resized size) and the padding.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Placement {
    pub gain_x: f64,
    pub gain_y: f64,
    /// The left and top padding, in input pixels (as Ultralytics' `scale_boxes` recomputes them).
    pub pad_x: f64,
    pub pad_y: f64,
}

impl Placement {
    /// A box `(x0, y0, x1, y1)` in input pixels to upload pixels, clipped to the upload (`scale_boxes`).
    pub fn to_upload(&self, b: [f32; 4], width: u32, height: u32) -> [f32; 4] {
        let (gx, gy) = (self.gain_x as f32, self.gain_y as f32);
        let (px, py) = (self.pad_x as f32, self.pad_y as f32);
        let (w, h) = (width as f32, height as f32);
        [((b[0] - px) / gx).clamp(0.0, w), ((b[1] - py) / gy).clamp(0.0, h), ((b[2] - px) / gx).clamp(0.0, w), ((b[3] - py) / gy).clamp(0.0, h)]
    }
}

/// Python's `round(x)`: to the nearest integer, ties to even.
fn py_round(x: f64) -> i64 {
    x.round_ties_even() as i64
}

/// The letterboxed image `width x height` and where the upload sits in it (Ultralytics `LetterBox(auto=False,
/// center=True, scaleup=True)`, then `scale_boxes`' gain and padding for the way back).
pub fn letterbox(img: &RgbImage, width: u32, height: u32) -> (RgbImage, Placement) {
    let (w0, h0) = img.dimensions();
    let r = (height as f64 / h0 as f64).min(width as f64 / w0 as f64);
    let (nw, nh) = (py_round(w0 as f64 * r).max(1) as u32, py_round(h0 as f64 * r).max(1) as u32);
    let (dw, dh) = ((width as f64 - nw as f64) / 2.0, (height as f64 - nh as f64) / 2.0);
    let resized = if (nw, nh) == (w0, h0) { img.clone() } else { resize_linear(img, nw, nh) };
    let (top, left) = (py_round(dh - 0.1).max(0) as u32, py_round(dw - 0.1).max(0) as u32);
    let mut out = RgbImage::from_pixel(width, height, image::Rgb([114, 114, 114]));
    image::imageops::replace(&mut out, &resized, left as i64, top as i64);
    (out, placement(w0, h0, width, height))
}

/// Where a `w0 x h0` upload sits in a `width x height` letterboxed input, as Ultralytics' `scale_boxes`
/// recomputes it from the two shapes: the resized size rounded as `LetterBox` rounds it, a gain per axis from
/// that, and the padding `round(... - 0.1)`.
pub fn placement(w0: u32, h0: u32, width: u32, height: u32) -> Placement {
    let gain = (height as f64 / h0 as f64).min(width as f64 / w0 as f64);
    let (nw, nh) = (py_round(w0 as f64 * gain).max(1) as f64, py_round(h0 as f64 * gain).max(1) as f64);
    let pad_x = py_round((width as f64 - nw) / 2.0 - 0.1) as f64;
    let pad_y = py_round((height as f64 - nh) / 2.0 - 0.1) as f64;
    Placement { gain_x: nw / w0 as f64, gain_y: nh / h0 as f64, pad_x, pad_y }
}

/// One axis of OpenCV's linear resize: per destination index, the first source index and the two fixed-point
/// weights (`resize.cpp`, `INTER_LINEAR`: half-pixel centres). Horizontally the index and weight are clamped at
/// the borders; vertically the weight is not, and the rows are clamped instead (`clamp_weights`).
fn axis(src: u32, dst: u32, clamp_weights: bool) -> Vec<(i64, [i32; 2])> {
    let scale = src as f64 / dst as f64;
    (0..dst)
        .map(|d| {
            let f = ((d as f64 + 0.5) * scale - 0.5) as f32;
            let mut s = f.floor() as i64;
            let mut fx = f - s as f32;
            if clamp_weights && s < 0 {
                fx = 0.0;
                s = 0;
            }
            if clamp_weights && s >= src as i64 - 1 {
                fx = 0.0;
                s = src as i64 - 1;
            }
            // saturate_cast<short>(float): round to nearest, ties to even.
            let a0 = ((1.0 - fx) * COEF_SCALE).round_ties_even() as i32;
            let a1 = (fx * COEF_SCALE).round_ties_even() as i32;
            (s, [a0, a1])
        })
        .collect()
}

/// OpenCV's `cv2.resize(img, (width, height), interpolation=cv2.INTER_LINEAR)` on an 8-bit RGB image, bit for
/// bit: an exact 2x reduction is the 2x2 mean (OpenCV switches to `INTER_AREA` there); otherwise a horizontal
/// pass in 11-bit fixed point, then a vertical pass rounded as OpenCV's vector kernel rounds:
/// `(((b0 * (s0 >> 4)) >> 16) + ((b1 * (s1 >> 4)) >> 16) + 2) >> 2`. Checked against OpenCV itself on up- and
/// down-scales (tests/detection.rs).
pub fn resize_linear(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (sw, sh) = img.dimensions();
    let src = img.as_raw();
    if sw == 2 * width && sh == 2 * height {
        let mut out = RgbImage::new(width, height);
        let dst: &mut [u8] = &mut out;
        for y in 0..height as usize {
            for x in 0..width as usize {
                for c in 0..3 {
                    let at = |yy: usize, xx: usize| src[(yy * sw as usize + xx) * 3 + c] as u32;
                    let sum = at(2 * y, 2 * x) + at(2 * y, 2 * x + 1) + at(2 * y + 1, 2 * x) + at(2 * y + 1, 2 * x + 1);
                    dst[(y * width as usize + x) * 3 + c] = ((sum + 2) >> 2) as u8;
                }
            }
        }
        return out;
    }
    let xs = axis(sw, width, true);
    let ys = axis(sh, height, false);
    let row_len = width as usize * 3;
    let last_row = sh as i64 - 1;
    // The horizontal pass of every source row, once.
    let hrows: Vec<Vec<i32>> = (0..sh as usize)
        .map(|y| {
            let row = &src[y * sw as usize * 3..(y + 1) * sw as usize * 3];
            let mut out = Vec::with_capacity(row_len);
            for &(s, [a0, a1]) in &xs {
                let (s0, s1) = (s as usize, (s as usize + 1).min(sw as usize - 1));
                for c in 0..3 {
                    out.push(row[s0 * 3 + c] as i32 * a0 + row[s1 * 3 + c] as i32 * a1);
                }
            }
            out
        })
        .collect();
    let mut out = RgbImage::new(width, height);
    let dst: &mut [u8] = &mut out;
    for (dy, &(s, [b0, b1])) in ys.iter().enumerate() {
        let (r0, r1) = (&hrows[s.clamp(0, last_row) as usize], &hrows[(s + 1).clamp(0, last_row) as usize]);
        let line = &mut dst[dy * row_len..(dy + 1) * row_len];
        for x in 0..row_len {
            let v = (((b0 * (r0[x] >> 4)) >> 16) + ((b1 * (r1[x] >> 4)) >> 16) + 2) >> 2;
            line[x] = v.clamp(0, 255) as u8;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_rounding_and_placement() {
        assert_eq!(py_round(2.5), 2);
        assert_eq!(py_round(3.5), 4);
        assert_eq!(py_round(-0.1), 0);
        // A 640x480 upload into 320x320: gain 0.5, 320x240 resized, 40 rows of padding on top.
        let img = RgbImage::from_pixel(640, 480, image::Rgb([10, 20, 30]));
        let (out, p) = letterbox(&img, 320, 320);
        assert_eq!(p, Placement { gain_x: 0.5, gain_y: 0.5, pad_x: 0.0, pad_y: 40.0 });
        assert_eq!(out.get_pixel(0, 39).0, [114, 114, 114]);
        assert_eq!(out.get_pixel(0, 40).0, [10, 20, 30]);
        assert_eq!(out.get_pixel(319, 279).0, [10, 20, 30]);
        assert_eq!(out.get_pixel(0, 280).0, [114, 114, 114]);
        assert_eq!(p.to_upload([0.0, 40.0, 320.0, 280.0], 640, 480), [0.0, 0.0, 640.0, 480.0]);
    }
}
