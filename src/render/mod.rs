//! Rendering: colormaps, overlays, masks and PNG encoding (pure functions of arrays and images).

mod luts;

use base64::Engine as _;
use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::{ExtendedColorType, GrayImage, ImageEncoder, RgbImage};
use ndarray::{Array2, Array3};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Colormap {
    #[default]
    Jet,
    Turbo,
    Viridis,
    Inferno,
    Gray,
}

impl Colormap {
    pub const ALL: [Colormap; 5] = [Colormap::Jet, Colormap::Turbo, Colormap::Viridis, Colormap::Inferno, Colormap::Gray];

    pub fn parse(s: &str) -> Option<Colormap> {
        Self::ALL.into_iter().find(|c| c.as_str() == s.trim().to_ascii_lowercase())
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Colormap::Jet => "jet",
            Colormap::Turbo => "turbo",
            Colormap::Viridis => "viridis",
            Colormap::Inferno => "inferno",
            Colormap::Gray => "gray",
        }
    }

    fn rgb(self, index: u8) -> [u8; 3] {
        let i = index as usize;
        match self {
            Colormap::Jet => luts::JET[i],
            Colormap::Turbo => luts::TURBO[i],
            Colormap::Viridis => luts::VIRIDIS[i],
            Colormap::Inferno => luts::INFERNO[i],
            Colormap::Gray => [index; 3],
        }
    }
}

/// A [0, 1] value as an 8-bit level, truncating like pytorch-grad-cam's `np.uint8(255 * mask)`.
fn level(v: f32) -> u8 {
    (v.clamp(0.0, 1.0) * 255.0) as u8
}

/// A [0, 1] map through a colormap.
pub fn colorize(map: &Array2<f32>, cm: Colormap) -> RgbImage {
    let (h, w) = map.dim();
    let mut img = RgbImage::new(w as u32, h as u32);
    for ((y, x), &v) in map.indexed_iter() {
        img.put_pixel(x as u32, y as u32, image::Rgb(cm.rgb(level(v))));
    }
    img
}

/// An 8-bit grey image of a [0, 1] map.
pub fn mask(map: &Array2<f32>) -> GrayImage {
    let (h, w) = map.dim();
    let data = map.iter().map(|&v| level(v)).collect();
    GrayImage::from_raw(w as u32, h as u32, data).expect("h*w levels. This is a bug.")
}

/// An `[H, W, 3]` array in [0, 1] as an RGB image.
pub fn rgb_from_unit(hwc: &Array3<f32>) -> RgbImage {
    let (h, w, _) = hwc.dim();
    let data = hwc.iter().map(|&v| level(v)).collect();
    RgbImage::from_raw(w as u32, h as u32, data).expect("h*w*3 levels. This is a bug.")
}

/// `alpha * heat + (1 - alpha) * base`, per channel, rounded. Both images have the same size.
pub fn overlay(base: &RgbImage, heat: &RgbImage, alpha: f32) -> RgbImage {
    let mut out = base.clone();
    for (o, h) in out.iter_mut().zip(heat.iter()) {
        *o = (alpha * *h as f32 + (1.0 - alpha) * *o as f32).round().clamp(0.0, 255.0) as u8;
    }
    out
}

/// PNG bytes with fast compression: maps are regenerated per request, so encoding speed matters more than
/// the last percent of size.
pub fn png_rgb(img: &RgbImage) -> Vec<u8> {
    encode(img.as_raw(), img.width(), img.height(), ExtendedColorType::Rgb8)
}

pub fn png_gray(img: &GrayImage) -> Vec<u8> {
    encode(img.as_raw(), img.width(), img.height(), ExtendedColorType::L8)
}

fn encode(data: &[u8], w: u32, h: u32, ty: ExtendedColorType) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() / 2 + 64);
    PngEncoder::new_with_quality(&mut out, CompressionType::Fast, FilterType::Sub)
        .write_image(data, w, h, ty)
        .expect("encoding into memory cannot fail. This is a bug.");
    out
}

pub fn base64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_truncate_like_numpy_uint8() {
        assert_eq!(level(0.0), 0);
        assert_eq!(level(1.0), 255);
        assert_eq!(level(0.999), 254);
        assert_eq!(level(-1.0), 0);
        assert_eq!(level(f32::NAN), 0);
    }

    #[test]
    fn overlay_weights() {
        let base = RgbImage::from_pixel(1, 1, image::Rgb([100, 0, 200]));
        let heat = RgbImage::from_pixel(1, 1, image::Rgb([200, 255, 0]));
        assert_eq!(overlay(&base, &heat, 0.5).get_pixel(0, 0).0, [150, 128, 100]);
        assert_eq!(overlay(&base, &heat, 0.0).get_pixel(0, 0).0, [100, 0, 200]);
        assert_eq!(overlay(&base, &heat, 1.0).get_pixel(0, 0).0, [200, 255, 0]);
    }

    #[test]
    fn png_round_trips() {
        let img = RgbImage::from_fn(7, 5, |x, y| image::Rgb([x as u8 * 30, y as u8 * 40, 7]));
        let back = image::load_from_memory(&png_rgb(&img)).unwrap().to_rgb8();
        assert_eq!(back, img);
    }
}
