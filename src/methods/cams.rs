//! The one-pass CAMs: the Grad-CAM family, from the layer's activations and gradients of the request's explain
//! pass (formulas in `crate::maths::cam`, as pytorch-grad-cam 1.5.7), and Zhou et al.'s plain CAM, from the
//! weights of the global-average-pool + linear head after the layer.

use ndarray::{Array2, ArrayView3};

use super::{Compute, Kind, MethodDef, RawMap, Row};
use crate::backend::engine::ModelInfo;
use crate::error::ServiceError;
use crate::maths::cam;

/// A CAM computed from the layer's activations and gradients alone.
const fn layer_cam(name: &'static str, f: fn(ArrayView3<f32>, ArrayView3<f32>) -> Array2<f32>) -> MethodDef {
    MethodDef::new(name, Kind::Cam, Compute::Layer(f))
}

pub const GRADCAM: MethodDef = layer_cam("gradcam", cam::gradcam);
pub const GRADCAM_PLUS_PLUS: MethodDef = layer_cam("gradcam++", cam::gradcam_pp);
pub const XGRADCAM: MethodDef = layer_cam("xgradcam", cam::xgradcam);
pub const HIRESCAM: MethodDef = layer_cam("hirescam", cam::hirescam);
pub const LAYERCAM: MethodDef = layer_cam("layercam", cam::layercam);
pub const EIGENCAM: MethodDef = layer_cam("eigencam", eigencam);

/// Eigen-CAM reads the activations only.
fn eigencam(a: ArrayView3<f32>, _: ArrayView3<f32>) -> Array2<f32> {
    cam::eigencam(a)
}

/// Plain CAM (Zhou et al. 2016): relu(sum_k w_ck A_k) with the linear head's weights of the target class.
pub const CAM: MethodDef = MethodDef { refuses_at: no_linear_head, ..MethodDef::new("cam", Kind::Cam, Compute::Pass(plain_cam)) };

/// Offered only where a global-average-pool + linear head follows the layer (found when the model is loaded).
/// Why the layer has no global-average-pool + linear head after it, if it has none.
fn no_linear_head(info: &ModelInfo, layer: &str) -> Option<String> {
    info.linear_head(layer).err()
}

fn plain_cam(r: &Row<'_>) -> Result<RawMap, ServiceError> {
    let head = r.info.linear_head(r.layer).map_err(ServiceError::Unprocessable)?;
    Ok(RawMap::Cam(cam::weighted(r.acts, head.class_weights(r.class))))
}
