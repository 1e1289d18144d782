//! The input-gradient methods of the request's explain pass: guided backpropagation, deconvnet and saliency are
//! their chain's input gradient `[C, H, W]` (docs/DESIGN.md §4 for the ReLU rules); guided Grad-CAM multiplies
//! the guided gradient by the upsampled, normalised Grad-CAM.

use ndarray::Axis;

use super::{Compute, Kind, MethodDef, RawMap, Row};
use crate::error::ServiceError;
use crate::maths::{cam, maps};
use crate::onnx::rules::ReluRule;

/// A method whose map comes from the input gradient of the chain `rule`.
const fn input_gradient(name: &'static str, rule: ReluRule, f: fn(&Row<'_>) -> Result<RawMap, ServiceError>) -> MethodDef {
    MethodDef { input_rule: Some(rule), ..MethodDef::new(name, Kind::Gradient, Compute::Pass(f)) }
}

pub const GUIDED_BACKPROP: MethodDef = input_gradient("guided_backprop", ReluRule::Guided, |r| gradient(r, ReluRule::Guided));
pub const DECONVNET: MethodDef = input_gradient("deconvnet", ReluRule::Deconvnet, |r| gradient(r, ReluRule::Deconvnet));
pub const SALIENCY: MethodDef = input_gradient("saliency", ReluRule::Plain, |r| gradient(r, ReluRule::Plain));

/// Guided Grad-CAM (Selvaraju et al.): guided backpropagation times Grad-CAM, the layer's map upsampled to the
/// input (bilinear) and min-max normalised.
pub const GUIDED_GRADCAM: MethodDef =
    MethodDef { uses_layer: true, ..input_gradient("guided_gradcam", ReluRule::Guided, guided_gradcam) };

fn gradient(r: &Row<'_>, rule: ReluRule) -> Result<RawMap, ServiceError> {
    Ok(RawMap::Gradient(r.input_grad(rule)?.to_owned()))
}

fn guided_gradcam(r: &Row<'_>) -> Result<RawMap, ServiceError> {
    let g = r.input_grad(ReluRule::Guided)?;
    let (h, w) = (g.shape()[1], g.shape()[2]);
    let up = maps::normalize(&maps::resize_bilinear(cam::gradcam(r.acts, r.grads).view(), h, w));
    Ok(RawMap::Gradient(&g * &up.insert_axis(Axis(0))))
}
