//! From each (target row, method) pair's computed map to its explanation: its display at the output size and at
//! the model's input (what the metrics read), then the rendered PNGs and the raw array of the answer. The maps
//! themselves come from `methods::compute`, the one computation path; this module only turns them into displays.
//! Both stages run in parallel over the pairs, on a blocking thread.

use std::time::{Duration, Instant};

use image::RgbImage;
use ndarray::{Array2, Array3, Axis};
use rayon::prelude::*;

use super::answer::{ExplainedTarget, Explanation, RawArray};
use super::options::{RequestOptions, OutputSize};
use crate::maths::maps;
use crate::methods::metrics::Score;
use crate::methods::{self, Heatmap, Method, Returned};
use crate::preprocess;
use crate::render;

/// What an explanation shows, before rendering.
enum Shown {
    /// A [0, 1] map at the output size.
    Map(Array2<f32>),
    /// A gradient image `[H, W, 3]` in [0, 1] and its normalised magnitude, at the output size.
    Gradient { rgb: Array3<f32>, magnitude: Array2<f32> },
}

/// One pair's computed map, as the pipeline hands it over.
pub struct ComputedMap {
    /// The target row of the request's explain pass, and the class it explains.
    pub row: usize,
    pub class: usize,
    pub method: Method,
    pub computed: methods::Computed,
}

/// One explanation between its computation and its rendering.
pub struct Prepared {
    method: Method,
    /// The target row of the request's explain pass.
    pub row: usize,
    /// The class the row explains.
    pub class: usize,
    raw: RawArray,
    shown: Shown,
    /// The map at the model's input size, normalised to [0, 1]: what the metrics rank and multiply with.
    pub model_map: Array2<f32>,
    returned: Returned,
    /// The metrics computed on it (the pipeline runs their passes between preparing and rendering).
    pub scores: Vec<Score>,
}

struct Sizes {
    /// The display's size (the model's input, the upload, or a crop of it).
    display: (usize, usize),
    model: (usize, usize),
}

fn raw_array<D: ndarray::Dimension>(a: &ndarray::Array<f32, D>) -> RawArray {
    RawArray { shape: a.shape().to_vec(), values: a.as_standard_layout().iter().copied().collect() }
}

fn prepare(c: ComputedMap, sizes: Sizes) -> Prepared {
    let (oh, ow) = sizes.display;
    let model_size = sizes.model;
    let ComputedMap { row, class, method, computed } = c;
    let (raw, shown, model_map) = match computed.map {
        methods::RawMap::Cam(raw) => {
            let shown = Shown::Map(maps::display_map(&raw, oh, ow));
            let model_map = maps::display_map(&raw, model_size.0, model_size.1);
            (raw_array(&raw), shown, model_map)
        }
        // Integrated gradients' attribution is shown as Captum shows it: the channel-summed magnitude as a heatmap.
        methods::RawMap::Gradient(raw) if method.heatmap == Heatmap::SummedMagnitude => {
            let summed = raw.mapv(f32::abs).sum_axis(Axis(0));
            let shown = Shown::Map(maps::display_map(&summed, oh, ow));
            let model_map = maps::display_map(&summed, model_size.0, model_size.1);
            (raw_array(&raw), shown, model_map)
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
            (raw_array(&raw), Shown::Gradient { rgb, magnitude }, model_map)
        }
    };
    Prepared { method, row, class, raw, shown, model_map, returned: computed.returned, scores: vec![] }
}

fn render_one(p: Prepared, options: &RequestOptions, targets: &[ExplainedTarget], base: &RgbImage) -> Explanation {
    let target = targets[p.row].clone();
    let o = options.outputs;
    let (map, heat) = match &p.shown {
        Shown::Map(m) => (m, o.heatmap.then(|| render::colorize(m, options.colormap))),
        Shown::Gradient { rgb, magnitude } => (magnitude, o.heatmap.then(|| render::rgb_from_unit(rgb))),
    };
    let overlay = o.overlay.then(|| {
        let colored = match (&p.shown, &heat) {
            (Shown::Map(_), Some(h)) => h.clone(),
            _ => render::colorize(map, options.colormap),
        };
        render::png_rgb(&render::overlay(base, &colored, options.alpha))
    });
    let mut scores = p.scores;
    if !o.curves {
        scores.iter_mut().for_each(|s| s.curve = None);
    }
    Explanation {
        method: p.method,
        layer: p.method.uses_layer.then(|| options.layer.clone()),
        target,
        heatmap_png: heat.map(|h| render::png_rgb(&h)),
        overlay_png: overlay,
        mask_png: o.mask.then(|| render::png_gray(&render::mask(map))),
        raw: o.raw.then_some(p.raw),
        peak: maps::peak(map),
        bbox: maps::bbox(map, 0.15),
        scores,
        returned: p.returned,
    }
}

/// Every pair's display, prepared in parallel; returns them with the time taken.
pub fn prepare_all(options: &RequestOptions, computed: Vec<ComputedMap>, orig: &RgbImage, model_rgb: &RgbImage, region: preprocess::Region) -> (Vec<Prepared>, Duration) {
    // At `size=original` the maps cover the part of the upload the model saw (all of it unless cropped), in the
    // upload's pixels; outside a crop they are zero (gradient images neutral grey).
    let model_size = (model_rgb.height() as usize, model_rgb.width() as usize);
    let t0 = Instant::now();
    // A letterboxed input shows the upload inside padding: at `size=original` each map is cut to the upload's part
    // of the input, then resized to the upload.
    let padded = region.x < -0.5 || region.y < -0.5;
    if options.size == OutputSize::Original && padded {
        let (ow, oh) = (orig.width() as f64, orig.height() as f64);
        let (sx, sy) = (model_size.1 as f64 / region.width, model_size.0 as f64 / region.height);
        let clampi = |v: f64, hi: usize| (v.round().max(0.0) as usize).min(hi);
        let (x0, y0) = (clampi(-region.x * sx, model_size.1 - 1), clampi(-region.y * sy, model_size.0 - 1));
        let (x1, y1) = (clampi((ow - region.x) * sx, model_size.1).max(x0 + 1), clampi((oh - region.y) * sy, model_size.0).max(y0 + 1));
        let upload = (orig.height() as usize, orig.width() as usize);
        let prepared =
            computed.into_par_iter().map(|c| unpad(prepare(c, Sizes { display: model_size, model: model_size }), (y0, x0, y1, x1), upload)).collect();
        return (prepared, t0.elapsed());
    }
    let (size, placed) = match options.size {
        OutputSize::Model => (model_size, None),
        OutputSize::Original => {
            let (x0, y0, x1, y1) = region.pixels(orig.width(), orig.height());
            let full = (x0, y0, x1, y1) == (0, 0, orig.width(), orig.height());
            let at = (!full).then_some(((y0 as usize, x0 as usize), ((y1 - y0) as usize, (x1 - x0) as usize)));
            ((orig.height() as usize, orig.width() as usize), at)
        }
    };
    let prepared: Vec<Prepared> = computed
        .into_par_iter()
        .map(|c| match placed {
            None => prepare(c, Sizes { display: size, model: model_size }),
            Some((at, inner)) => place(prepare(c, Sizes { display: inner, model: model_size }), at, size),
        })
        .collect();
    (prepared, t0.elapsed())
}

/// Renders every prepared explanation in parallel; returns them with the time taken. `targets` says what each row
/// of the explain pass explains (the task's description of it).
pub fn render_all(prepared: Vec<Prepared>, options: &RequestOptions, targets: &[ExplainedTarget], orig: &RgbImage, model_rgb: &RgbImage) -> (Vec<Explanation>, Duration) {
    let base = match options.size {
        OutputSize::Model => model_rgb,
        OutputSize::Original => orig,
    };
    let t0 = Instant::now();
    let explanations: Vec<Explanation> = prepared.into_par_iter().map(|p| render_one(p, options, targets, base)).collect();
    (explanations, t0.elapsed())
}

/// A prepared display of the crop's size, placed at `at` (row, column) on a canvas of `size`: maps are zero
/// outside, gradient images neutral grey (0.5, what `deprocess` makes of a zero gradient) with zero magnitude.
fn place(p: Prepared, at: (usize, usize), size: (usize, usize)) -> Prepared {
    let (y0, x0) = at;
    let shown = match p.shown {
        Shown::Map(m) => {
            let mut canvas = Array2::zeros(size);
            canvas.slice_mut(ndarray::s![y0..y0 + m.nrows(), x0..x0 + m.ncols()]).assign(&m);
            Shown::Map(canvas)
        }
        Shown::Gradient { rgb, magnitude } => {
            let (h, w) = magnitude.dim();
            let mut rgb_canvas = Array3::from_elem((size.0, size.1, 3), 0.5f32);
            rgb_canvas.slice_mut(ndarray::s![y0..y0 + h, x0..x0 + w, ..]).assign(&rgb);
            let mut mag = Array2::zeros(size);
            mag.slice_mut(ndarray::s![y0..y0 + h, x0..x0 + w]).assign(&magnitude);
            Shown::Gradient { rgb: rgb_canvas, magnitude: mag }
        }
    };
    Prepared { shown, ..p }
}

/// A prepared display at the model's input size, cut to `(y0, x0, y1, x1)` (the upload's part of a letterboxed
/// input) and resized to the upload's `size`.
fn unpad(p: Prepared, (y0, x0, y1, x1): (usize, usize, usize, usize), size: (usize, usize)) -> Prepared {
    let shown = match p.shown {
        Shown::Map(m) => Shown::Map(maps::resize_bilinear(m.slice(ndarray::s![y0..y1, x0..x1]), size.0, size.1)),
        Shown::Gradient { rgb, magnitude } => {
            let chw = rgb.slice(ndarray::s![y0..y1, x0..x1, ..]).permuted_axes([2, 0, 1]);
            let rgb = maps::resize_channels(chw, size.0, size.1).permuted_axes([1, 2, 0]).as_standard_layout().to_owned();
            Shown::Gradient { rgb, magnitude: maps::resize_bilinear(magnitude.slice(ndarray::s![y0..y1, x0..x1]), size.0, size.1) }
        }
    };
    Prepared { shown, ..p }
}
