//! From the arrays of a request's passes to its explanations: each (target row, method) pair's raw map, its
//! display at the output size and at the model's input (what the metrics read), then the rendered PNGs and raw
//! arrays of the answer. The two stages run in parallel over the pairs, on a blocking thread.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use image::RgbImage;
use ndarray::{Array2, Array3, Axis};
use rayon::prelude::*;

use super::options::{ExplainOptions, OutputSize};
use super::pipeline::{softmax, ServiceError};
use crate::api::wire::{Explanation, RawArray, TargetInfo};
use crate::backend::engine::{BatchOutput, ModelInfo};
use crate::explain::maps;
use crate::methods::{self, Heatmap, Method};
use crate::preprocess;
use crate::render;

/// What an explanation shows, before rendering.
enum Display {
    /// A [0, 1] map at the output size.
    Map(Array2<f32>),
    /// A gradient image `[H, W, 3]` in [0, 1] and its normalised magnitude, at the output size.
    Gradient { rgb: Array3<f32>, magnitude: Array2<f32> },
}

/// One explanation between its computation and its rendering.
pub struct Prepared {
    method: Method,
    /// The target row of the request's explain pass.
    pub row: usize,
    raw: (Vec<usize>, Vec<f32>),
    display: Display,
    /// The map at the model's input size, normalised to [0, 1]: what the metrics rank and multiply with.
    pub model_map: Array2<f32>,
    extra: methods::Extra,
    /// The metrics computed on it (the pipeline runs their passes between preparing and rendering).
    pub scores: Vec<methods::metrics::Score>,
}

impl Prepared {
    /// The class this explanation's row explains.
    pub fn class(&self, out: &BatchOutput) -> usize {
        out.targets.as_deref().and_then(|t| t.get(self.row).copied()).unwrap_or(0)
    }
}

/// The raw map of one (row, method): the multi-pass method's own result, or from the request's explain pass.
fn raw_map(method: Method, info: &ModelInfo, layer: &str, row: usize, out: &BatchOutput, extra: Option<methods::RawMap>) -> Result<methods::RawMap, ServiceError> {
    match extra {
        Some(r) => Ok(r),
        None => methods::one_pass(method, info, layer, out, row),
    }
}

struct Sizes {
    /// The display's size (the model's input, the upload, or a crop of it).
    display: (usize, usize),
    model: (usize, usize),
}

fn prepare(method: Method, info: &ModelInfo, layer: &str, row: usize, out: &BatchOutput, sizes: Sizes, extra: Option<methods::Computed>) -> Result<Prepared, ServiceError> {
    let (size, model_size) = (sizes.display, sizes.model);
    let (oh, ow) = size;
    let (raw_extra, extra) = match extra {
        Some((r, e)) => (Some(r), e),
        None => (None, methods::Extra::default()),
    };
    match raw_map(method, info, layer, row, out, raw_extra)? {
        methods::RawMap::Cam(raw) => {
            let display = Display::Map(maps::display_map(&raw, oh, ow));
            let model_map = maps::display_map(&raw, model_size.0, model_size.1);
            let shape = raw.shape().to_vec();
            Ok(Prepared { method, row, raw: (shape, raw.into_raw_vec_and_offset().0), display, model_map, extra, scores: vec![] })
        }
        // Integrated gradients' attribution is shown as Captum shows it: the channel-summed magnitude as a heatmap.
        methods::RawMap::Gradient(raw) if method.heatmap == Heatmap::SummedMagnitude => {
            let summed = raw.mapv(f32::abs).sum_axis(Axis(0));
            let display = Display::Map(maps::display_map(&summed, oh, ow));
            let model_map = maps::display_map(&summed, model_size.0, model_size.1);
            let shape = raw.shape().to_vec();
            let raw = (shape, raw.as_standard_layout().iter().copied().collect());
            Ok(Prepared { method, row, raw, display, model_map, extra, scores: vec![] })
        }
        methods::RawMap::Gradient(raw) => {
            let mut rgb = maps::deprocess(raw.view());
            let mut magnitude = maps::magnitude(raw.view());
            let model_map = if magnitude.dim() == model_size { magnitude.clone() } else { maps::resize_bilinear(magnitude.view(), model_size.0, model_size.1) };
            if magnitude.dim() != (oh, ow) {
                let chw = rgb.permuted_axes([2, 0, 1]);
                rgb = maps::resize_channels(chw.view(), oh, ow).permuted_axes([1, 2, 0]).as_standard_layout().to_owned();
                magnitude = maps::resize_bilinear(magnitude.view(), oh, ow);
            }
            let shape = raw.shape().to_vec();
            let raw = (shape, raw.as_standard_layout().iter().copied().collect());
            Ok(Prepared { method, row, raw, display: Display::Gradient { rgb, magnitude }, model_map, extra, scores: vec![] })
        }
    }
}

fn render_one(p: Prepared, info: &ModelInfo, options: &ExplainOptions, out: &BatchOutput, scores: &[Vec<f32>], base: &RgbImage) -> Explanation {
    let class = p.class(out);
    let target = TargetInfo { index: class, label: info.label(class).map(str::to_string), score: scores[p.row][class] };
    let o = options.outputs;
    let png = |b: Vec<u8>| render::base64(&b);
    let (map, heat) = match &p.display {
        Display::Map(m) => (m, o.heatmap.then(|| render::colorize(m, options.colormap))),
        Display::Gradient { rgb, magnitude } => (magnitude, o.heatmap.then(|| render::rgb_from_unit(rgb))),
    };
    let overlay = o.overlay.then(|| {
        let colored = match (&p.display, &heat) {
            (Display::Map(_), Some(h)) => h.clone(),
            _ => render::colorize(map, options.colormap),
        };
        png(render::png_rgb(&render::overlay(base, &colored, options.alpha)))
    });
    let raw = o.raw.then(|| {
        let mut bytes = Vec::with_capacity(p.raw.1.len() * 4);
        for v in &p.raw.1 {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        RawArray { shape: p.raw.0.clone(), dtype: "float32", data: render::base64(&bytes) }
    });
    let metrics = (!p.scores.is_empty()).then(|| p.scores.iter().map(|s| (s.metric.as_str(), s.value)).collect());
    let curves = (o.curves && !p.scores.is_empty())
        .then(|| p.scores.iter().filter_map(|s| Some((s.metric.as_str(), s.curve.clone()?))).collect());
    Explanation {
        method: p.method,
        layer: p.method.uses_layer.then(|| options.layer.clone()),
        target,
        heatmap_png: heat.map(|h| png(render::png_rgb(&h))),
        overlay_png: overlay,
        mask_png: o.mask.then(|| png(render::png_gray(&render::mask(map)))),
        raw,
        peak: maps::peak(map),
        bbox: maps::bbox(map, 0.15),
        metrics,
        curves,
        seed: p.extra.seed,
        channels: p.extra.channels,
    }
}

/// Every (target row, method) pair's map, computed in parallel (multi-pass methods' maps given in `extras`);
/// returns them with the time taken.
pub fn prepare_all(
    info: &ModelInfo,
    options: &ExplainOptions,
    out: &BatchOutput,
    mut extras: BTreeMap<(usize, Method), methods::Computed>,
    orig: &RgbImage,
    model_rgb: &RgbImage,
    region: preprocess::Region,
) -> Result<(Vec<Prepared>, Duration), ServiceError> {
    // At `size=original` the maps cover the part of the upload the model saw (all of it unless cropped), in the
    // upload's pixels; outside a crop they are zero (gradient images neutral grey).
    let model_size = (model_rgb.height() as usize, model_rgb.width() as usize);
    let (size, placed) = match options.size {
        OutputSize::Model => (model_size, None),
        OutputSize::Original => {
            let (x0, y0, x1, y1) = region.pixels(orig.width(), orig.height());
            let full = (x0, y0, x1, y1) == (0, 0, orig.width(), orig.height());
            let at = (!full).then_some(((y0 as usize, x0 as usize), ((y1 - y0) as usize, (x1 - x0) as usize)));
            ((orig.height() as usize, orig.width() as usize), at)
        }
    };
    let t0 = Instant::now();
    let items: Vec<(usize, Method, Option<methods::Computed>)> = (0..out.len())
        .flat_map(|r| options.methods.iter().map(move |&m| (r, m)))
        .map(|(r, m)| (r, m, extras.remove(&(r, m))))
        .collect();
    let layer = options.layer.as_str();
    let prepared: Vec<Prepared> = items
        .into_par_iter()
        .map(|(r, m, extra)| match placed {
            None => prepare(m, info, layer, r, out, Sizes { display: size, model: model_size }, extra),
            Some((at, inner)) => prepare(m, info, layer, r, out, Sizes { display: inner, model: model_size }, extra).map(|p| place(p, at, size)),
        })
        .collect::<Result<_, _>>()?;
    Ok((prepared, t0.elapsed()))
}

/// Renders every prepared explanation in parallel; returns them with the time taken.
pub fn render_all(prepared: Vec<Prepared>, info: &ModelInfo, options: &ExplainOptions, out: &BatchOutput, orig: &RgbImage, model_rgb: &RgbImage) -> (Vec<Explanation>, Duration) {
    let base = match options.size {
        OutputSize::Model => model_rgb,
        OutputSize::Original => orig,
    };
    let scores: Vec<Vec<f32>> = out.logits.outer_iter().map(softmax).collect();
    let t0 = Instant::now();
    let explanations: Vec<Explanation> = prepared.into_par_iter().map(|p| render_one(p, info, options, out, &scores, base)).collect();
    (explanations, t0.elapsed())
}

/// A prepared display of the crop's size, placed at `at` (row, column) on a canvas of `size`: maps are zero
/// outside, gradient images neutral grey (0.5, what `deprocess` makes of a zero gradient) with zero magnitude.
fn place(p: Prepared, at: (usize, usize), size: (usize, usize)) -> Prepared {
    let (y0, x0) = at;
    let display = match p.display {
        Display::Map(m) => {
            let mut canvas = Array2::zeros(size);
            canvas.slice_mut(ndarray::s![y0..y0 + m.nrows(), x0..x0 + m.ncols()]).assign(&m);
            Display::Map(canvas)
        }
        Display::Gradient { rgb, magnitude } => {
            let (h, w) = magnitude.dim();
            let mut rgb_canvas = Array3::from_elem((size.0, size.1, 3), 0.5f32);
            rgb_canvas.slice_mut(ndarray::s![y0..y0 + h, x0..x0 + w, ..]).assign(&rgb);
            let mut mag = Array2::zeros(size);
            mag.slice_mut(ndarray::s![y0..y0 + h, x0..x0 + w]).assign(&magnitude);
            Display::Gradient { rgb: rgb_canvas, magnitude: mag }
        }
    };
    Prepared { display, ..p }
}
