//! Image decoding and preprocessing (docs/DESIGN.md §5): decode, honour EXIF orientation, convert to RGB, resize to the
//! model input with a bilinear filter (none when the size already matches), scale to [0, 1], normalise with
//! the model's mean/std, NCHW.

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, RgbImage};
use ndarray::Array3;

#[derive(Debug, Clone, Copy)]
pub struct DecodeLimits {
    /// Largest width * height accepted (checked from the header, before decoding).
    pub max_pixels: u64,
    /// Largest width or height accepted.
    pub max_dimension: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("the body is empty")]
    Empty,
    #[error("the data is not an image in a supported format (JPEG, PNG, WebP, BMP, GIF, TIFF)")]
    UnknownFormat,
    #[error("the image is {width}x{height} pixels, over the limit of {limit}")]
    TooLarge { width: u32, height: u32, limit: String },
    /// The decoder stopped at a limit before the size was known (an allocation in a decoder's own format).
    #[error("the image is over the decoder's limits ({0})")]
    OverDecoderLimit(String),
    #[error("the image cannot be decoded: {0}")]
    Undecodable(String),
}

const FORMATS: [ImageFormat; 6] =
    [ImageFormat::Jpeg, ImageFormat::Png, ImageFormat::WebP, ImageFormat::Bmp, ImageFormat::Gif, ImageFormat::Tiff];

/// Decodes an uploaded file into an upright RGB image.
pub fn decode(bytes: &[u8], limits: DecodeLimits) -> Result<RgbImage, ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty);
    }
    let mut reader = ImageReader::new(Cursor::new(bytes)).with_guessed_format().map_err(|e| ImageError::Undecodable(e.to_string()))?;
    let reader_format = reader.format();
    match reader_format {
        Some(ImageFormat::Jpeg) if !jpeg_is_complete(bytes) => {
            return Err(ImageError::Undecodable("the JPEG data is truncated (no end-of-image marker after the last scan)".into()));
        }
        Some(f) if FORMATS.contains(&f) => {}
        _ => return Err(ImageError::UnknownFormat),
    }
    // The size from the header alone (no pixel is decoded), so an oversized upload is refused naming its size.
    let header = ImageReader::new(Cursor::new(bytes)).with_guessed_format().ok().and_then(|r| r.into_dimensions().ok());
    if let Some((w, h)) = header
        && (w > limits.max_dimension || h > limits.max_dimension || w as u64 * h as u64 > limits.max_pixels)
    {
        let limit = format!("{} pixels and {} per side", limits.max_pixels, limits.max_dimension);
        return Err(ImageError::TooLarge { width: w, height: h, limit });
    }
    let mut l = image::Limits::default();
    l.max_image_width = Some(limits.max_dimension);
    l.max_image_height = Some(limits.max_dimension);
    // Decoded RGBA16 at the pixel limit, plus slack for the decoder's own buffers.
    l.max_alloc = Some(limits.max_pixels.saturating_mul(8).saturating_add(64 << 20));
    reader.limits(l);
    let mut decoder = reader.into_decoder().map_err(|e| too_large_or(e, limits))?;
    let (w, h) = decoder.dimensions();
    if w as u64 * h as u64 > limits.max_pixels {
        return Err(ImageError::TooLarge { width: w, height: h, limit: format!("{} pixels", limits.max_pixels) });
    }
    if w == 0 || h == 0 {
        return Err(ImageError::Undecodable("zero width or height".into()));
    }
    let orientation = decoder.orientation().unwrap_or(image::metadata::Orientation::NoTransforms);
    let libjpeg = if reader_format == Some(ImageFormat::Jpeg) { decode_jpeg_as_libjpeg_turbo(bytes)? } else { None };
    let mut img = match libjpeg {
        Some(rgb) => DynamicImage::ImageRgb8(rgb),
        None => DynamicImage::from_decoder(decoder).map_err(|e| too_large_or(e, limits))?,
    };
    img.apply_orientation(orientation);
    Ok(img.to_rgb8())
}

/// A baseline or progressive JPEG in YCbCr or greyscale, decoded by libjpeg-turbo's decoder (the MozJPEG fork,
/// built from source by the `mozjpeg` crate: its accurate integer IDCT and "fancy" triangle-filter chroma
/// upsampling), so that the pixels are the ones OpenCV's `imread` and PIL's `Image.open` produce: the exporters'
/// own predictors (Ultralytics, transformers, torchvision) read photos with those. The `image` crate's decoder
/// differs from them by up to 3/255 per channel, enough to move a detector's score across its threshold
/// (tests/detection.rs). `None` for other colour spaces (CMYK, YCCK), which the `image` crate decodes. libjpeg reports
/// errors by unwinding (the crate's error manager), caught here.
fn decode_jpeg_as_libjpeg_turbo(bytes: &[u8]) -> Result<Option<RgbImage>, ImageError> {
    let run = || -> std::io::Result<Option<RgbImage>> {
        let d = mozjpeg::Decompress::new_mem(bytes)?;
        if !matches!(d.color_space(), mozjpeg::ColorSpace::JCS_YCbCr | mozjpeg::ColorSpace::JCS_GRAYSCALE | mozjpeg::ColorSpace::JCS_RGB) {
            return Ok(None);
        }
        let mut started = d.rgb()?;
        let (w, h) = (started.width() as u32, started.height() as u32);
        let data = started.read_scanlines::<u8>()?;
        started.finish()?;
        Ok(RgbImage::from_raw(w, h, data))
    };
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
        Ok(Ok(Some(img))) => Ok(Some(img)),
        Ok(Ok(None)) => Ok(None),
        Ok(Err(e)) => Err(ImageError::Undecodable(format!("JPEG: {e}"))),
        Err(panic) => {
            let msg = panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()));
            Err(ImageError::Undecodable(format!("JPEG: {}", msg.unwrap_or_else(|| "libjpeg stopped".into()))))
        }
    }
}

/// The JPEG decoder fills missing data with grey instead of failing, so a truncated upload would be explained
/// as if it were whole. A complete file has an end-of-image marker (FF D9) after its last start-of-scan
/// (FF DA); markers cannot occur inside entropy-coded data, and an EXIF thumbnail's EOI comes before the main
/// image's scans.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let last = |marker: u8| bytes.windows(2).rposition(|w| w[0] == 0xFF && w[1] == marker);
    match (last(0xDA), last(0xD9)) {
        (Some(sos), Some(eoi)) => eoi > sos,
        _ => false,
    }
}

fn too_large_or(e: image::ImageError, limits: DecodeLimits) -> ImageError {
    match e {
        image::ImageError::Limits(l) => {
            ImageError::OverDecoderLimit(format!("{} pixels and {} per side; {l}", limits.max_pixels, limits.max_dimension))
        }
        other => ImageError::Undecodable(other.to_string()),
    }
}

/// Resizes with PyTorch's antialiased bilinear filter on 8-bit images, bit for bit: what
/// `torch.nn.functional.interpolate(..., mode="bilinear", antialias=True)` computes on a uint8 tensor, and with it
/// `torchvision.transforms.v2.functional.resize` (antialias is its default) and transformers' image processors,
/// which resize with torchvision (tests/detr.rs checks DETR's processor on seven photos). The filter is a
/// triangle stretched over the source pixels a destination pixel covers (so it averages when shrinking), each
/// axis a separate pass, horizontal first, through 8-bit intermediate pixels; weights in float64, normalised, then
/// fixed point with as many fraction bits as keep the largest weight in 15 bits (Pillow-SIMD's scheme, which
/// PyTorch's kernel follows), rounded half up.
pub fn resize(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    if img.dimensions() == (width, height) {
        return img.clone();
    }
    let (w0, h0) = img.dimensions();
    let src = img.as_raw();
    // Horizontal pass: h0 rows of `width` pixels (skipped when the width is unchanged).
    let horizontal = if w0 == width {
        src.clone()
    } else {
        let taps = TorchTaps::new(w0, width);
        let mut out = vec![0u8; h0 as usize * width as usize * 3];
        for (row, dst) in src.chunks_exact(w0 as usize * 3).zip(out.chunks_exact_mut(width as usize * 3)) {
            for (x, px) in dst.chunks_exact_mut(3).enumerate() {
                let (first, weights) = taps.of(x);
                let mut acc = [taps.half(); 3];
                for (p, &w) in row[first * 3..(first + weights.len()) * 3].chunks_exact(3).zip(weights) {
                    acc[0] += i32::from(p[0]) * w;
                    acc[1] += i32::from(p[1]) * w;
                    acc[2] += i32::from(p[2]) * w;
                }
                for c in 0..3 {
                    px[c] = taps.finish(acc[c]);
                }
            }
        }
        out
    };
    if h0 == height {
        return RgbImage::from_raw(width, height, horizontal).expect("w*h*3 bytes. This is a bug.");
    }
    // Vertical pass: each output row a weighted sum of whole source rows.
    let taps = TorchTaps::new(h0, height);
    let stride = width as usize * 3;
    let mut out = vec![0u8; height as usize * stride];
    let mut acc = vec![0i32; stride];
    for (y, dst) in out.chunks_exact_mut(stride).enumerate() {
        let (first, weights) = taps.of(y);
        acc.fill(taps.half());
        for (j, &w) in weights.iter().enumerate() {
            let row = &horizontal[(first + j) * stride..(first + j + 1) * stride];
            for (a, &p) in acc.iter_mut().zip(row) {
                *a += i32::from(p) * w;
            }
        }
        for (d, &a) in dst.iter_mut().zip(&acc) {
            *d = taps.finish(a);
        }
    }
    RgbImage::from_raw(width, height, out).expect("w*h*3 bytes. This is a bug.")
}

/// One axis of PyTorch's antialiased bilinear resize of 8-bit images (ATen's `_compute_index_ranges_int16_weights`
/// and `_compute_indices_min_size_weights_aa`): per destination index, the first source index and the
/// fixed-point weights, and the number of fraction bits.
struct TorchTaps {
    ranges: Vec<(usize, std::ops::Range<usize>)>,
    weights: Vec<i32>,
    precision: u32,
}

impl TorchTaps {
    fn new(src: u32, dst: u32) -> TorchTaps {
        let scale = src as f64 / dst as f64;
        let (support, invscale) = if scale >= 1.0 { (scale, 1.0 / scale) } else { (1.0, 1.0) };
        let mut ranges = Vec::with_capacity(dst as usize);
        let mut float = Vec::new();
        for i in 0..dst {
            let center = scale * (i as f64 + 0.5);
            // C's casts: toward zero.
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xsize = ((center + support + 0.5) as i64).min(src as i64) - xmin;
            let start = float.len();
            let w: Vec<f64> = (0..xsize.max(0)).map(|j| (1.0 - (((j + xmin) as f64 - center + 0.5) * invscale).abs()).max(0.0)).collect();
            let total: f64 = w.iter().sum();
            float.extend(w.iter().map(|v| if total != 0.0 { v / total } else { *v }));
            ranges.push((xmin as usize, start..float.len()));
        }
        let wmax = float.iter().copied().fold(0.0f64, f64::max);
        let mut precision = 0;
        while precision < 22 && ((0.5 + wmax * (1u64 << (precision + 1)) as f64) as i64) < (1 << 15) {
            precision += 1;
        }
        let one = (1u64 << precision) as f64;
        let weights = float.iter().map(|&v| if v < 0.0 { (-0.5 + v * one) as i32 } else { (0.5 + v * one) as i32 }).collect();
        TorchTaps { ranges, weights, precision }
    }

    fn of(&self, i: usize) -> (usize, &[i32]) {
        let (first, r) = &self.ranges[i];
        (*first, &self.weights[r.clone()])
    }

    fn half(&self) -> i32 {
        if self.precision == 0 { 0 } else { 1 << (self.precision - 1) }
    }

    /// The weights sum to 2^precision <= 2^22 and pixels are at most 255, so an i32 accumulator (as PyTorch's)
    /// cannot overflow.
    fn finish(&self, acc: i32) -> u8 {
        (acc >> self.precision).clamp(0, 255) as u8
    }
}

/// The order of the colour channels a model was trained on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelOrder {
    #[default]
    Rgb,
    /// Caffe-style models (and Keras' `preprocess_input` in "caffe" mode) take blue, green, red.
    Bgr,
}

/// How an upload is brought to the model's input size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResizePolicy {
    /// Both sides scaled to the input size; the aspect ratio is not kept.
    #[default]
    Stretch,
    /// torchvision's `Resize(s)` then `CenterCrop((h, w))`, the usual ImageNet evaluation: the shorter side
    /// scaled to `s` (the longer one in proportion, truncated), then the centre `h x w` cut out.
    ShorterSideThenCenterCrop,
    /// Ultralytics' letterbox (crate::letterbox): the aspect ratio kept, OpenCV's bilinear resize, grey padding.
    Letterbox,
    /// Ultralytics' `LetterBox(scale_fill=True)`, what its RT-DETR predictor uses: both sides scaled to the input
    /// with OpenCV's bilinear resize (no antialiasing), no padding.
    ScaleFill,
}

/// How pixels become the model's input besides mean and std: size policy, channel order and pixel range.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct PixelFormat {
    pub channel_order: ChannelOrder,
    /// 1: pixels in [0, 1] (torchvision); 255: pixels in [0, 255] (Caffe, Keras).
    pub scale: f32,
    pub resize: ResizePolicy,
    /// For [`ResizePolicy::ShorterSideThenCenterCrop`]: the shorter side before the crop; `None`: the input's
    /// larger side x 256 / 224, rounded (256 for 224, torchvision's evaluation ratio).
    pub resize_shorter_side: Option<u32>,
}

impl Default for PixelFormat {
    fn default() -> Self {
        PixelFormat { channel_order: ChannelOrder::Rgb, scale: 1.0, resize: ResizePolicy::Stretch, resize_shorter_side: None }
    }
}

impl PixelFormat {
    /// The shorter side before a centre crop to `width x height`: the configured one, else torchvision's ratio.
    pub fn shorter_side(&self, width: u32, height: u32) -> u32 {
        self.resize_shorter_side.unwrap_or_else(|| default_shorter_side(width, height))
    }
}

/// The part of the upload the model sees, in upload pixels (fractional: a crop edge falls between pixels of
/// the upload). The whole upload when stretched.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Region {
    pub x: f64,
    pub y: f64,
    pub width: f64,
    pub height: f64,
}

impl Region {
    /// The region rounded to whole pixels inside a `width x height` upload: (x0, y0, x1, y1), end exclusive,
    /// never empty.
    pub fn pixels(&self, width: u32, height: u32) -> (u32, u32, u32, u32) {
        let clamp = |v: f64, hi: u32| (v.round().max(0.0) as u32).min(hi);
        let (x0, y0) = (clamp(self.x, width.saturating_sub(1)), clamp(self.y, height.saturating_sub(1)));
        let x1 = clamp(self.x + self.width, width).max(x0 + 1);
        let y1 = clamp(self.y + self.height, height).max(y0 + 1);
        (x0, y0, x1, y1)
    }
}

/// The image at the model's input size (`width x height`) under `px.resize`, and the region of `img` it shows.
pub fn to_model_size(img: &RgbImage, width: u32, height: u32, px: PixelFormat) -> (RgbImage, Region) {
    let (w, h) = img.dimensions();
    let whole = Region { x: 0.0, y: 0.0, width: w as f64, height: h as f64 };
    match px.resize {
        ResizePolicy::Stretch => (resize(img, width, height), whole),
        ResizePolicy::ScaleFill if img.dimensions() == (width, height) => (img.clone(), whole),
        ResizePolicy::ScaleFill => (crate::letterbox::resize_linear(img, width, height), whole),
        ResizePolicy::Letterbox => {
            // The input shows the upload and padding around it: the region runs past the upload's edges.
            let (boxed, p) = crate::letterbox::letterbox(img, width, height);
            let region = Region { x: -p.pad_x / p.gain_x, y: -p.pad_y / p.gain_y, width: width as f64 / p.gain_x, height: height as f64 / p.gain_y };
            (boxed, region)
        }
        ResizePolicy::ShorterSideThenCenterCrop => {
            let shorter = px.shorter_side(width, height);
            let (nw, nh) = shorter_side_size(w, h, shorter);
            let resized = resize(img, nw, nh);
            // torchvision's center_crop: int(round((size - crop) / 2.0)), Python's round (ties to even).
            let left = ((nw.saturating_sub(width)) as f64 / 2.0).round_ties_even() as u32;
            let top = ((nh.saturating_sub(height)) as f64 / 2.0).round_ties_even() as u32;
            let (cw, ch) = (width.min(nw), height.min(nh));
            let crop = image::imageops::crop_imm(&resized, left, top, cw, ch).to_image();
            let (sx, sy) = (nw as f64 / w as f64, nh as f64 / h as f64);
            let region = Region { x: left as f64 / sx, y: top as f64 / sy, width: cw as f64 / sx, height: ch as f64 / sy };
            // A configured shorter side below the input size would leave the crop short; configuration refuses it.
            let crop = if (cw, ch) == (width, height) { crop } else { resize(&crop, width, height) };
            (crop, region)
        }
    }
}

/// torchvision's evaluation ratio: the shorter side is the input's larger side x 256 / 224.
pub fn default_shorter_side(width: u32, height: u32) -> u32 {
    (width.max(height) as f64 * 256.0 / 224.0).round() as u32
}

/// torchvision's `Resize(shorter)` size for a `w x h` image: the shorter side becomes `shorter`, the longer
/// `int(shorter * long / short)` (truncated).
pub fn shorter_side_size(w: u32, h: u32, shorter: u32) -> (u32, u32) {
    if w <= h {
        (shorter, ((shorter as u64 * h as u64) / w.max(1) as u64) as u32)
    } else {
        (((shorter as u64 * w as u64) / h.max(1) as u64) as u32, shorter)
    }
}

/// The model input `[3, H, W]` from an image already at model size: channel `c` of the input is
/// `(pixel * scale - mean[c]) / std[c]`, where the pixel (in [0, 1]) is the image's channel `c` in the model's
/// channel order (for BGR, input channel 0 is blue) and `mean` and `std` are given in that order too.
pub fn normalize(img: &RgbImage, mean: [f32; 3], std: [f32; 3], px: PixelFormat) -> Array3<f32> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut out = Array3::<f32>::zeros((3, h, w));
    let raw = img.as_raw();
    for c in 0..3 {
        let (m, s) = (mean[c], std[c]);
        let src = match px.channel_order {
            ChannelOrder::Rgb => c,
            ChannelOrder::Bgr => 2 - c,
        };
        let plane = out.index_axis_mut(ndarray::Axis(0), c).into_slice().expect("standard layout. This is a bug.");
        for (i, v) in plane.iter_mut().enumerate() {
            *v = (raw[i * 3 + src] as f32 / 255.0 * px.scale - m) / s;
        }
    }
    out
}

/// The image a preprocessed input `[3, H, W]` stands for: [`normalize`] undone, rounded and clamped to 0..=255.
pub fn denormalize(input: ndarray::ArrayView3<f32>, mean: [f32; 3], std: [f32; 3], px: PixelFormat) -> RgbImage {
    let (h, w) = (input.shape()[1], input.shape()[2]);
    let mut img = RgbImage::new(w as u32, h as u32);
    for c in 0..3 {
        let dst = match px.channel_order {
            ChannelOrder::Rgb => c,
            ChannelOrder::Bgr => 2 - c,
        };
        for ((y, x), v) in input.index_axis(ndarray::Axis(0), c).indexed_iter() {
            let byte = ((v * std[c] + mean[c]) / px.scale * 255.0).round().clamp(0.0, 255.0);
            img.get_pixel_mut(x as u32, y as u32).0[dst] = byte as u8;
        }
    }
    img
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: DecodeLimits = DecodeLimits { max_pixels: 1 << 20, max_dimension: 4096 };

    #[test]
    fn denormalize_undoes_normalize() {
        let img = RgbImage::from_fn(7, 5, |x, y| image::Rgb([(x * 30) as u8, (y * 50) as u8, 255 - (x * y) as u8]));
        let (mean, std) = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]);
        for order in [ChannelOrder::Rgb, ChannelOrder::Bgr] {
            for scale in [1.0, 255.0] {
                let px = PixelFormat { channel_order: order, scale, ..PixelFormat::default() };
                let back = denormalize(normalize(&img, mean, std, px).view(), mean, std, px);
                assert_eq!(back, img, "{order:?} scale {scale}");
            }
        }
    }

    fn png(w: u32, h: u32) -> Vec<u8> {
        let img = RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 9]));
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[test]
    fn bgr_and_255_scale_as_caffe() {
        // Keras' preprocess_input(mode="caffe"): RGB -> BGR, then subtract the BGR ImageNet mean on 0..255.
        let img = RgbImage::from_fn(2, 1, |x, _| image::Rgb([10 + x as u8, 100, 200]));
        let mean = [103.939, 116.779, 123.68];
        let px = PixelFormat { channel_order: ChannelOrder::Bgr, scale: 255.0, ..PixelFormat::default() };
        let x = normalize(&img, mean, [1.0, 1.0, 1.0], px);
        for (i, r) in [10.0f32, 11.0].into_iter().enumerate() {
            assert!((x[[0, 0, i]] - (200.0 - 103.939)).abs() < 1e-4, "blue first");
            assert!((x[[1, 0, i]] - (100.0 - 116.779)).abs() < 1e-4);
            assert!((x[[2, 0, i]] - (r - 123.68)).abs() < 1e-4, "red last");
        }
    }

    #[test]
    fn decodes_and_normalises() {
        let img = decode(&png(4, 3), LIMITS).unwrap();
        assert_eq!(img.dimensions(), (4, 3));
        let x = normalize(&img, [0.5, 0.0, 0.0], [0.5, 1.0, 1.0], PixelFormat::default());
        assert_eq!(x.shape(), &[3, 3, 4]);
        assert!((x[[0, 0, 2]] - (2.0 / 255.0 - 0.5) / 0.5).abs() < 1e-6);
        assert!((x[[1, 2, 0]] - 2.0 / 255.0).abs() < 1e-6);
    }

    /// libjpeg reports a broken stream by unwinding: every corruption of a JPEG's header and first scan bytes is
    /// answered with `Ok` or `Undecodable`, never a panic; a greyscale JPEG decodes to RGB.
    #[test]
    fn corrupt_jpeg_streams_are_errors_not_panics() {
        let img = RgbImage::from_fn(24, 16, |x, y| image::Rgb([x as u8 * 9, y as u8 * 13, 77]));
        let mut jpeg = Cursor::new(Vec::new());
        img.write_to(&mut jpeg, ImageFormat::Jpeg).unwrap();
        let jpeg = jpeg.into_inner();
        let decoded = decode(&jpeg, LIMITS).unwrap();
        assert_eq!(decoded.dimensions(), (24, 16));
        let (mut errors, mut decoded_ok) = (0, 0);
        for i in 2..jpeg.len().min(700) {
            for v in [0x00, 0xFF, jpeg[i] ^ 0x5A] {
                let mut bad = jpeg.clone();
                bad[i] = v;
                match std::panic::catch_unwind(|| decode(&bad, LIMITS)) {
                    Ok(Ok(_)) => decoded_ok += 1,
                    Ok(Err(ImageError::Undecodable(_) | ImageError::UnknownFormat | ImageError::TooLarge { .. } | ImageError::OverDecoderLimit(_))) => errors += 1,
                    Ok(Err(e)) => panic!("byte {i} = {v:#x}: unexpected {e}"),
                    Err(_) => panic!("byte {i} = {v:#x}: the decoder panicked"),
                }
            }
        }
        assert!(errors > 50 && decoded_ok > 50, "{errors} errors, {decoded_ok} decoded: the corruptions reached both outcomes");
        let grey = image::GrayImage::from_fn(8, 8, |x, _| image::Luma([x as u8 * 30]));
        let mut g = Cursor::new(Vec::new());
        grey.write_to(&mut g, ImageFormat::Jpeg).unwrap();
        let rgb = decode(&g.into_inner(), LIMITS).unwrap();
        assert!(rgb.pixels().all(|p| p[0] == p[1] && p[1] == p[2]), "grey to RGB");
    }

    #[test]
    fn refuses_garbage_empty_and_truncated() {
        assert!(matches!(decode(b"", LIMITS), Err(ImageError::Empty)));
        assert!(matches!(decode(b"hello world, not an image", LIMITS), Err(ImageError::UnknownFormat)));
        let p = png(40, 40);
        assert!(matches!(decode(&p[..p.len() / 2], LIMITS), Err(ImageError::Undecodable(_))));
        let img = RgbImage::from_fn(40, 40, |x, y| image::Rgb([x as u8 * 6, y as u8 * 6, 9]));
        let mut jpeg = Cursor::new(Vec::new());
        img.write_to(&mut jpeg, ImageFormat::Jpeg).unwrap();
        let jpeg = jpeg.into_inner();
        assert!(decode(&jpeg, LIMITS).is_ok());
        assert!(matches!(decode(&jpeg[..jpeg.len() - 40], LIMITS), Err(ImageError::Undecodable(_))));
    }

    fn crc32(data: &[u8]) -> u32 {
        let mut c = 0xffff_ffffu32;
        for &b in data {
            c ^= b as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
            }
        }
        !c
    }

    #[test]
    fn refuses_decompression_bombs_from_the_header() {
        // A PNG header claiming 50000x50000 pixels: refused before any pixel is decoded.
        let mut p = png(1, 1);
        p[16..20].copy_from_slice(&50000u32.to_be_bytes());
        p[20..24].copy_from_slice(&50000u32.to_be_bytes());
        let crc = crc32(&p[12..29]);
        p[29..33].copy_from_slice(&crc.to_be_bytes());
        let big = DecodeLimits { max_pixels: 40_000_000, max_dimension: 100_000 };
        assert!(matches!(decode(&p, big), Err(ImageError::TooLarge { width: 50000, height: 50000, .. })), "{:?}", decode(&p, big));
        // Over the side limit too: the message still names the size (it once said "0x0").
        let e = decode(&p, LIMITS).unwrap_err();
        assert!(matches!(e, ImageError::TooLarge { width: 50000, height: 50000, .. }), "{e:?}");
        assert!(e.to_string().starts_with("the image is 50000x50000 pixels, over the limit"), "{e}");
    }

    #[test]
    fn resize_keeps_size_when_equal_and_changes_it_otherwise() {
        let img = RgbImage::from_pixel(10, 6, image::Rgb([10, 20, 30]));
        assert_eq!(resize(&img, 10, 6), img);
        let r = resize(&img, 5, 3);
        assert_eq!(r.dimensions(), (5, 3));
        assert!(r.pixels().all(|p| p.0 == [10, 20, 30]));
    }
}
