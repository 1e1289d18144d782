//! Request options (docs/DESIGN.md §5 table): parsed from a query string, multipart text parts or a JSON body, then
//! validated against the model into a [`RequestOptions`]. The methods' own parameters (`steps`, `samples`, ...)
//! are not listed here: each method declares them (`methods::params`), and they are parsed and checked from those
//! declarations. Errors are [`ServiceError`]s: `BadRequest` (400) for a malformed request, `Unprocessable` (422)
//! for a well-formed but unacceptable option.

use serde::de::{Deserialize, Deserializer, Error as _, MapAccess, Visitor};
use serde_json::Value;
use serde_json::value::RawValue;

use std::collections::BTreeMap;

use super::task::Task;
use crate::backend::batcher::Target;
use crate::backend::engine::ModelInfo;
use crate::error::ServiceError;
use crate::methods::metrics::Metric;
use crate::methods::params::{self, Param, ParamKind, ParamValue, Params};
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
    /// `box` (or `region`): `{x, y, width, height}` in upload pixels. Detectors: "explain the detection that best
    /// overlaps this"; segmenters: "explain the class over this region".
    pub region: Option<[f64; 4]>,
    /// Detectors: this request's score and IoU thresholds (default: the model's).
    pub score_threshold: Option<f64>,
    pub iou_threshold: Option<f64>,
    /// Embedders: the vector the image's embedding is compared with (instead of a reference image).
    pub reference_vector: Option<Vec<f64>>,
    /// The methods' declared parameters, by name, as received (checked against their declarations in `validate`).
    pub params: BTreeMap<&'static str, ParamValue>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum TargetSpec {
    Index(i64),
    Label(String),
}

fn invalid(s: impl Into<String>) -> ServiceError {
    ServiceError::Unprocessable(s.into())
}

fn malformed(s: impl Into<String>) -> ServiceError {
    ServiceError::BadRequest(s.into())
}

/// The options every request may give; the methods' parameters come after them.
const KEYS: [&str; 14] = [
    "methods",
    "target",
    "top_k",
    "layer",
    "outputs",
    "colormap",
    "alpha",
    "size",
    "metrics",
    "box",
    "region",
    "score_threshold",
    "iou_threshold",
    "reference_vector",
];

/// The known option names, for the error that names an unknown one.
fn known_keys() -> String {
    let mut keys: Vec<&str> = KEYS.to_vec();
    keys.extend(params::all().iter().map(|p| p.name));
    keys.join(", ")
}

/// The most members a JSON body or JSON `options` part may have (the image and the fourteen options, each once, fit
/// with room to spare). Checked while parsing: a 20 MiB body of a million keys is refused at the 33rd, not built.
pub const MAX_JSON_MEMBERS: usize = 32;
/// The most bytes one option's value may take (a multipart text part, a JSON member's text). The image is bounded
/// by the body limit only; an option never needs more than a few hundred bytes.
pub const MAX_OPTION_BYTES: usize = 16 * 1024;
/// The most bytes `reference_vector` may take: 16384 values of up to 15 characters each (an embedding's length
/// runs to a few thousand).
pub const MAX_VECTOR_BYTES: usize = 256 * 1024;
/// The most values `reference_vector` may have.
pub const MAX_VECTOR_VALUES: usize = 16384;

/// 400 when one option's value is over [`MAX_OPTION_BYTES`].
pub fn check_option_size(key: &str, len: usize) -> Result<(), ServiceError> {
    // The `options` part holds every option, `reference_vector` among them.
    let most = match key {
        "reference_vector" => MAX_VECTOR_BYTES,
        "options" => MAX_VECTOR_BYTES + MAX_OPTION_BYTES,
        _ => MAX_OPTION_BYTES,
    };
    if len > most {
        return Err(malformed(format!("option `{key}` is {len} bytes long; at most {most} are accepted")));
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

fn int_text(key: &str, v: &str) -> Result<i64, ServiceError> {
    v.trim().parse().map_err(|_| invalid(format!("{key} must be an integer, not `{v}`")))
}

fn int_json(key: &str, v: &Value) -> Result<i64, ServiceError> {
    match v {
        Value::Number(n) => n.as_i64().ok_or_else(|| invalid(format!("{key} must be an integer, not {n}"))),
        Value::String(s) => int_text(key, s),
        _ => Err(invalid(format!("{key} must be an integer"))),
    }
}

/// A declared parameter's value from a text value.
fn param_text(p: &Param, v: &str) -> Result<ParamValue, ServiceError> {
    if p.is_integer() {
        return int_text(p.name, v).map(ParamValue::Int);
    }
    number_text(p.name, v).map(ParamValue::Number)
}

/// A declared parameter's value from a JSON value (a number, or a string holding one).
fn param_json(p: &Param, v: &Value) -> Result<ParamValue, ServiceError> {
    if p.is_integer() {
        return int_json(p.name, v).map(ParamValue::Int);
    }
    number_json(p.name, v).map(ParamValue::Number)
}

fn number_text(key: &str, v: &str) -> Result<f64, ServiceError> {
    v.trim().parse().map_err(|_| invalid(format!("{key} must be a number, not `{v}`")))
}

fn number_json(key: &str, v: &Value) -> Result<f64, ServiceError> {
    match v {
        Value::Number(n) => n.as_f64().ok_or_else(|| invalid(format!("{key} must be a number"))),
        Value::String(s) => number_text(key, s),
        _ => Err(invalid(format!("{key} must be a number"))),
    }
}

const BOX_FORM: &str = "box (region) must be {\"x\", \"y\", \"width\", \"height\"} in upload pixels, or \"x,y,width,height\"";

/// `box` as text: `x,y,width,height`.
fn box_text(v: &str) -> Result<[f64; 4], ServiceError> {
    let parts: Vec<f64> = v.split(',').map(|s| s.trim().parse::<f64>()).collect::<Result<_, _>>().map_err(|_| invalid(BOX_FORM))?;
    <[f64; 4]>::try_from(parts).map_err(|_| invalid(BOX_FORM))
}

/// `box` as JSON: `{"x", "y", "width", "height"}`, a list of four numbers, or the text form.
fn box_json(v: &Value) -> Result<[f64; 4], ServiceError> {
    match v {
        Value::Object(o) => {
            let get = |k: &str| o.get(k).and_then(Value::as_f64).ok_or_else(|| invalid(BOX_FORM));
            Ok([get("x")?, get("y")?, get("width")?, get("height")?])
        }
        Value::Array(a) if a.len() == 4 => {
            let n: Vec<f64> = a.iter().map(|x| x.as_f64().ok_or_else(|| invalid(BOX_FORM))).collect::<Result<_, _>>()?;
            Ok([n[0], n[1], n[2], n[3]])
        }
        Value::String(s) => box_text(s),
        _ => Err(invalid(BOX_FORM)),
    }
}

/// `reference_vector` as text: comma-separated numbers (in brackets or not, so a JSON array in a text part reads
/// too).
fn vector_text(v: &str) -> Result<Vec<f64>, ServiceError> {
    let v = v.trim();
    let v = v.strip_prefix('[').and_then(|v| v.strip_suffix(']')).unwrap_or(v);
    let values: Vec<f64> = v
        .split(',')
        .map(|s| s.trim().parse::<f64>())
        .collect::<Result<_, _>>()
        .map_err(|_| invalid("reference_vector must be a list of numbers (a JSON array, or comma-separated text)"))?;
    check_vector(values)
}

/// `reference_vector` as JSON: an array of numbers, or the text form.
fn vector_json(v: &Value) -> Result<Vec<f64>, ServiceError> {
    match v {
        Value::Array(a) => {
            let values = a.iter().map(|x| x.as_f64().ok_or_else(|| invalid("reference_vector must be an array of numbers"))).collect::<Result<_, _>>()?;
            check_vector(values)
        }
        Value::String(s) => vector_text(s),
        _ => Err(invalid("reference_vector must be an array of numbers")),
    }
}

fn check_vector(values: Vec<f64>) -> Result<Vec<f64>, ServiceError> {
    if values.len() > MAX_VECTOR_VALUES {
        return Err(invalid(format!("reference_vector has {} values; at most {MAX_VECTOR_VALUES} are accepted", values.len())));
    }
    if values.iter().any(|v| !v.is_finite() || v.abs() > f32::MAX as f64) {
        return Err(invalid("reference_vector holds a value that is not a finite float32 number"));
    }
    Ok(values)
}

fn target_from_str(s: &str) -> TargetSpec {
    match s.parse::<i64>() {
        Ok(i) => TargetSpec::Index(i),
        Err(_) => TargetSpec::Label(s.to_string()),
    }
}

impl RawOptions {
    /// Sets one option from a text value (query string or multipart text part). Lists are comma-separated.
    pub fn set_text(&mut self, key: &str, value: &str) -> Result<(), ServiceError> {
        match key {
            "methods" | "method" => self.methods.get_or_insert_with(Vec::new).extend(method_list(value)),
            "target" | "targets" => self.target.get_or_insert_with(Vec::new).extend(list(value).iter().map(|s| target_from_str(s))),
            "top_k" => self.top_k = Some(value.trim().parse().map_err(|_| invalid(format!("top_k must be an integer, not `{value}`")))?),
            "layer" => self.layer = Some(value.to_string()),
            "outputs" | "output" => self.outputs.get_or_insert_with(Vec::new).extend(list(value)),
            "colormap" => self.colormap = Some(value.trim().to_string()),
            "alpha" => self.alpha = Some(number_text(key, value)?),
            "size" => self.size = Some(value.trim().to_string()),
            "metrics" | "metric" => self.metrics.get_or_insert_with(Vec::new).extend(list(value)),
            "box" | "region" => self.region = Some(box_text(value)?),
            "score_threshold" => self.score_threshold = Some(number_text(key, value)?),
            "iou_threshold" => self.iou_threshold = Some(number_text(key, value)?),
            "reference_vector" => self.reference_vector = Some(vector_text(value)?),
            other => match params::find(other) {
                Some(p) => {
                    self.params.insert(p.name, param_text(p, value)?);
                }
                None => return Err(invalid(format!("unknown option `{other}` (known: {})", known_keys()))),
            },
        }
        Ok(())
    }

    /// Sets options from a JSON object's members (the `image` member excluded by the caller).
    pub fn set_json(&mut self, key: &str, value: &Value) -> Result<(), ServiceError> {
        let strings = |v: &Value, what: &str| -> Result<Vec<String>, ServiceError> {
            match v {
                Value::String(s) => Ok(list(s)),
                Value::Array(a) => a
                    .iter()
                    .map(|x| x.as_str().map(str::to_string).ok_or_else(|| invalid(format!("{what} must be strings"))))
                    .collect(),
                _ => Err(invalid(format!("{what} must be a string or a list of strings"))),
            }
        };
        let target = |v: &Value| -> Result<TargetSpec, ServiceError> {
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
            "alpha" => self.alpha = Some(number_json(key, value)?),
            "size" => self.size = Some(value.as_str().ok_or_else(|| invalid("size must be a string"))?.to_string()),
            "metrics" | "metric" => self.metrics = Some(strings(value, "metrics")?),
            "box" | "region" => self.region = Some(box_json(value)?),
            "score_threshold" => self.score_threshold = Some(number_json(key, value)?),
            "iou_threshold" => self.iou_threshold = Some(number_json(key, value)?),
            "reference_vector" => self.reference_vector = Some(vector_json(value)?),
            other => match params::find(other) {
                Some(p) => {
                    self.params.insert(p.name, param_json(p, value)?);
                }
                None => return Err(invalid(format!("unknown option `{other}` (known: {})", known_keys()))),
            },
        }
        Ok(())
    }

    /// Options from a JSON object (e.g. the multipart part `options`).
    pub fn from_json_object(text: &[u8]) -> Result<RawOptions, ServiceError> {
        let members = json_members(text).map_err(|e| malformed(format!("the `options` part {e}")))?;
        let mut o = RawOptions::default();
        for (k, v) in members {
            o.set_json_text(&k, v)?;
        }
        Ok(o)
    }

    /// Sets one option from a JSON member's text, refusing values over [`MAX_OPTION_BYTES`] before parsing them.
    pub fn set_json_text(&mut self, key: &str, raw: &RawValue) -> Result<(), ServiceError> {
        check_option_size(key, raw.get().len())?;
        let v: Value = serde_json::from_str(raw.get()).map_err(|e| malformed(format!("option `{key}` is not valid JSON: {e}")))?;
        self.set_json(key, &v)
    }

    /// `other`'s options override ours where set.
    pub fn merge(&mut self, other: RawOptions) {
        macro_rules! take {
            ($($f:ident),*) => { $( if other.$f.is_some() { self.$f = other.$f; } )* };
        }
        take!(methods, target, top_k, layer, outputs, colormap, alpha, size, metrics, region, score_threshold, iou_threshold, reference_vector);
        self.params.extend(other.params);
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
    /// Embedders: the image's embedding vector in the answer of an explain request (predict always has it).
    pub embedding: bool,
}

/// Validated options of one request.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestOptions {
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
    /// The methods' parameters, checked against their declarations (`methods::params`).
    pub params: Params,
    /// Detectors: which detections to explain, in order; `targets` then holds one placeholder row per pick (what the
    /// budget counts), and the pipeline turns the picks into seed rows once the detections are known.
    pub picks: Vec<DetectionPick>,
    /// Detectors: this request's thresholds over the model's.
    pub score_threshold: Option<f32>,
    pub iou_threshold: Option<f32>,
    /// Multi-label classifiers without `target` or `top_k`: explain every class whose sigmoid score reaches this
    /// threshold (the request's `score_threshold`, else the model's), at most `max_targets` of them, best first;
    /// `targets` then holds one placeholder row, and the pipeline finds the classes after a forward pass.
    pub above_threshold: Option<(f32, usize)>,
    /// Segmenters: which classes to explain, in order, and over which region; `targets` then holds one placeholder
    /// row per segment, and the pipeline turns them into seed rows once the label map is known.
    pub segments: Vec<SegmentPick>,
    /// Embedders: the client's reference vector, of the embedding's length.
    pub reference_vector: Option<Vec<f32>>,
}

/// A segment a request asks to explain: a class's logits summed over the pixels predicted as it, within `region`
/// (upload pixels) when given.
#[derive(Debug, Clone, PartialEq)]
pub struct SegmentPick {
    pub class: SegmentClassPick,
    pub region: Option<[f64; 4]>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SegmentClassPick {
    /// This class (422 when it is absent from the label map and no region is given).
    Class(usize),
    /// The i-th largest class that is not the background (`top_k`; left out when the map has fewer).
    Largest(usize),
}

/// A detection a request asks to explain.
#[derive(Debug, Clone, PartialEq)]
pub enum DetectionPick {
    /// By its index in the answer's `detections` (0 is the best): 422 when there is no such detection.
    Index(usize),
    /// The `top_k` best: the i-th best, left out when the image has fewer detections.
    Rank(usize),
    /// The best detection of a class label.
    Label(String),
    /// The detection whose box best overlaps `x, y, width, height` in upload pixels.
    Overlap([f64; 4]),
}

impl RequestOptions {
    /// What the budget reads (`methods::request_cost`).
    pub fn work(&self) -> crate::methods::Work<'_> {
        crate::methods::Work { layer: &self.layer, methods: &self.methods, params: &self.params, metrics: &self.metrics, targets: self.targets.len() }
    }
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
    /// Validates for a classifier (the API's tests and tools that have no task at hand).
    pub fn validate(&self, model: &ModelInfo, limits: OptionLimits) -> Result<RequestOptions, ServiceError> {
        self.validate_for(model, &Task::Classification, limits)
    }

    pub fn validate_for(&self, model: &ModelInfo, task: &Task, limits: OptionLimits) -> Result<RequestOptions, ServiceError> {
        let mut methods = Vec::new();
        match &self.methods {
            None => methods.extend(task.default_methods()),
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
            if let Some(r) = m.refusal(model, None) {
                return Err(invalid(r.reason()));
            }
            if let Some(why) = task.refuses(*m) {
                return Err(invalid(why));
            }
        }
        let (picks, score_threshold, iou_threshold) = self.detection_targets(task, &model.name, limits)?;
        let segments = self.segment_targets(task, limits)?;
        let reference_vector = self.embedding_reference(task, &model.name)?;
        if self.methods.is_none() && self.region.is_some() && !segments.is_empty() {
            // Grad-CAM averages the gradient over the whole map, so its map barely follows a region; HiResCAM keeps
            // each position's gradient (docs/METHODS.md, "Segmentation").
            methods = Method::ALL.into_iter().filter(|m| m.as_str() == "hirescam").collect();
        }
        let top_k = match self.top_k {
            _ if !picks.is_empty() || !segments.is_empty() => 1,
            None => 1,
            Some(k) if k < 1 || k as usize > limits.max_top_k.min(model.num_classes) => {
                return Err(invalid(format!("top_k must be between 1 and {}, not {k}", limits.max_top_k.min(model.num_classes))));
            }
            Some(k) => k as usize,
        };
        let targets = match &self.target {
            _ if !picks.is_empty() => (0..picks.len()).map(Target::Rank).collect(),
            _ if !segments.is_empty() => (0..segments.len()).map(Target::Rank).collect(),
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
            if let Some(why) = (m.refuses_at)(model, &layer) {
                return Err(refuse(why));
            }
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
                "embedding" if matches!(task, Task::Embedding(_)) => outputs.embedding = true,
                "embedding" => return Err(invalid(format!("output `embedding` is an embedder's vector; model `{}`'s task is {}", model.name, task.as_str()))),
                other => return Err(invalid(format!("unknown output `{other}` (known: heatmap, overlay, mask, raw, curves, embedding)"))),
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
                vec![Metric::parse(name).ok_or_else(|| {
                    invalid(format!("unknown metric `{name}` (known: {}, all)", known.join(", ")))
                })?]
            };
            for m in found {
                if !metrics.contains(&m) {
                    metrics.push(m);
                }
            }
        }
        if outputs.curves && !metrics.iter().any(|m| m.has_curve()) {
            return Err(invalid("outputs=curves needs metrics=deletion or insertion"));
        }
        let mut params = Params::default();
        for (&name, &value) in &self.params {
            let p = params::find(name).ok_or_else(|| invalid(format!("unknown option `{name}` (known: {})", known_keys())))?;
            params.set(p, p.check(value).map_err(invalid)?);
        }
        resolve_caps(&mut params, model, &layer, limits);
        if !picks.is_empty() && !metrics.is_empty() {
            return Err(invalid("the faithfulness metrics follow a classifier's softmax score; a detector's explanations have none"));
        }
        if !segments.is_empty() && !metrics.is_empty() {
            return Err(invalid("the faithfulness metrics follow a classifier's softmax score; a segmenter's explanations have none"));
        }
        let above_threshold = match task {
            Task::MultiLabel(ml) if self.target.is_none() && self.top_k.is_none() => {
                let t = match self.score_threshold {
                    None => ml.threshold,
                    Some(t) if t.is_finite() && (0.0..=1.0).contains(&t) => t as f32,
                    Some(t) => return Err(invalid(format!("score_threshold must be between 0 and 1, not {t}"))),
                };
                Some((t, limits.max_targets))
            }
            Task::MultiLabel(_) if self.score_threshold.is_some() => {
                return Err(invalid("score_threshold chooses a multi-label classifier's default targets; this request gives target or top_k"));
            }
            _ => None,
        };
        if matches!(task, Task::MultiLabel(_)) && !metrics.is_empty() {
            return Err(invalid("the faithfulness metrics follow a classifier's softmax score; a multi-label classifier's classes have independent sigmoid scores"));
        }
        if matches!(task, Task::Embedding(_)) && !metrics.is_empty() {
            return Err(invalid("the faithfulness metrics follow a classifier's softmax score; an embedder's target is a similarity"));
        }
        Ok(RequestOptions {
            methods,
            targets,
            top_k,
            layer,
            outputs,
            colormap,
            alpha,
            size,
            metrics,
            params,
            picks,
            score_threshold,
            iou_threshold,
            segments,
            above_threshold,
            reference_vector,
        })
    }

    /// A detector's picks (`target`: indices or labels; `box`; `top_k`: the k best; default the best one) and
    /// thresholds; nothing for a classifier, which refuses the detector-only options.
    #[allow(clippy::type_complexity)]
    fn detection_targets(&self, task: &Task, model_name: &str, limits: OptionLimits) -> Result<(Vec<DetectionPick>, Option<f32>, Option<f32>), ServiceError> {
        let Task::Detection(_) = task else {
            let segmenter = matches!(task, Task::Segmentation(_));
            let multilabel = matches!(task, Task::MultiLabel(_));
            for (key, given, applies) in [
                ("box` or `region", self.region.is_some() && !segmenter, "detectors and segmenters"),
                ("score_threshold", self.score_threshold.is_some() && !multilabel, "detectors and multi-label classifiers"),
                ("iou_threshold", self.iou_threshold.is_some(), "detectors"),
            ] {
                if given {
                    return Err(invalid(format!("`{key}` applies to {applies}; model `{}`'s task is {}", model_name, task.as_str())));
                }
            }
            return Ok((vec![], None, None));
        };
        let threshold = |key: &str, v: Option<f64>| match v {
            None => Ok(None),
            Some(t) if t.is_finite() && (0.0..=1.0).contains(&t) => Ok(Some(t as f32)),
            Some(t) => Err(invalid(format!("{key} must be between 0 and 1, not {t}"))),
        };
        let (score, iou) = (threshold("score_threshold", self.score_threshold)?, threshold("iou_threshold", self.iou_threshold)?);
        let given = [self.target.is_some(), self.region.is_some(), self.top_k.is_some_and(|k| k > 1)].iter().filter(|g| **g).count();
        if given > 1 {
            return Err(invalid("give one of target, box or top_k"));
        }
        let picks = match (&self.target, self.region, self.top_k) {
            (Some(specs), _, _) => {
                if specs.is_empty() {
                    return Err(invalid("target is empty"));
                }
                if specs.len() > limits.max_targets {
                    return Err(invalid(format!("{} targets requested, at most {} allowed", specs.len(), limits.max_targets)));
                }
                specs
                    .iter()
                    .map(|s| match s {
                        TargetSpec::Index(i) if *i >= 0 => Ok(DetectionPick::Index(*i as usize)),
                        TargetSpec::Index(i) => Err(invalid(format!("detection index {i} is negative"))),
                        TargetSpec::Label(l) => Ok(DetectionPick::Label(l.clone())),
                    })
                    .collect::<Result<_, _>>()?
            }
            (None, Some(b), _) => {
                if !b.iter().all(|v| v.is_finite()) || b[2] <= 0.0 || b[3] <= 0.0 {
                    return Err(invalid("box must have finite x and y and a positive width and height"));
                }
                vec![DetectionPick::Overlap(b)]
            }
            (None, None, Some(k)) if k < 1 || k as usize > limits.max_top_k => {
                return Err(invalid(format!("top_k must be between 1 and {}, not {k}", limits.max_top_k)));
            }
            (None, None, k) => (0..k.unwrap_or(1) as usize).map(DetectionPick::Rank).collect(),
        };
        Ok((picks, score, iou))
    }
}

impl RawOptions {
    /// An embedder's `reference_vector`, of its embedding's length; 422 for it on another task, and for the class
    /// options on an embedder, whose target is its reference.
    fn embedding_reference(&self, task: &Task, model_name: &str) -> Result<Option<Vec<f32>>, ServiceError> {
        let Task::Embedding(emb) = task else {
            if self.reference_vector.is_some() {
                return Err(invalid(format!("`reference_vector` applies to embedders; model `{model_name}`'s task is {}", task.as_str())));
            }
            return Ok(None);
        };
        if self.target.is_some() || self.top_k.is_some_and(|k| k > 1) {
            return Err(invalid(format!(
                "model `{model_name}` is an embedder: its target is the similarity to a reference (a `reference` image part, `reference_image`, or `reference_vector`), not a class or `top_k`"
            )));
        }
        match &self.reference_vector {
            None => Ok(None),
            Some(v) if v.len() != emb.dim => Err(invalid(format!(
                "reference_vector has {} values; model `{model_name}`'s embeddings have {}",
                v.len(),
                emb.dim
            ))),
            Some(v) => Ok(Some(v.iter().map(|&x| x as f32).collect())),
        }
    }

    /// A segmenter's segments: `target` (class indices or labels; default the largest class that is not the
    /// background) or `top_k` (the k largest), each over `region` when given; nothing for other tasks.
    fn segment_targets(&self, task: &Task, limits: OptionLimits) -> Result<Vec<SegmentPick>, ServiceError> {
        let Task::Segmentation(seg) = task else { return Ok(vec![]) };
        let region = match self.region {
            Some(b) if !b.iter().all(|v| v.is_finite()) || b[2] <= 0.0 || b[3] <= 0.0 => {
                return Err(invalid("region must have finite x and y and a positive width and height"));
            }
            r => r,
        };
        if self.target.is_some() && self.top_k.is_some_and(|k| k > 1) {
            return Err(invalid("give either target or top_k, not both"));
        }
        let classes = match (&self.target, self.top_k) {
            (Some(specs), _) => {
                if specs.is_empty() {
                    return Err(invalid("target is empty"));
                }
                if specs.len() > limits.max_targets {
                    return Err(invalid(format!("{} targets requested, at most {} allowed", specs.len(), limits.max_targets)));
                }
                specs
                    .iter()
                    .map(|s| match s {
                        TargetSpec::Index(i) if *i >= 0 && (*i as usize) < seg.classes => Ok(SegmentClassPick::Class(*i as usize)),
                        TargetSpec::Index(i) => Err(invalid(format!("class index {i} is out of range 0..{}", seg.classes))),
                        TargetSpec::Label(l) => seg.class_by_label(l).map(SegmentClassPick::Class).ok_or_else(|| {
                            if seg.labels.is_none() {
                                invalid(format!("this segmenter has no labels; give the class index instead of `{l}`"))
                            } else {
                                invalid(format!("unknown class label `{l}`"))
                            }
                        }),
                    })
                    .collect::<Result<Vec<_>, _>>()?
            }
            (None, Some(k)) if k < 1 || k as usize > limits.max_top_k.min(seg.classes) => {
                return Err(invalid(format!("top_k must be between 1 and {}, not {k}", limits.max_top_k.min(seg.classes))));
            }
            (None, k) => (0..k.unwrap_or(1) as usize).map(SegmentClassPick::Largest).collect(),
        };
        Ok(classes.into_iter().map(|class| SegmentPick { class, region }).collect())
    }
}

/// The caps (`ParamKind::Cap`: Score-CAM's `channels`) as the methods read them: the request's value, lowered to
/// `server.scorecam_max_channels` (which also applies when the request gives none), and dropped when it is not
/// below the layer's channel count (no cap then).
fn resolve_caps(params: &mut Params, model: &ModelInfo, layer: &str, limits: OptionLimits) {
    let layer_channels = model.layer(layer).map_or(usize::MAX, |l| l.dims[1] as usize);
    for p in params::all().into_iter().filter(|p| p.kind == ParamKind::Cap) {
        let cap = match params.integer(p) {
            None => limits.scorecam_max_channels,
            Some(c) => Some(limits.scorecam_max_channels.map_or(c as usize, |m| m.min(c as usize))),
        }
        .filter(|&c| c < layer_channels);
        match cap {
            Some(c) => params.set(p, ParamValue::Int(c as i64)),
            None => params.clear(p),
        }
    }
}

/// The parameters a request without options gets at `layer`: every default, with the configured caps.
pub fn default_params(model: &ModelInfo, layer: &str, limits: OptionLimits) -> Params {
    let mut params = Params::default();
    resolve_caps(&mut params, model, layer, limits);
    params
}
