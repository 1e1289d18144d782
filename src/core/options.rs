//! Request options (docs/DESIGN.md §5 table): parsed from a query string, multipart text parts or a JSON body, then
//! validated against the model into an [`ExplainOptions`].

use serde::de::{Deserialize, Deserializer, Error as _, MapAccess, Visitor};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::backend::batcher::Target;
use crate::backend::engine::ModelInfo;
use crate::methods::Method;
use crate::render::Colormap;

/// An option as received, before validation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RawOptions {
    pub methods: Option<Vec<String>>,
    pub target: Option<Vec<TargetSpec>>,
    pub top_k: Option<i64>,
    pub layer: Option<String>,
    pub outputs: Option<Vec<String>>,
    pub colormap: Option<String>,
    pub alpha: Option<f64>,
    pub size: Option<String>,
    pub metrics: Option<Vec<String>>,
    pub steps: Option<i64>,
    pub samples: Option<i64>,
    pub noise: Option<f64>,
    pub seed: Option<i64>,
    pub channels: Option<i64>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum TargetSpec {
    Index(i64),
    Label(String),
}

/// An invalid option: 400 when the request is malformed, 422 when well-formed but not acceptable.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OptionError {
    #[error("{0}")]
    Malformed(String),
    #[error("{0}")]
    Invalid(String),
}

fn invalid(s: impl Into<String>) -> OptionError {
    OptionError::Invalid(s.into())
}

const KEYS: [&str; 14] =
    ["methods", "target", "top_k", "layer", "outputs", "colormap", "alpha", "size", "metrics", "steps", "samples", "noise", "seed", "channels"];

/// The most members a JSON body or JSON `options` part may have (the image and the fourteen options, each once, fit
/// with room to spare). Checked while parsing: a 20 MiB body of a million keys is refused at the 33rd, not built.
pub const MAX_JSON_MEMBERS: usize = 32;
/// The most bytes one option's value may take (a multipart text part, a JSON member's text). The image is bounded
/// by the body limit only; an option never needs more than a few hundred bytes.
pub const MAX_OPTION_BYTES: usize = 16 * 1024;

/// 400 when one option's value is over [`MAX_OPTION_BYTES`].
pub fn check_option_size(key: &str, len: usize) -> Result<(), OptionError> {
    if len > MAX_OPTION_BYTES {
        return Err(OptionError::Malformed(format!("option `{key}` is {len} bytes long; at most {MAX_OPTION_BYTES} are accepted")));
    }
    Ok(())
}

/// The members of a JSON object, in order, each value left as its JSON text (borrowed, not parsed), at most
/// [`MAX_JSON_MEMBERS`] of them. The error says what is wrong: not JSON, not an object, or too many members.
pub fn json_members(text: &[u8]) -> Result<Vec<(String, &RawValue)>, String> {
    struct Members<'a>(Vec<(String, &'a RawValue)>);
    impl<'de> Deserialize<'de> for Members<'de> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Members<'de>;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a JSON object")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members<'de>, A::Error> {
                    let mut out = Vec::new();
                    while let Some(k) = map.next_key::<String>()? {
                        if out.len() == MAX_JSON_MEMBERS {
                            return Err(A::Error::custom(format!("more than {MAX_JSON_MEMBERS} members")));
                        }
                        out.push((k, map.next_value::<&RawValue>()?));
                    }
                    Ok(Members(out))
                }
            }
            d.deserialize_map(V)
        }
    }
    if text.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err("must be a JSON object".into());
    }
    serde_json::from_slice::<Members>(text).map(|m| m.0).map_err(|e| {
        if e.is_data() { format!("has {e}") } else { format!("is not valid JSON: {e}") }
    })
}

fn list(v: &str) -> Vec<String> {
    v.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect()
}

/// Method names, left untrimmed at the end: `Method::parse` trims them, after recognising `gradcam++` typed
/// unencoded into a query string (where it arrives as "gradcam  ").
fn method_list(v: &str) -> Vec<String> {
    v.split(',').map(|s| s.trim_start().to_string()).filter(|s| !s.trim_end().is_empty()).collect()
}

fn int_text(key: &str, v: &str) -> Result<i64, OptionError> {
    v.trim().parse().map_err(|_| invalid(format!("{key} must be an integer, not `{v}`")))
}

fn int_json(key: &str, v: &Value) -> Result<i64, OptionError> {
    match v {
        Value::Number(n) => n.as_i64().ok_or_else(|| invalid(format!("{key} must be an integer, not {n}"))),
        Value::String(s) => int_text(key, s),
        _ => Err(invalid(format!("{key} must be an integer"))),
    }
}

fn target_from_str(s: &str) -> TargetSpec {
    match s.parse::<i64>() {
        Ok(i) => TargetSpec::Index(i),
        Err(_) => TargetSpec::Label(s.to_string()),
    }
}

impl RawOptions {
    /// Sets one option from a text value (query string or multipart text part). Lists are comma-separated.
    pub fn set_text(&mut self, key: &str, value: &str) -> Result<(), OptionError> {
        match key {
            "methods" | "method" => self.methods.get_or_insert_with(Vec::new).extend(method_list(value)),
            "target" | "targets" => self.target.get_or_insert_with(Vec::new).extend(list(value).iter().map(|s| target_from_str(s))),
            "top_k" => self.top_k = Some(value.trim().parse().map_err(|_| invalid(format!("top_k must be an integer, not `{value}`")))?),
            "layer" => self.layer = Some(value.to_string()),
            "outputs" | "output" => self.outputs.get_or_insert_with(Vec::new).extend(list(value)),
            "colormap" => self.colormap = Some(value.trim().to_string()),
            "alpha" => {
                self.alpha = Some(value.trim().parse().map_err(|_| invalid(format!("alpha must be a number, not `{value}`")))?)
            }
            "size" => self.size = Some(value.trim().to_string()),
            "metrics" | "metric" => self.metrics.get_or_insert_with(Vec::new).extend(list(value)),
            "steps" => self.steps = Some(int_text(key, value)?),
            "samples" => self.samples = Some(int_text(key, value)?),
            "channels" => self.channels = Some(int_text(key, value)?),
            "seed" => self.seed = Some(int_text(key, value)?),
            "noise" => {
                self.noise = Some(value.trim().parse().map_err(|_| invalid(format!("noise must be a number, not `{value}`")))?)
            }
            other => return Err(invalid(format!("unknown option `{other}` (known: {})", KEYS.join(", ")))),
        }
        Ok(())
    }

    /// Sets options from a JSON object's members (the `image` member excluded by the caller).
    pub fn set_json(&mut self, key: &str, value: &Value) -> Result<(), OptionError> {
        let strings = |v: &Value, what: &str| -> Result<Vec<String>, OptionError> {
            match v {
                Value::String(s) => Ok(list(s)),
                Value::Array(a) => a
                    .iter()
                    .map(|x| x.as_str().map(str::to_string).ok_or_else(|| invalid(format!("{what} must be strings"))))
                    .collect(),
                _ => Err(invalid(format!("{what} must be a string or a list of strings"))),
            }
        };
        let target = |v: &Value| -> Result<TargetSpec, OptionError> {
            match v {
                Value::Number(n) => n.as_i64().map(TargetSpec::Index).ok_or_else(|| invalid(format!("target {n} is not an integer"))),
                Value::String(s) => Ok(target_from_str(s)),
                _ => Err(invalid("target must be a class index, a label, or a list of them")),
            }
        };
        match key {
            "methods" | "method" => self.methods = Some(strings(value, "methods")?),
            "target" | "targets" => {
                self.target = Some(match value {
                    Value::Array(a) => a.iter().map(target).collect::<Result<_, _>>()?,
                    v => vec![target(v)?],
                })
            }
            "top_k" => {
                self.top_k = Some(match value {
                    Value::Number(n) => n.as_i64().ok_or_else(|| invalid(format!("top_k must be an integer, not {n}")))?,
                    Value::String(s) => s.trim().parse().map_err(|_| invalid(format!("top_k must be an integer, not `{s}`")))?,
                    _ => return Err(invalid("top_k must be an integer")),
                })
            }
            "layer" => self.layer = Some(value.as_str().ok_or_else(|| invalid("layer must be a string"))?.to_string()),
            "outputs" | "output" => self.outputs = Some(strings(value, "outputs")?),
            "colormap" => self.colormap = Some(value.as_str().ok_or_else(|| invalid("colormap must be a string"))?.to_string()),
            "alpha" => {
                self.alpha = Some(match value {
                    Value::Number(n) => n.as_f64().ok_or_else(|| invalid("alpha must be a number"))?,
                    Value::String(s) => s.trim().parse().map_err(|_| invalid(format!("alpha must be a number, not `{s}`")))?,
                    _ => return Err(invalid("alpha must be a number")),
                })
            }
            "size" => self.size = Some(value.as_str().ok_or_else(|| invalid("size must be a string"))?.to_string()),
            "metrics" | "metric" => self.metrics = Some(strings(value, "metrics")?),
            "steps" => self.steps = Some(int_json(key, value)?),
            "samples" => self.samples = Some(int_json(key, value)?),
            "channels" => self.channels = Some(int_json(key, value)?),
            "seed" => self.seed = Some(int_json(key, value)?),
            "noise" => {
                self.noise = Some(match value {
                    Value::Number(n) => n.as_f64().ok_or_else(|| invalid("noise must be a number"))?,
                    Value::String(s) => s.trim().parse().map_err(|_| invalid(format!("noise must be a number, not `{s}`")))?,
                    _ => return Err(invalid("noise must be a number")),
                })
            }
            other => return Err(invalid(format!("unknown option `{other}` (known: {})", KEYS.join(", ")))),
        }
        Ok(())
    }

    /// Options from a JSON object (e.g. the multipart part `options`).
    pub fn from_json_object(text: &[u8]) -> Result<RawOptions, OptionError> {
        let members = json_members(text).map_err(|e| OptionError::Malformed(format!("the `options` part {e}")))?;
        let mut o = RawOptions::default();
        for (k, v) in members {
            o.set_json_text(&k, v)?;
        }
        Ok(o)
    }

    /// Sets one option from a JSON member's text, refusing values over [`MAX_OPTION_BYTES`] before parsing them.
    pub fn set_json_text(&mut self, key: &str, raw: &RawValue) -> Result<(), OptionError> {
        check_option_size(key, raw.get().len())?;
        let v: Value = serde_json::from_str(raw.get()).map_err(|e| OptionError::Malformed(format!("option `{key}` is not valid JSON: {e}")))?;
        self.set_json(key, &v)
    }

    /// `other`'s options override ours where set.
    pub fn merge(&mut self, other: RawOptions) {
        macro_rules! take {
            ($($f:ident),*) => { $( if other.$f.is_some() { self.$f = other.$f; } )* };
        }
        take!(methods, target, top_k, layer, outputs, colormap, alpha, size, metrics, steps, samples, noise, seed, channels);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputSize {
    /// Maps at the model's input size.
    Model,
    /// Maps at the uploaded image's size.
    Original,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Outputs {
    pub heatmap: bool,
    pub overlay: bool,
    pub mask: bool,
    pub raw: bool,
    /// The deletion and insertion curves behind the metrics.
    pub curves: bool,
}

/// A faithfulness metric (methods/metrics.rs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Metric {
    Deletion,
    Insertion,
    ConfidenceChange,
}

impl Metric {
    pub const ALL: [Metric; 3] = [Metric::Deletion, Metric::Insertion, Metric::ConfidenceChange];

    pub fn as_str(self) -> &'static str {
        match self {
            Metric::Deletion => "deletion",
            Metric::Insertion => "insertion",
            Metric::ConfidenceChange => "confidence_change",
        }
    }
}

impl serde::Serialize for Metric {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Defaults of the multi-pass methods' options (docs/METHODS.md).
pub const DEFAULT_STEPS: usize = 50;
pub const DEFAULT_SAMPLES: usize = 25;
pub const DEFAULT_NOISE: f32 = 0.15;
/// Bounds that keep one option from asking for absurd work before the budget is even computed.
pub const MAX_STEPS: usize = 1000;
pub const MAX_SAMPLES: usize = 1000;

/// Validated options of one request.
#[derive(Debug, Clone, PartialEq)]
pub struct ExplainOptions {
    pub methods: Vec<Method>,
    pub targets: Vec<Target>,
    /// How many predictions the response lists.
    pub top_k: usize,
    pub layer: String,
    pub outputs: Outputs,
    pub colormap: Colormap,
    pub alpha: f32,
    pub size: OutputSize,
    pub metrics: Vec<Metric>,
    /// Integrated gradients' steps.
    pub steps: usize,
    /// SmoothGrad's noisy copies.
    pub samples: usize,
    /// SmoothGrad's noise level: sigma = noise * (max - min) of the model-space input.
    pub noise: f32,
    /// SmoothGrad's seed (a random one when not given; returned either way).
    pub seed: Option<u64>,
    /// Score-CAM's channel cap (the highest-variance channels first).
    pub channels: Option<usize>,
}

#[derive(Debug, Clone, Copy)]
pub struct OptionLimits {
    pub max_top_k: usize,
    pub max_targets: usize,
    pub max_methods: usize,
    /// Score-CAM's channel cap from the configuration (`server.scorecam_max_channels`); `None`: every channel.
    pub scorecam_max_channels: Option<usize>,
}

impl RawOptions {
    pub fn validate(&self, model: &ModelInfo, limits: OptionLimits) -> Result<ExplainOptions, OptionError> {
        let mut methods = Vec::new();
        match &self.methods {
            None => methods.extend(Method::DEFAULT),
            Some(list) => {
                for m in list {
                    let method = Method::parse(m).ok_or_else(|| {
                        let known: Vec<&str> = Method::ALL.iter().map(|m| m.as_str()).collect();
                        invalid(format!("unknown method `{m}` (known: {})", known.join(", ")))
                    })?;
                    if !methods.contains(&method) {
                        methods.push(method);
                    }
                }
            }
        }
        if methods.is_empty() {
            return Err(invalid("methods is empty"));
        }
        if methods.len() > limits.max_methods {
            return Err(invalid(format!("{} methods requested, at most {} allowed", methods.len(), limits.max_methods)));
        }
        for m in &methods {
            m.requirements(model).map_err(invalid)?;
        }
        let top_k = match self.top_k {
            None => 1,
            Some(k) if k < 1 || k as usize > limits.max_top_k.min(model.num_classes) => {
                return Err(invalid(format!("top_k must be between 1 and {}, not {k}", limits.max_top_k.min(model.num_classes))));
            }
            Some(k) => k as usize,
        };
        let targets = match &self.target {
            None => (0..top_k).map(Target::Rank).collect(),
            Some(specs) => {
                if self.top_k.is_some_and(|k| k > 1) {
                    return Err(invalid("give either target or top_k, not both"));
                }
                if specs.is_empty() {
                    return Err(invalid("target is empty"));
                }
                if specs.len() > limits.max_targets {
                    return Err(invalid(format!("{} targets requested, at most {} allowed", specs.len(), limits.max_targets)));
                }
                specs
                    .iter()
                    .map(|s| match s {
                        TargetSpec::Index(i) if *i >= 0 && (*i as usize) < model.num_classes => Ok(Target::Class(*i as usize)),
                        TargetSpec::Index(i) => Err(invalid(format!("class index {i} is out of range 0..{}", model.num_classes))),
                        TargetSpec::Label(l) => model.class_by_label(l).map(Target::Class).ok_or_else(|| {
                            if model.labels.is_none() {
                                invalid(format!("model `{}` has no labels; give the class index instead of `{l}`", model.name))
                            } else {
                                invalid(format!("unknown class label `{l}`"))
                            }
                        }),
                    })
                    .collect::<Result<_, _>>()?
            }
        };
        let layer = match &self.layer {
            None => model.default_layer.clone(),
            // A module path resolves to its tensor, so both names share one explain graph.
            Some(l) if let Some(found) = model.layer(l) => found.name.clone(),
            Some(l) => return Err(invalid(format!("unknown layer `{l}`; GET /v1/models/{} lists the candidate layers", model.name))),
        };
        for m in &methods {
            let refuse = |why: String| invalid(format!("method `{m}` is not available for layer `{layer}` of model `{}`: {why}", model.name));
            (m.available)(model, &layer).map_err(refuse)?;
        }
        let mut outputs = Outputs::default();
        let requested = self.outputs.clone().unwrap_or_else(|| vec!["heatmap".into(), "overlay".into()]);
        if requested.is_empty() {
            return Err(invalid("outputs is empty"));
        }
        for o in &requested {
            match o.as_str() {
                "heatmap" => outputs.heatmap = true,
                "overlay" => outputs.overlay = true,
                "mask" => outputs.mask = true,
                "raw" => outputs.raw = true,
                "curves" => outputs.curves = true,
                other => return Err(invalid(format!("unknown output `{other}` (known: heatmap, overlay, mask, raw, curves)"))),
            }
        }
        let colormap = match &self.colormap {
            None => Colormap::Jet,
            Some(c) => Colormap::parse(c).ok_or_else(|| invalid(format!("unknown colormap `{c}` (known: jet, turbo, viridis, inferno, gray)")))?,
        };
        let alpha = match self.alpha {
            None => 0.5,
            Some(a) if a.is_finite() && (0.0..=1.0).contains(&a) => a as f32,
            Some(a) => return Err(invalid(format!("alpha must be between 0 and 1, not {a}"))),
        };
        let size = match self.size.as_deref() {
            None | Some("model") => OutputSize::Model,
            Some("original") => OutputSize::Original,
            Some(s) => return Err(invalid(format!("size must be `model` or `original`, not `{s}`"))),
        };
        let mut metrics = Vec::new();
        for name in self.metrics.iter().flatten() {
            let found: Vec<Metric> = if name == "all" {
                Metric::ALL.to_vec()
            } else {
                let known: Vec<&str> = Metric::ALL.iter().map(|m| m.as_str()).collect();
                vec![Metric::ALL.into_iter().find(|m| m.as_str() == name).ok_or_else(|| {
                    invalid(format!("unknown metric `{name}` (known: {}, all)", known.join(", ")))
                })?]
            };
            for m in found {
                if !metrics.contains(&m) {
                    metrics.push(m);
                }
            }
        }
        if outputs.curves && !metrics.iter().any(|m| matches!(m, Metric::Deletion | Metric::Insertion)) {
            return Err(invalid("outputs=curves needs metrics=deletion or insertion"));
        }
        let count = |v: Option<i64>, name: &str, default: usize, max: usize| -> Result<usize, OptionError> {
            match v {
                None => Ok(default),
                Some(n) if n >= 1 && n as usize <= max => Ok(n as usize),
                Some(n) => Err(invalid(format!("{name} must be between 1 and {max}, not {n}"))),
            }
        };
        let steps = count(self.steps, "steps", DEFAULT_STEPS, MAX_STEPS)?;
        let samples = count(self.samples, "samples", DEFAULT_SAMPLES, MAX_SAMPLES)?;
        let noise = match self.noise {
            None => DEFAULT_NOISE,
            Some(n) if n.is_finite() && (0.0..=10.0).contains(&n) => n as f32,
            Some(n) => return Err(invalid(format!("noise must be between 0 and 10, not {n}"))),
        };
        let seed = match self.seed {
            None => None,
            Some(s) if s >= 0 => Some(s as u64),
            Some(s) => return Err(invalid(format!("seed must be a non-negative integer, not {s}"))),
        };
        let layer_channels = model.layer(&layer).map_or(usize::MAX, |l| l.dims[1] as usize);
        let channels = match self.channels {
            None => limits.scorecam_max_channels,
            Some(c) if c >= 1 => Some(limits.scorecam_max_channels.map_or(c as usize, |m| m.min(c as usize))),
            Some(c) => return Err(invalid(format!("channels must be at least 1, not {c}"))),
        }
        .filter(|&c| c < layer_channels);
        Ok(ExplainOptions { methods, targets, top_k, layer, outputs, colormap, alpha, size, metrics, steps, samples, noise, seed, channels })
    }
}
