//! Score-CAM (Wang et al. 2020), as pytorch-grad-cam 1.5.7's `ScoreCAM`: each activation channel, upsampled to the
//! input size (bilinear, corners aligned, as its `UpsamplingBilinear2d`) and min-max normalised, masks the
//! model-space input; the target's logit on each masked input, softmax-normalised over the channels, is the
//! channel's weight; the map is relu(sum_k w_k A_k). The masked inputs run as batches through the batcher.

use ndarray::{Array2, Array3, ArrayView3, Axis};

use super::params::{Param, ParamKind};
use super::{Compute, Kind, MethodDef, Passes, PassesCtx, Pending, RawMap, Returned};
use crate::backend::engine::ModelInfo;
use crate::error::ServiceError;
use crate::maths::{cam, maps};

/// The channels Score-CAM masks with: all of them, or when capped the `cap` channels of highest variance over the
/// grid (a flat channel makes a blank mask and says nothing), in channel order.
pub fn channels(acts: ArrayView3<f32>, cap: Option<usize>) -> Vec<usize> {
    let k = acts.len_of(Axis(0));
    match cap {
        Some(c) if c < k => {
            let var: Vec<f64> = acts
                .outer_iter()
                .map(|a| {
                    let n = a.len() as f64;
                    let mean = a.iter().map(|&v| v as f64).sum::<f64>() / n;
                    a.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n
                })
                .collect();
            let mut order: Vec<usize> = (0..k).collect();
            order.sort_by(|&a, &b| var[b].total_cmp(&var[a]).then(a.cmp(&b)));
            let mut keep = order[..c].to_vec();
            keep.sort();
            keep
        }
        _ => (0..k).collect(),
    }
}

/// Channel `k`'s mask at the input size: upsampled with corners aligned, then (m - min) / (max - min + 1e-8).
pub fn mask(acts: ArrayView3<f32>, k: usize, h: usize, w: usize) -> Array2<f32> {
    let up = maps::resize_bilinear_corners(acts.index_axis(Axis(0), k), h, w);
    let (lo, hi) = up.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    up.mapv(|v| (v - lo) / (hi - lo + 1e-8))
}

/// Score-CAM's map for target `class`, and how many channels it used.
pub async fn run(
    passes: &Passes<'_>,
    acts: ArrayView3<'_, f32>,
    input: &Array3<f32>,
    class: usize,
    cap: Option<usize>,
    label: &str,
) -> Result<(Array2<f32>, usize), ServiceError> {
    let (h, w) = (input.shape()[1], input.shape()[2]);
    let chosen = channels(acts, cap);
    let logits = passes
        .logits(chosen.len(), label, |i| {
            let m = mask(acts, chosen[i], h, w);
            input * &m.insert_axis(Axis(0))
        })
        .await?;
    let weights = crate::maths::softmax(logits.column(class));
    let mut full = vec![0f32; acts.len_of(Axis(0))];
    for (&k, &wk) in chosen.iter().zip(&weights) {
        full[k] = wk;
    }
    Ok((cam::weighted(acts, &full), chosen.len()))
}

/// Its channel cap (the highest-variance channels first). The request's value, capped further by
/// `server.scorecam_max_channels`, reaches the method only when it is below the layer's channel count
/// (`core::options` resolves it).
pub const CHANNELS: Param = Param { name: "channels", kind: ParamKind::Cap, help: "Score-CAM's channel cap (highest-variance channels first)" };

fn cap(params: &super::params::Params) -> Option<usize> {
    params.integer(&CHANNELS).map(|c| c as usize)
}

/// The registry's entry: masked forwards, one per channel used.
pub const DEF: MethodDef = MethodDef {
    cost: |info, layer, params| used_channels(info, layer, cap(params)) as u64,
    params: &[&CHANNELS],
    ..MethodDef::new("scorecam", Kind::Cam, Compute::Passes(start))
};

/// Channels of the layer Score-CAM masks with, given the request's cap.
pub fn used_channels(info: &ModelInfo, layer: &str, cap: Option<usize>) -> usize {
    let k = info.layer(layer).map_or(0, |l| l.dims[1] as usize);
    cap.map_or(k, |c| c.min(k))
}

fn start<'a>(cx: &'a PassesCtx<'a>) -> Pending<'a> {
    Box::pin(async move {
        let (map, used) = run(cx.passes, cx.acts, cx.input, cx.class, cap(cx.params), cx.label).await?;
        Ok(super::Computed { map: RawMap::Cam(map), returned: Returned { channels: Some(used), ..Default::default() } })
    })
}
