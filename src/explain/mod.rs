//! Explanation methods as pure functions of arrays (no ORT, no HTTP).
//!
//! CAM methods read the target layer's activations `A [K, h, w]` and gradients `g = dy/dA`; the gradient
//! methods read an input gradient `[C, H, W]`. Formulas follow docs/DESIGN.md §5 and pytorch-grad-cam.

pub mod cam;
pub mod maps;

use crate::onnx::rules::ReluRule;

/// Every explanation method of the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum Method {
    #[serde(rename = "gradcam")]
    GradCam,
    #[serde(rename = "gradcam++")]
    GradCamPlusPlus,
    #[serde(rename = "xgradcam")]
    XGradCam,
    #[serde(rename = "hirescam")]
    HiResCam,
    #[serde(rename = "layercam")]
    LayerCam,
    #[serde(rename = "eigencam")]
    EigenCam,
    #[serde(rename = "guided_backprop")]
    GuidedBackprop,
    #[serde(rename = "deconvnet")]
    Deconvnet,
    #[serde(rename = "saliency")]
    Saliency,
    #[serde(rename = "guided_gradcam")]
    GuidedGradCam,
}

impl Method {
    pub const ALL: [Method; 10] = [
        Method::GradCam,
        Method::GradCamPlusPlus,
        Method::XGradCam,
        Method::HiResCam,
        Method::LayerCam,
        Method::EigenCam,
        Method::GuidedBackprop,
        Method::Deconvnet,
        Method::Saliency,
        Method::GuidedGradCam,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Method::GradCam => "gradcam",
            Method::GradCamPlusPlus => "gradcam++",
            Method::XGradCam => "xgradcam",
            Method::HiResCam => "hirescam",
            Method::LayerCam => "layercam",
            Method::EigenCam => "eigencam",
            Method::GuidedBackprop => "guided_backprop",
            Method::Deconvnet => "deconvnet",
            Method::Saliency => "saliency",
            Method::GuidedGradCam => "guided_gradcam",
        }
    }

    pub fn parse(s: &str) -> Option<Method> {
        let s = s.trim().to_ascii_lowercase();
        Method::ALL.into_iter().find(|m| m.as_str() == s)
    }

    /// The input-gradient rule the method reads, if any.
    pub fn input_rule(self) -> Option<ReluRule> {
        match self {
            Method::GuidedBackprop | Method::GuidedGradCam => Some(ReluRule::Guided),
            Method::Deconvnet => Some(ReluRule::Deconvnet),
            Method::Saliency => Some(ReluRule::Plain),
            _ => None,
        }
    }

    /// True for methods whose raw output is a layer-resolution map (as opposed to an input gradient).
    pub fn is_cam(self) -> bool {
        !matches!(self, Method::GuidedBackprop | Method::Deconvnet | Method::Saliency | Method::GuidedGradCam)
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
