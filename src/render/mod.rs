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

/// The colour of class `c` in a label map: the PASCAL VOC palette (the bits of the index spread over the three
/// channels, high bits first), which DeepLab's, torchvision's and most segmentation tools' pictures use; class 0 is
/// black.
pub fn class_colour(c: usize) -> [u8; 3] {
    let mut rgb = [0u8; 3];
    let mut c = c;
    for shift in (0..8).rev() {
        for (ch, v) in rgb.iter_mut().enumerate() {
            *v |= (((c >> ch) & 1) as u8) << shift;
        }
        c >>= 3;
    }
    rgb
}

/// A label map `[height, width]` of class indices as a PNG whose pixel values are the indices: 8-bit with the VOC
/// palette ([`class_colour`]) for up to 256 classes, so viewers show colours and readers get the indices; 16-bit
/// grey above that.
pub fn png_labels(labels: &[u16], width: u32, height: u32, classes: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(labels.len() / 4 + 1024);
    {
        let mut enc = png::Encoder::new(&mut out, width, height);
        enc.set_compression(png::Compression::Fast);
        let data: Vec<u8> = if classes <= 256 {
            enc.set_color(png::ColorType::Indexed);
            enc.set_depth(png::BitDepth::Eight);
            enc.set_palette((0..classes).flat_map(class_colour).collect::<Vec<u8>>());
            labels.iter().map(|&l| l as u8).collect()
        } else {
            enc.set_color(png::ColorType::Grayscale);
            enc.set_depth(png::BitDepth::Sixteen);
            labels.iter().flat_map(|l| l.to_be_bytes()).collect()
        };
        let mut w = enc.write_header().expect("writing into memory cannot fail. This is a bug.");
        w.write_image_data(&data).expect("a label map of width x height values. This is a bug.");
    }
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
    fn label_maps_keep_their_indices() {
        // VOC's first colours: background black, aeroplane (128, 0, 0), bicycle (0, 128, 0), person (192, 128, 128).
        assert_eq!([class_colour(0), class_colour(1), class_colour(2), class_colour(15)], [[0, 0, 0], [128, 0, 0], [0, 128, 0], [192, 128, 128]]);
        let labels: Vec<u16> = (0..12).map(|i| i % 5).collect();
        let bytes = png_labels(&labels, 4, 3, 5);
        let mut r = png::Decoder::new(std::io::Cursor::new(bytes)).read_info().unwrap();
        assert_eq!(r.info().color_type, png::ColorType::Indexed);
        assert_eq!(r.info().palette.as_ref().map(|p| p.len()), Some(15));
        let mut buf = vec![0; r.output_buffer_size().unwrap()];
        r.next_frame(&mut buf).unwrap();
        assert_eq!(buf.iter().map(|&b| b as u16).collect::<Vec<_>>(), labels);
        // Above 256 classes: 16-bit grey with the indices as values.
        let big: Vec<u16> = vec![0, 300, 299, 1];
        let img = image::load_from_memory(&png_labels(&big, 2, 2, 301)).unwrap().to_luma16();
        assert_eq!(img.into_raw(), big);
    }

    #[test]
    fn png_round_trips() {
        let img = RgbImage::from_fn(7, 5, |x, y| image::Rgb([x as u8 * 30, y as u8 * 40, 7]));
        let back = image::load_from_memory(&png_rgb(&img)).unwrap().to_rgb8();
        assert_eq!(back, img);
    }
}
