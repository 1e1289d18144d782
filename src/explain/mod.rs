//! Explanation methods as pure functions of arrays (no ORT, no HTTP).
//!
//! CAM methods read the target layer's activations `A [K, h, w]` and gradients `g = dy/dA`; the gradient
//! methods read an input gradient `[C, H, W]`; the attention rollouts read a transformer's attention
//! probabilities (and their gradients) of every block. Formulas follow docs/DESIGN.md §5, docs/METHODS.md and
//! pytorch-grad-cam.

pub mod cam;
pub mod maps;
pub mod rollout;

use crate::onnx::rules::ReluRule;

/// Every explanation method of the API. [`Method::ALL`] and [`Method::as_str`] are the one list of methods and
/// names: serde, `GET /v1/models`, the CLI's `--method` values and the OIP outputs read them, and a test holds
/// openapi.yaml's `Method` enum to them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Method {
    GradCam,
    GradCamPlusPlus,
    XGradCam,
    HiResCam,
    LayerCam,
    EigenCam,
    GuidedBackprop,
    Deconvnet,
    Saliency,
    GuidedGradCam,
    AttentionRollout,
    GradientRollout,
    Cam,
    ScoreCam,
    AblationCam,
    FinerCam,
    IntegratedGradients,
    SmoothGrad,
}

impl Method {
    pub const ALL: [Method; 18] = [
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
        Method::AttentionRollout,
        Method::GradientRollout,
        Method::Cam,
        Method::ScoreCam,
        Method::AblationCam,
        Method::FinerCam,
        Method::IntegratedGradients,
        Method::SmoothGrad,
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
            Method::AttentionRollout => "attention_rollout",
            Method::GradientRollout => "gradient_rollout",
            Method::Cam => "cam",
            Method::ScoreCam => "scorecam",
            Method::AblationCam => "ablationcam",
            Method::FinerCam => "finercam",
            Method::IntegratedGradients => "integrated_gradients",
            Method::SmoothGrad => "smoothgrad",
        }
    }

    pub fn parse(s: &str) -> Option<Method> {
        let s = s.trim_start().to_ascii_lowercase();
        // `?methods=gradcam++` typed into a URL arrives as "gradcam  " ('+' is a space in a query string);
        // trimming it would silently give plain Grad-CAM.
        if s == "gradcam  " {
            return Some(Method::GradCamPlusPlus);
        }
        let s = s.trim_end();
        Method::ALL.into_iter().find(|m| m.as_str() == s)
    }

    /// What the method's map is: `cam` (the layer's grid), `gradient` (an input gradient or attribution image
    /// `[C, H, W]`; integrated gradients' heatmap is its channel-summed magnitude) or `attention` (a transformer's
    /// token grid, from every attention block).
    pub fn kind(self) -> &'static str {
        if self.is_attention() {
            "attention"
        } else if self.is_cam() {
            "cam"
        } else {
            "gradient"
        }
    }

    /// The input-gradient rule of the methods whose maps are batches of plain input gradients (integrated
    /// gradients, SmoothGrad): run in their own batches, not in the request's explain pass.
    pub fn batch_rule(self) -> Option<ReluRule> {
        matches!(self, Method::IntegratedGradients | Method::SmoothGrad).then_some(ReluRule::Plain)
    }

    /// True for the methods that need more than the request's one explain pass (methods/): extra batches of
    /// masked, ablated, interpolated or noisy inputs, or a second pass with their own seed.
    pub fn is_multipass(self) -> bool {
        matches!(self, Method::ScoreCam | Method::AblationCam | Method::FinerCam | Method::IntegratedGradients | Method::SmoothGrad)
    }

    /// The input-gradient rule the method reads from the request's explain pass, if any.
    pub fn input_rule(self) -> Option<ReluRule> {
        match self {
            Method::GuidedBackprop | Method::GuidedGradCam => Some(ReluRule::Guided),
            Method::Deconvnet => Some(ReluRule::Deconvnet),
            Method::Saliency => Some(ReluRule::Plain),
            _ => None,
        }
    }

    /// True for the CAM methods: a layer-resolution map from the layer's activations and gradients.
    pub fn is_cam(self) -> bool {
        !matches!(
            self,
            Method::GuidedBackprop | Method::Deconvnet | Method::Saliency | Method::GuidedGradCam | Method::IntegratedGradients | Method::SmoothGrad
        ) && !self.is_attention()
    }

    /// True for the methods that read every attention block of a transformer (maps on its token grid).
    pub fn is_attention(self) -> bool {
        matches!(self, Method::AttentionRollout | Method::GradientRollout)
    }
}

impl serde::Serialize for Method {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
