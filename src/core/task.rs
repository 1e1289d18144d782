//! A model's task: how its outputs are decoded, what a target is, and which answer fields exist. The registry
//! recognises it at load (from the file, or the `task` config key), the pipeline decodes through it, the encoders
//! write its result ([`TaskResult`]). A new task is a variant here and its result type in answer.rs, not `if`
//! branches across files.

use super::answer::{Classification, Detection, Prediction, TaskResult};
use crate::backend::engine::{ranked, ModelInfo};
use crate::backend::batcher::Target;
use crate::config::TaskName;
use crate::onnx::rewrite::{FINAL_OP_KEY, JOINED_OUTPUTS_KEY, L2_NORMALIZE, OUTPUT_NAME_KEY, TORCHVISION_JOINED};
use crate::preprocess::ResizePolicy;
use crate::detection::{self, Found, Thresholds};
use crate::methods::Method;

#[derive(Debug, Clone, PartialEq)]
pub enum Task {
    /// Class logits `[N, K]`: targets are classes; the answer has `predictions`.
    Classification,
    /// An object detector: targets are detections; the answer has `detections`.
    Detection(Detector),
    /// A semantic segmenter (class maps `[N, classes, h, w]`): a target is a class over the pixels predicted as it
    /// (within a region, if given); the answer has `segmentation`.
    Segmentation(Segmenter),
    /// A multi-label classifier (independent sigmoid scores `[N, K]`): targets are classes, by default every class
    /// whose score reaches the threshold; the answer has `predictions` with sigmoid scores.
    MultiLabel(MultiLabel),
    /// An embedder (a vector `[N, D]` per image): the target is the cosine similarity of an image's embedding to a
    /// reference (another image's, the mean of several, or a vector the client gives); the answer has `embedding`
    /// and `similarity`.
    Embedding(Embedder),
}

/// An embedder: the length of its vectors.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Embedder {
    pub dim: usize,
    /// The model divides its output by its L2 norm (its vectors have length 1).
    pub normalised: bool,
}

/// The output names embedders' exporters give (transformers' CLIP and DINOv2, sentence-transformers, timm's
/// `forward_features` exports, ...); a model with one of them and no labels file is an embedder.
const EMBEDDING_OUTPUT_NAMES: [&str; 6] = ["embedding", "embeddings", "image_embeds", "pooler_output", "features", "feature"];

impl Embedder {
    /// Whether a file's first output looks like an embedding: `[N, D]`, no labels, and an embedder's output name
    /// (any name containing `embed`, or one of [`EMBEDDING_OUTPUT_NAMES`]) or a final L2 normalisation.
    pub fn recognised(metadata: &std::collections::BTreeMap<String, String>, dims: &[i64], labels: bool) -> bool {
        let named = metadata.get(OUTPUT_NAME_KEY).is_some_and(|n| {
            let n = n.to_ascii_lowercase();
            n.contains("embed") || EMBEDDING_OUTPUT_NAMES.contains(&n.as_str())
        });
        let normalised = metadata.get(FINAL_OP_KEY).is_some_and(|op| op == L2_NORMALIZE);
        !labels && dims.len() == 1 && dims[0] >= 2 && (named || normalised)
    }

    /// The cosine similarity of `e` to `r` (in float64) and its gradient with respect to `e`, the seed that
    /// explains it: `d cos / d e = r / (|e| |r|) - cos * e / |e|^2` (pytorch-grad-cam's `SimilarityToConceptTarget`
    /// differentiated). `None` when either vector is zero (or not finite), where the similarity is undefined.
    pub fn similarity(e: &[f32], r: &[f32]) -> Option<(f64, Vec<f32>)> {
        let dot: f64 = e.iter().zip(r).map(|(a, b)| *a as f64 * *b as f64).sum();
        let ne = e.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt();
        let nr = r.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt();
        if !(ne > 0.0 && nr > 0.0 && dot.is_finite() && ne.is_finite() && nr.is_finite()) {
            return None;
        }
        let cos = dot / (ne * nr);
        let seed = e.iter().zip(r).map(|(a, b)| (*b as f64 / (ne * nr) - cos * *a as f64 / (ne * ne)) as f32).collect();
        Some((cos, seed))
    }

    /// The mean of the vectors, each divided by its L2 norm first (so that every reference image counts the same,
    /// whatever its embedding's length); `None` if one is zero.
    pub fn mean_direction(vectors: &[&[f32]]) -> Option<Vec<f32>> {
        let d = vectors.first()?.len();
        let mut sum = vec![0f64; d];
        for v in vectors {
            let n = v.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt();
            if !(n > 0.0 && n.is_finite()) {
                return None;
            }
            for (s, a) in sum.iter_mut().zip(v.iter()) {
                *s += *a as f64 / n;
            }
        }
        Some(sum.iter().map(|s| (s / vectors.len() as f64) as f32).collect())
    }
}

/// A multi-label classifier: whether its Sigmoid is inside the graph, and the default targets' threshold.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MultiLabel {
    pub classes: usize,
    /// The model ends in a Sigmoid (its outputs are the scores, and explanations differentiate them); otherwise
    /// its outputs are logits, the scores their sigmoid, and explanations differentiate the logits.
    pub sigmoid_in_graph: bool,
    /// The score a class needs to be a default target (`score_threshold`, default 0.5).
    pub threshold: f32,
}

impl MultiLabel {
    /// The sigmoid scores of one image's outputs.
    pub fn scores(&self, out: &[f32]) -> Vec<f32> {
        if self.sigmoid_in_graph { out.to_vec() } else { out.iter().map(|&v| detection::sigmoid(v)).collect() }
    }

    /// The classes at or above `threshold`, best first.
    pub fn above(&self, scores: &[f32], threshold: f32) -> Vec<usize> {
        ranked(scores.iter().copied()).into_iter().filter(|&c| scores[c] >= threshold).collect()
    }
}

/// A semantic segmenter: its classes, output grid and labels.
#[derive(Debug, Clone, PartialEq)]
pub struct Segmenter {
    pub classes: usize,
    /// The output's grid `[h, w]`: the input's size for torchvision's models, a quarter of it for SegFormer.
    pub grid: [usize; 2],
    pub labels: Option<Vec<String>>,
    /// The class labelled background (`background`, `__background__`, `_background_`), if any: never the default
    /// target.
    pub background: Option<usize>,
}

/// A detector: its output format, class names and thresholds.
#[derive(Debug, Clone, PartialEq)]
pub struct Detector {
    pub format: DetectionFormat,
    /// Class names, from the labels file or the file's metadata (Ultralytics' `names`).
    pub labels: Option<Vec<String>>,
    pub thresholds: Thresholds,
    /// The model's input `[C, H, W]` (a DETR's boxes are normalised to it).
    pub input_shape: [usize; 3],
}

/// The output layouts camserve decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DetectionFormat {
    /// Ultralytics YOLO's raw head (YOLOv5u, v8, v9, 11, 12): `[N, 4 + nc, A]`, boxes `cx, cy, w, h` in input
    /// pixels, then the class scores after their sigmoid.
    UltralyticsRaw { classes: usize, anchors: usize },
    /// Ultralytics' end-to-end head (YOLOv10, YOLO26; metadata `end2end` True): `[N, Q, 6]`, rows
    /// `x0, y0, x1, y1, score, class` in input pixels, already selected in the graph (TopK); the class count comes
    /// from the labels (the file's `names`).
    UltralyticsEndToEnd { classes: usize, rows: usize },
    /// A DETR-family head (transformers' DETR, YOLOS: outputs `logits` [N, Q, classes + 1] and `pred_boxes`
    /// [N, Q, 4], which the rewrite joins into one [N, Q, classes + 5]): softmax class probabilities, the last
    /// "no object", and boxes `cx, cy, w, h` normalised to the input.
    Detr { classes: usize, queries: usize },
    /// A DETR variant that scores each class with a sigmoid (transformers' Conditional DETR, Deformable DETR):
    /// `logits` [N, Q, classes] (no "no object") joined with `pred_boxes` into [N, Q, classes + 4]; the best
    /// (query, class) pairs over all queries and classes. The file cannot tell it from a DETR: the
    /// `detection_format = "detr_sigmoid"` key says it.
    DetrSigmoid { classes: usize, queries: usize },
    /// Ultralytics' RT-DETR (metadata `head` RTDETRDecoder): `[N, Q, 6]`, rows `cx, cy, w, h` normalised to the
    /// input, then score and class, already selected in the graph (TopK over queries x classes of the sigmoid
    /// scores); the class count comes from the labels (the file's `names`).
    UltralyticsRtDetr { classes: usize, rows: usize },
    /// A torchvision detector exported with its post-processing (Faster R-CNN, RetinaNet, FCOS, SSD, SSDlite): its
    /// boxes, scores and labels, which the rewrite joins into `[1, rows, 6]` (`x0, y0, x1, y1, score, label` in
    /// input pixels, the model's detections first, zero rows after them). The model has already thresholded, run
    /// NMS and capped them; the class count (background 0 included) comes from the labels file.
    Torchvision { classes: usize, rows: usize },
}

impl DetectionFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            DetectionFormat::UltralyticsRaw { .. } => "ultralytics",
            DetectionFormat::UltralyticsEndToEnd { .. } => "ultralytics_end2end",
            DetectionFormat::Detr { .. } => "detr",
            DetectionFormat::DetrSigmoid { .. } => "detr_sigmoid",
            DetectionFormat::UltralyticsRtDetr { .. } => "ultralytics_rtdetr",
            DetectionFormat::Torchvision { .. } => "torchvision",
        }
    }

    /// How many classes the detector tells apart.
    pub fn classes(self) -> usize {
        match self {
            DetectionFormat::UltralyticsRaw { classes, .. }
            | DetectionFormat::UltralyticsEndToEnd { classes, .. }
            | DetectionFormat::Detr { classes, .. }
            | DetectionFormat::DetrSigmoid { classes, .. }
            | DetectionFormat::UltralyticsRtDetr { classes, .. }
            | DetectionFormat::Torchvision { classes, .. } => classes,
        }
    }

    /// The output's rows per image: anchors of a raw head, selected rows of an end-to-end one.
    pub fn rows(self) -> usize {
        match self {
            DetectionFormat::UltralyticsRaw { anchors, .. } => anchors,
            DetectionFormat::UltralyticsEndToEnd { rows, .. } | DetectionFormat::UltralyticsRtDetr { rows, .. } | DetectionFormat::Torchvision { rows, .. } => rows,
            DetectionFormat::Detr { queries, .. } | DetectionFormat::DetrSigmoid { queries, .. } => queries,
        }
    }

    /// The exporter's own predictor's thresholds: Ultralytics' `conf = 0.25, iou = 0.7`, 300 detections;
    /// transformers' `threshold = 0.5` (no NMS, no cap beyond the queries); a torchvision detector's own, inside the
    /// graph (every detection it answers is kept; `score_threshold` and `max_detections` can only drop some).
    pub fn default_thresholds(self) -> Thresholds {
        match self {
            DetectionFormat::UltralyticsRaw { .. } | DetectionFormat::UltralyticsEndToEnd { .. } | DetectionFormat::UltralyticsRtDetr { .. } => {
                Thresholds::default()
            }
            DetectionFormat::Detr { queries, .. } => Thresholds { score: 0.5, iou: 0.7, max_detections: queries },
            // Its post-processing's `threshold = 0.5, top_k = 100`.
            DetectionFormat::DetrSigmoid { .. } => Thresholds { score: 0.5, iou: 0.7, max_detections: 100 },
            DetectionFormat::Torchvision { rows, .. } => Thresholds { score: 0.0, iou: 1.0, max_detections: rows },
        }
    }

    /// The preprocessing of the exporter's own predictor, where the configuration does not say it: Ultralytics'
    /// letterbox and pixels / 255; transformers' `DetrImageProcessor` at a fixed size: the image resized to the
    /// input (bilinear) and normalised with ImageNet's mean and std; a torchvision detector normalises and resizes
    /// inside its graph (`GeneralizedRCNNTransform`), so it gets pixels / 255 stretched to its fixed input size.
    pub fn default_preprocessing(self) -> ([f32; 3], [f32; 3], ResizePolicy) {
        match self {
            DetectionFormat::UltralyticsRaw { .. } | DetectionFormat::UltralyticsEndToEnd { .. } => ([0.0; 3], [1.0; 3], ResizePolicy::Letterbox),
            DetectionFormat::Detr { .. } | DetectionFormat::DetrSigmoid { .. } => (crate::config::IMAGENET_MEAN, crate::config::IMAGENET_STD, ResizePolicy::Stretch),
            DetectionFormat::UltralyticsRtDetr { .. } => ([0.0; 3], [1.0; 3], ResizePolicy::ScaleFill),
            DetectionFormat::Torchvision { .. } => ([0.0; 3], [1.0; 3], ResizePolicy::Stretch),
        }
    }

    /// Whether the predictor clips boxes to the image (Ultralytics' `scale_boxes` does for YOLO; transformers' DETR
    /// post-processing and Ultralytics' RT-DETR predictor, which scale normalised boxes, do not).
    pub fn clips_boxes(self) -> bool {
        !matches!(self, DetectionFormat::Detr { .. } | DetectionFormat::DetrSigmoid { .. } | DetectionFormat::UltralyticsRtDetr { .. })
    }
}

/// What the configuration says about a model's task (the `task`, `score_threshold`, `iou_threshold`,
/// `max_detections` keys) and its labels file.
#[derive(Debug, Clone, Default)]
pub struct TaskConfig {
    pub task: Option<TaskName>,
    /// The `detection_format` key: the layout, whatever the file's metadata says.
    pub format: Option<crate::config::FormatName>,
    pub labels: Option<Vec<String>>,
    pub score_threshold: Option<f32>,
    pub iou_threshold: Option<f32>,
    pub max_detections: Option<usize>,
}

impl Task {
    pub fn as_str(&self) -> &'static str {
        match self {
            Task::Classification => "classification",
            Task::Detection(_) => "detection",
            Task::Segmentation(_) => "segmentation",
            Task::MultiLabel(_) => "multilabel",
            Task::Embedding(_) => "embedding",
        }
    }

    /// The task of a loaded model: the `task` key where given, else Ultralytics' `task` metadata (`detect`), else
    /// classification. A detector must have an output layout camserve decodes; the error names the outputs'
    /// shapes and the keys that describe them. The labels file must have one line per class.
    pub fn recognise(info: &ModelInfo, cfg: &TaskConfig) -> Result<Task, String> {
        Task::recognise_from(&info.metadata, &info.output_dims, info.num_classes, info.input_shape, cfg)
    }

    /// [`Task::recognise`] from the file's metadata, its first output's dims for one image and their size (what
    /// `camserve inspect` has at hand).
    pub fn recognise_from(metadata: &std::collections::BTreeMap<String, String>, dims: &[i64], num_classes: usize, input_shape: [usize; 3], cfg: &TaskConfig) -> Result<Task, String> {
        use crate::config::FormatName;
        let detector_file = metadata.get("task").is_some_and(|t| t == "detect") || metadata.contains_key(JOINED_OUTPUTS_KEY);
        let segment = match cfg.task {
            Some(TaskName::Segmentation) => true,
            Some(_) => false,
            None => cfg.format.is_none() && !detector_file && Segmenter::has_class_maps(dims),
        };
        if segment {
            if cfg.format.is_some() {
                return Err("`detection_format` is set for a model whose `task` is segmentation".into());
            }
            return Segmenter::new(dims, cfg.labels.clone()).map(Task::Segmentation);
        }
        let embedding = match cfg.task {
            Some(TaskName::Embedding) => true,
            Some(_) => false,
            None => cfg.format.is_none() && !detector_file && Embedder::recognised(metadata, dims, cfg.labels.is_some()),
        };
        if embedding {
            if cfg.format.is_some() {
                return Err("`detection_format` is set for a model whose `task` is embedding".into());
            }
            if cfg.labels.is_some() {
                return Err("an embedder's output is a vector, not classes: it takes no labels file".into());
            }
            let [d] = dims else {
                return Err(format!("an embedder's first output is [N, D], one vector per image; this model's is {dims:?} per image"));
            };
            let normalised = metadata.get(FINAL_OP_KEY).is_some_and(|op| op == L2_NORMALIZE);
            return Ok(Task::Embedding(Embedder { dim: *d as usize, normalised }));
        }
        let sigmoid_in_graph = metadata.get(FINAL_OP_KEY).is_some_and(|op| op == "Sigmoid");
        let multilabel = match cfg.task {
            Some(TaskName::Multilabel) => true,
            Some(_) => false,
            None => cfg.format.is_none() && !detector_file && sigmoid_in_graph && dims.len() == 1,
        };
        if multilabel {
            if cfg.format.is_some() {
                return Err("`detection_format` is set for a model whose `task` is multilabel".into());
            }
            let [k] = dims else {
                return Err(format!("a multi-label classifier's first output is [N, classes] (logits, or scores after a Sigmoid); this model's is {dims:?} per image"));
            };
            let classes = *k as usize;
            if let Some(l) = &cfg.labels
                && l.len() != classes
            {
                return Err(format!("{} labels for {classes} classes", l.len()));
            }
            return Ok(Task::MultiLabel(MultiLabel { classes, sigmoid_in_graph, threshold: cfg.score_threshold.unwrap_or(0.5) }));
        }
        let detect = match cfg.task {
            Some(TaskName::Detection) => true,
            Some(TaskName::Classification) if cfg.format.is_some() => {
                return Err("`detection_format` is set for a model whose `task` is classification".into());
            }
            Some(TaskName::Classification) | Some(TaskName::Segmentation) | Some(TaskName::Multilabel) | Some(TaskName::Embedding) => false,
            None => cfg.format.is_some() || detector_file,
        };
        if !detect {
            if let Some(l) = &cfg.labels
                && l.len() != num_classes
            {
                return Err(format!("{} labels for {num_classes} classes", l.len()));
            }
            return Ok(Task::Classification);
        }
        let labels = match (&cfg.labels, metadata.get("names")) {
            (Some(l), _) => Some(l.clone()),
            (None, Some(names)) => Some(parse_names(names).map_err(|e| format!("the file's `names` metadata: {e}"))?),
            (None, None) => None,
        };
        // Ultralytics writes `end2end` (True or False) and the head's class; an RT-DETR export is [N, Q, 6] too, but
        // with normalised centre boxes, so it must not be read as an end-to-end YOLO.
        let rtdetr = match cfg.format {
            Some(f) => f == FormatName::UltralyticsRtdetr,
            None => metadata.get("head").is_some_and(|h| h.contains("RTDETR")),
        };
        let end2end = match cfg.format {
            Some(FormatName::UltralyticsEndToEnd) => Some(true),
            Some(FormatName::Ultralytics) => Some(false),
            Some(_) => None,
            None => metadata.get("end2end").map(|v| v == "True"),
        };
        let joined = metadata.get(JOINED_OUTPUTS_KEY).is_some_and(|v| v == "logits,pred_boxes");
        let torchvision = metadata.get(JOINED_OUTPUTS_KEY).is_some_and(|v| v == TORCHVISION_JOINED);
        if cfg.format.is_some_and(|f| (f == FormatName::Torchvision) != torchvision) {
            return Err(if torchvision {
                "this file is a torchvision detector (one image [C, H, W] in; boxes [D, 4], scores [D] and labels [D] out): its `detection_format` is `torchvision`".into()
            } else {
                "`detection_format = \"torchvision\"` needs the outputs of a torchvision detector exported with its post-processing: boxes float [D, 4], scores float [D] and labels int64 [D], from one image [C, H, W]; this file has no such outputs".into()
            });
        }
        let detr_sigmoid = cfg.format == Some(FormatName::DetrSigmoid);
        if detr_sigmoid && !joined {
            return Err("`detection_format = \"detr_sigmoid\"` needs the outputs `logits` [N, queries, classes] and `pred_boxes` [N, queries, 4], as transformers names them; this file has no such pair".into());
        }
        let detr = match cfg.format {
            Some(FormatName::Detr) if !joined => {
                return Err("`detection_format = \"detr\"` needs the outputs `logits` [N, queries, classes + 1] and `pred_boxes` [N, queries, 4], as transformers names them; this file has no such pair".into());
            }
            Some(f) => f == FormatName::Detr,
            None => joined,
        };
        let format = match dims {
            [rows, 6] if torchvision => {
                let classes = labels.as_ref().map(Vec::len).ok_or_else(|| {
                    "a torchvision detector's labels index its classes (0 is the background in torchvision's own models) and the file does not name them: give a labels file (`labels`), one line per class index".to_string()
                })?;
                DetectionFormat::Torchvision { classes, rows: *rows as usize }
            }
            [queries, width] if detr_sigmoid && *queries >= 1 && *width >= 5 => {
                DetectionFormat::DetrSigmoid { classes: (*width - 4) as usize, queries: *queries as usize }
            }
            _ if detr_sigmoid => {
                return Err(format!(
                    "a sigmoid-scored DETR's outputs `logits` [N, queries, classes] and `pred_boxes` [N, queries, 4] join into [N, queries, classes + 4]; this model's join is {dims:?} per image"
                ));
            }
            [queries, width] if detr && *queries >= 1 && *width >= 6 => DetectionFormat::Detr { classes: (*width - 5) as usize, queries: *queries as usize },
            [rows, 6] if rtdetr && *rows >= 1 => {
                let classes = labels.as_ref().map(Vec::len).ok_or_else(|| {
                    format!("an RT-DETR output [{rows}, 6] does not say how many classes there are: the file has no `names` metadata; give a labels file (`labels`)")
                })?;
                DetectionFormat::UltralyticsRtDetr { classes, rows: *rows as usize }
            }
            _ if rtdetr => {
                return Err(format!("an Ultralytics RT-DETR export's output is [N, rows, 6] (cx, cy, w, h normalised, score, class); this model's is {dims:?} per image"));
            }
            _ if detr => {
                return Err(format!(
                    "a DETR-family detector's outputs `logits` [N, queries, classes + 1] and `pred_boxes` [N, queries, 4] join into [N, queries, classes + 5]; this model's join is {dims:?} per image"
                ));
            }
            // A raw head has at least 21 anchors (a 32 x 32 input), so [Q, 6] with Q != 6 is not one.
            [rows, 6] if *rows >= 1 && end2end != Some(false) && (end2end == Some(true) || *rows != 6) => {
                let classes = labels.as_ref().map(Vec::len).ok_or_else(|| {
                    format!("an end-to-end detector's output [{rows}, 6] does not say how many classes there are: the file has no `names` metadata; give a labels file (`labels`)")
                })?;
                DetectionFormat::UltralyticsEndToEnd { classes, rows: *rows as usize }
            }
            [rows, anchors] if *rows > 4 && *anchors >= 1 && end2end != Some(true) => {
                DetectionFormat::UltralyticsRaw { classes: (*rows - 4) as usize, anchors: *anchors as usize }
            }
            _ => {
                return Err(format!(
                    "a detector's output must be Ultralytics' raw head [N, 4 + classes, anchors] or its end-to-end head [N, rows, 6]{}; this model's first output is {:?} per image. \
                     Set `task = \"classification\"` if it is a classifier",
                    match end2end {
                        Some(true) => " (the file's metadata says end2end True)",
                        Some(false) => " (the file's metadata says end2end False)",
                        None => "",
                    },
                    dims
                ));
            }
        };
        let classes = format.classes();
        if let Some(l) = &labels
            && l.len() != classes
        {
            return Err(format!("{} labels for {classes} classes (the output has {})", l.len(), match format {
                DetectionFormat::Detr { .. } => format!("{} class logits, the last \"no object\"", classes + 1),
                _ => format!("4 + {classes} rows"),
            }));
        }
        let d = format.default_thresholds();
        let thresholds = Thresholds {
            score: cfg.score_threshold.unwrap_or(d.score),
            iou: cfg.iou_threshold.unwrap_or(d.iou),
            max_detections: cfg.max_detections.unwrap_or(d.max_detections),
        };
        Ok(Task::Detection(Detector { format, labels, thresholds, input_shape }))
    }

    /// What a request without `methods` gets: Grad-CAM and guided Grad-CAM for a classifier; HiResCAM for a
    /// detector, whose maps keep the gradient's position, so two boxes of one class at one stride get their own maps
    /// (Grad-CAM averages the gradient over the whole grid; docs/METHODS.md, "Detectors").
    pub fn default_methods(&self) -> Vec<Method> {
        match self {
            Task::Classification => Method::DEFAULT.to_vec(),
            Task::Detection(_) => Method::ALL.into_iter().filter(|m| m.as_str() == "hirescam").collect(),
            Task::Segmentation(_) => Method::ALL.into_iter().filter(|m| m.as_str() == "gradcam").collect(),
            Task::MultiLabel(_) => Method::DEFAULT.to_vec(),
            Task::Embedding(_) => Method::ALL.into_iter().filter(|m| m.as_str() == "gradcam").collect(),
        }
    }

    /// Why the task does not offer `method`, if it does not.
    pub fn refuses(&self, method: Method) -> Option<String> {
        match self {
            Task::Classification if method.as_str() == "drise" => {
                Some("method `drise` (D-RISE) explains a detection of an object detector; a classifier has none".to_string())
            }
            Task::MultiLabel(_) if method.as_str() == "drise" => {
                Some("method `drise` (D-RISE) explains a detection of an object detector; a multi-label classifier has none".to_string())
            }
            Task::Classification | Task::MultiLabel(_) => None,
            // These compare classes or reuse a classifier's head: no meaning for one detection's score.
            Task::Detection(_) if ["reciprocam", "vit_reciprocam", "rise"].contains(&method.as_str()) => Some(format!(
                "method `{method}` scores a classifier's class on masked copies; a detection's score needs its box matched in each copy: use `drise`, the gradient methods or eigencam"
            )),
            Task::Detection(_) if ["cam", "ablationcam", "finercam"].contains(&method.as_str()) => {
                Some(format!("method `{method}` explains a classifier's class (its linear head, or other classes); detectors get the gradient and gradient-free maps"))
            }
            Task::Detection(_) if method.kind == crate::methods::Kind::Attention => Some(format!(
                "method `{method}` follows a classifier's class token through its attention; a detector has none (a DETR's decoder attends from its queries, not from image tokens)"
            )),
            Task::Detection(_) => None,
            Task::Segmentation(_) if ["cam", "ablationcam", "finercam", "scorecam", "reciprocam", "vit_reciprocam", "rise"].contains(&method.as_str()) => Some(format!(
                "method `{method}` scores a classifier's class (its linear head, its softmax, or other classes); a segment's score is a sum of its class's logits over pixels: use the gradient methods or eigencam"
            )),
            Task::Segmentation(_) if method.as_str() == "drise" => Some("method `drise` (D-RISE) explains a detection of an object detector; a segmenter has none".to_string()),
            Task::Segmentation(_) if method.kind == crate::methods::Kind::Attention => {
                Some(format!("method `{method}` follows a classifier's class token through its attention; a segmenter has none"))
            }
            Task::Segmentation(_) => None,
            // A similarity is differentiated at the image's own embedding: the methods that score masked, blurred,
            // interpolated or noisy copies would need the similarity of each copy, and CAM a class's linear head.
            Task::Embedding(_) if method.is_multipass() || method.as_str() == "cam" => Some(format!(
                "method `{method}` scores a classifier's class (its linear head, or copies of the image); an embedder's target is a similarity: use the gradient methods, eigencam or the rollouts"
            )),
            Task::Embedding(_) => None,
        }
    }

    /// A classifier's result from the first row of the request's pass: `logits` and their softmax
    /// `probabilities` (computed once by the pipeline), the best `n` classes.
    pub fn classify(info: &ModelInfo, logits: Vec<f32>, probabilities: Vec<f32>, n: usize) -> TaskResult {
        let top = ranked(logits.iter().copied())
            .into_iter()
            .take(n.min(info.num_classes))
            .map(|i| Prediction { index: i, label: info.label(i).map(str::to_string), score: probabilities[i], logit: logits[i] })
            .collect();
        TaskResult::Classification(Classification { logits, probabilities, top })
    }
}

impl Segmenter {
    /// Whether an output's dims for one image are class maps `[classes, h, w]` (two classes or more, a grid larger
    /// than 1 x 1).
    pub fn has_class_maps(dims: &[i64]) -> bool {
        matches!(dims, [c, h, w] if *c >= 2 && *h >= 1 && *w >= 1 && h * w > 1)
    }

    /// A segmenter from its output's dims for one image and its labels (one per class).
    pub fn new(dims: &[i64], labels: Option<Vec<String>>) -> Result<Segmenter, String> {
        if !Segmenter::has_class_maps(dims) {
            return Err(format!(
                "a segmentation model's first output is class maps [N, classes, h, w] (two classes or more; a one-channel sigmoid mask is not supported); this model's is {dims:?} per image"
            ));
        }
        let (classes, grid) = (dims[0] as usize, [dims[1] as usize, dims[2] as usize]);
        if let Some(l) = &labels
            && l.len() != classes
        {
            return Err(format!("{} labels for {classes} classes (the output has {classes} class maps)", l.len()));
        }
        let background = labels.as_ref().and_then(|l| {
            l.iter().position(|x| ["background", "__background__", "_background_"].contains(&x.trim().to_ascii_lowercase().as_str()))
        });
        Ok(Segmenter { classes, grid, labels, background })
    }

    pub fn label(&self, class: usize) -> Option<&str> {
        self.labels.as_ref().and_then(|l| l.get(class)).map(String::as_str)
    }

    /// A class by index (in range) or label.
    pub fn class_by_label(&self, label: &str) -> Option<usize> {
        self.labels.as_ref()?.iter().position(|l| l == label)
    }

    /// The predicted label map `[h * w]` of one image's output `[classes, h, w]`: the class with the highest logit
    /// at each pixel (the first on a tie, as NumPy's and PyTorch's argmax).
    pub fn label_map(&self, out: &[f32]) -> Vec<u16> {
        let n = self.grid[0] * self.grid[1];
        let mut best = vec![0u16; n];
        let mut top: Vec<f32> = out[..n].to_vec();
        for c in 1..self.classes {
            for (p, &v) in out[c * n..(c + 1) * n].iter().enumerate() {
                if v > top[p] {
                    top[p] = v;
                    best[p] = c as u16;
                }
            }
        }
        best
    }

    /// The classes present in a label map with the fraction of its pixels each covers, largest first (ties by
    /// index).
    pub fn present(&self, labels: &[u16]) -> Vec<(usize, f64)> {
        let mut count = vec![0usize; self.classes];
        for &l in labels {
            count[l as usize] += 1;
        }
        let mut out: Vec<(usize, f64)> =
            count.iter().enumerate().filter(|(_, n)| **n > 0).map(|(c, n)| (c, *n as f64 / labels.len() as f64)).collect();
        out.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        out
    }

    /// The output pixels whose centre lies in `region` (`x, y, width, height` in the model's input pixels, an input
    /// of `[h, w]` pixels).
    pub fn region_pixels(&self, region: [f64; 4], input: [usize; 2]) -> Vec<bool> {
        let [gh, gw] = self.grid;
        let (sy, sx) = (input[0] as f64 / gh as f64, input[1] as f64 / gw as f64);
        let [x, y, w, h] = region;
        let inside = |v: f64, lo: f64, len: f64| v >= lo && v < lo + len;
        (0..gh * gw).map(|p| inside((p % gw) as f64 * sx + 0.5 * sx, x, w) && inside((p / gw) as f64 * sy + 0.5 * sy, y, h)).collect()
    }

    /// The gradient seed of a class's logits summed over `mask`'s pixels (pytorch-grad-cam's
    /// `SemanticSegmentationTarget`): one at those pixels of its class map, zero elsewhere.
    pub fn seed(&self, class: usize, mask: &[bool]) -> Target {
        let n = self.grid[0] * self.grid[1];
        let mut seed = vec![0.0f32; self.classes * n];
        for (s, _) in seed[class * n..(class + 1) * n].iter_mut().zip(mask).filter(|(_, m)| **m) {
            *s = 1.0;
        }
        Target::Seed(seed.into())
    }
}

impl Detector {
    pub fn label(&self, class: usize) -> Option<&str> {
        self.labels.as_ref().and_then(|l| l.get(class)).map(String::as_str)
    }

    /// The detections in one image's output row (the first output, flattened), best first, with `thresholds`.
    pub fn detect(&self, out: &[f32], thresholds: Thresholds) -> Vec<Found> {
        match self.format {
            DetectionFormat::UltralyticsRaw { classes, anchors } => detection::yolo_raw(out, classes, anchors, thresholds),
            DetectionFormat::UltralyticsEndToEnd { classes, rows } => detection::yolo_end2end(out, classes, rows, thresholds),
            DetectionFormat::Detr { classes, queries } => {
                let [_, h, w] = self.input_shape;
                detection::detr(out, classes + 1, queries, w as f32, h as f32, thresholds)
            }
            DetectionFormat::DetrSigmoid { classes, queries } => {
                let [_, h, w] = self.input_shape;
                detection::detr_sigmoid(out, classes, queries, w as f32, h as f32, thresholds)
            }
            DetectionFormat::UltralyticsRtDetr { classes, rows } => {
                let [_, h, w] = self.input_shape;
                detection::rtdetr(out, classes, rows, w as f32, h as f32, thresholds)
            }
            DetectionFormat::Torchvision { classes, rows } => detection::yolo_end2end(out, classes, rows, thresholds),
        }
    }

    /// The gradient seed over one image's output that explains a detection: the one-hot at its score for YOLO
    /// (after the sigmoid, in the graph); for DETR, whose softmax is not in the graph, the gradient of its class's
    /// probability with respect to its query's logits, `p_c (1[k = c] - p_k)`, and zero elsewhere (boxes included).
    pub fn seed(&self, out: &[f32], f: &Found) -> Target {
        match self.format {
            DetectionFormat::UltralyticsRaw { .. }
            | DetectionFormat::UltralyticsEndToEnd { .. }
            | DetectionFormat::UltralyticsRtDetr { .. }
            | DetectionFormat::Torchvision { .. } => Target::Class(self.score_index(f)),
            DetectionFormat::Detr { classes, queries } => {
                let (k, stride) = (classes + 1, classes + 5);
                let mut seed = vec![0.0f32; queries * stride];
                let p = detection::softmax(&out[f.anchor * stride..f.anchor * stride + k]);
                for (j, s) in seed[f.anchor * stride..f.anchor * stride + k].iter_mut().enumerate() {
                    *s = p[f.class] * (if j == f.class { 1.0 } else { 0.0 } - p[j]);
                }
                Target::Seed(seed.into())
            }
            // The probability is the sigmoid of its logit: the seed is p (1 - p) there, zero elsewhere.
            DetectionFormat::DetrSigmoid { classes, queries } => {
                let mut seed = vec![0.0f32; queries * (classes + 4)];
                let i = self.score_index(f);
                let p = detection::sigmoid(out[i]);
                seed[i] = p * (1.0 - p);
                Target::Seed(seed.into())
            }
        }
    }

    /// The flat index, in one image's output, of the score a detection's explanation differentiates: its class
    /// score at its own output row.
    pub fn score_index(&self, f: &Found) -> usize {
        match self.format {
            DetectionFormat::UltralyticsRaw { anchors, .. } => (4 + f.class) * anchors + f.anchor,
            // The row's score, which the graph's TopK gathered from the class scores: the gradient flows back
            // through it.
            DetectionFormat::UltralyticsEndToEnd { .. } | DetectionFormat::UltralyticsRtDetr { .. } => f.anchor * 6 + 4,
            // The kept score, which the graph gathered from the class scores (NMS's and TopK's indices).
            DetectionFormat::Torchvision { .. } => f.anchor * 6 + 4,
            // The logit of its class; its explained score is the probability (`seed`).
            DetectionFormat::Detr { classes, .. } => f.anchor * (classes + 5) + f.class,
            DetectionFormat::DetrSigmoid { classes, .. } => f.anchor * (classes + 4) + f.class,
        }
    }

    /// A detection as D-RISE compares them: its box in input pixels and its class vector (a raw head's class scores
    /// at its anchor; an end-to-end row has only its class's score, so its vector is that score at its class).
    pub fn proposal(&self, out: &[f32], f: &Found) -> crate::methods::drise::Proposal {
        let classes = match self.format {
            DetectionFormat::UltralyticsRaw { classes, anchors } => (0..classes).map(|c| out[(4 + c) * anchors + f.anchor]).collect(),
            DetectionFormat::UltralyticsEndToEnd { classes, .. } | DetectionFormat::UltralyticsRtDetr { classes, .. } | DetectionFormat::Torchvision { classes, .. } => {
                (0..classes).map(|c| if c == f.class { f.score } else { 0.0 }).collect()
            }
            // The probabilities of every class and of "no object", as D-RISE's paper compares Faster R-CNN's.
            DetectionFormat::Detr { classes, .. } => detection::softmax(&out[f.anchor * (classes + 5)..f.anchor * (classes + 5) + classes + 1]),
            DetectionFormat::DetrSigmoid { classes, .. } => out[f.anchor * (classes + 4)..f.anchor * (classes + 4) + classes].iter().map(|&v| detection::sigmoid(v)).collect(),
        };
        crate::methods::drise::Proposal { xyxy: f.xyxy, classes }
    }

    /// The answer's detections, boxes in upload pixels through `to_upload`.
    pub fn describe(&self, found: &[Found], to_upload: impl Fn([f32; 4]) -> [f32; 4]) -> Vec<Detection> {
        found
            .iter()
            .enumerate()
            .map(|(i, f)| Detection { index: i, class_index: f.class, label: self.label(f.class).map(str::to_string), score: f.score, xyxy: to_upload(f.xyxy) })
            .collect()
    }
}

/// A detector's default layer, by format:
/// - YOLO: the head's input at stride 8 (P3), the last feature map on the 1/8 grid made outside the head module (the
///   `model.N` with the largest N). The file's own default (the last grid before any flatten) lies inside the head,
///   where the anchors' reshapes only look like grids.
/// - DETR: the last convolutional map `[N, C, h, w]` before the transformer flattens it into tokens: the input
///   projection to the transformer's width. The file's own default would be a token layer, and a DETR's decoder tokens are
///   its queries (20 queries read as 4 + a 4 x 4 grid), not places in the image.
///
/// - torchvision: the backbone's (or its FPN's) last map on the 1/16 grid.
///
/// `None` when no such map exists (a YOLO whose module paths are not recorded).
pub fn detector_default_layer(format: DetectionFormat, info: &ModelInfo) -> Option<String> {
    detector_layer_of(format, &info.layers, info.input_shape)
}

/// [`detector_default_layer`] from the candidate layers and the input shape `[C, H, W]`.
pub fn detector_layer_of(format: DetectionFormat, layers: &[crate::onnx::rewrite::LayerInfo], input_shape: [usize; 3]) -> Option<String> {
    if let DetectionFormat::Detr { .. } | DetectionFormat::DetrSigmoid { .. } = format {
        // Layers are in topological order: the last map before the first token layer (the flatten into the encoder).
        // Later 4-D tensors inside the attention blocks ([N, T, heads, d]) only look like grids.
        return layers
            .iter()
            .take_while(|l| l.layout == crate::onnx::rewrite::LayerLayout::Nchw)
            .filter(|l| l.native_dims.len() == 4)
            .last()
            .map(|l| l.name.clone());
    }
    if let DetectionFormat::Torchvision { .. } = format {
        // The backbone's (with an FPN: the pyramid's) last map on the 1/16 grid, the stride torchvision's detectors
        // all read (SSDlite's first feature map, the FPN's P4), whose maps still resolve a box; the file's own
        // default would be a head's reshape into anchors.
        let [_, h, w] = input_shape;
        return layers
            .iter()
            .filter(|l| l.layout == crate::onnx::rewrite::LayerLayout::Nchw && l.dims.len() == 4)
            .filter(|l| l.module.as_deref().is_some_and(|m| m == "backbone" || m.starts_with("backbone.")))
            .filter(|l| l.dims[2] as usize == h.div_ceil(16) && l.dims[3] as usize == w.div_ceil(16))
            .next_back()
            .map(|l| l.name.clone());
    }
    let index = |m: &str| m.strip_prefix("model.").and_then(|r| r.split('.').next()).and_then(|n| n.parse::<usize>().ok());
    let head = layers.iter().filter_map(|l| index(l.module.as_deref()?)).max()?;
    let [_, h, w] = input_shape;
    layers
        .iter()
        .filter(|l| l.layout == crate::onnx::rewrite::LayerLayout::Nchw)
        .filter(|l| l.module.as_deref().and_then(index).is_some_and(|i| i < head))
        .filter(|l| l.dims.len() == 4 && l.dims[2] as usize * 8 == h && l.dims[3] as usize * 8 == w)
        .next_back()
        .map(|l| l.name.clone())
}

/// Ultralytics' `names` metadata, a Python dict literal `{0: 'person', 1: 'bicycle', ...}`, as a list by index.
pub fn parse_names(text: &str) -> Result<Vec<String>, String> {
    let inner = text.trim().strip_prefix('{').and_then(|t| t.strip_suffix('}')).ok_or("not a {index: 'name'} dict")?;
    let mut out: Vec<(usize, String)> = Vec::new();
    let mut chars = inner.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace() || *c == ',') {
            chars.next();
        }
        if chars.peek().is_none() {
            break;
        }
        let key: String = std::iter::from_fn(|| chars.next_if(|c| c.is_ascii_digit())).collect();
        let index: usize = key.parse().map_err(|_| format!("expected a class index, found `{}`", chars.clone().take(12).collect::<String>()))?;
        while chars.peek().is_some_and(|c| c.is_whitespace() || *c == ':') {
            chars.next();
        }
        let quote = chars.next().filter(|c| *c == '\'' || *c == '"').ok_or("expected a quoted name")?;
        let mut name = String::new();
        loop {
            match chars.next() {
                None => return Err("a name is not closed".into()),
                Some('\\') => name.push(chars.next().ok_or("a name ends in a backslash")?),
                Some(c) if c == quote => break,
                Some(c) => name.push(c),
            }
        }
        out.push((index, name));
    }
    out.sort_by_key(|(i, _)| *i);
    if out.iter().enumerate().any(|(k, (i, _))| k != *i) {
        return Err("the class indices are not 0, 1, 2, ...".into());
    }
    Ok(out.into_iter().map(|(_, n)| n).collect())
}

/// A detector's detections for D-RISE: those of each masked output, with the request's thresholds, and the
/// detection each explain row explains.
pub struct DetectorProposals<'a> {
    pub detector: &'a Detector,
    pub thresholds: Thresholds,
    pub targets: Vec<crate::methods::drise::Proposal>,
}

impl crate::methods::drise::Proposals for DetectorProposals<'_> {
    fn proposals(&self, out: &[f32]) -> Vec<crate::methods::drise::Proposal> {
        self.detector.detect(out, self.thresholds).iter().map(|f| self.detector.proposal(out, f)).collect()
    }

    fn target(&self, row: usize) -> Option<&crate::methods::drise::Proposal> {
        self.targets.get(row)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ultralytics_names() {
        assert_eq!(parse_names("{0: 'person', 1: \"bi'cycle\", 2: 'a, b'}").unwrap(), ["person", "bi'cycle", "a, b"]);
        assert_eq!(parse_names("{1: 'b', 0: 'a'}").unwrap(), ["a", "b"]);
        assert!(parse_names("{0: 'a', 2: 'c'}").is_err());
        assert!(parse_names("[0, 1]").is_err());
        assert_eq!(parse_names("{}").unwrap(), Vec::<String>::new());
    }

    fn meta(pairs: &[(&str, &str)]) -> std::collections::BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn format_of(pairs: &[(&str, &str)], dims: &[i64]) -> Result<DetectionFormat, String> {
        match Task::recognise_from(&meta(pairs), dims, dims.iter().product::<i64>() as usize, [3, 320, 320], &TaskConfig::default())? {
            Task::Detection(d) => Ok(d.format),
            other => Err(other.as_str().into()),
        }
    }

    #[test]
    fn class_maps_are_a_segmentation() {
        let task = |dims: &[i64], cfg: &TaskConfig| Task::recognise_from(&meta(&[]), dims, dims.iter().product::<i64>() as usize, [3, 64, 64], cfg);
        let labels = |l: &[&str]| TaskConfig { labels: Some(l.iter().map(|s| s.to_string()).collect()), ..Default::default() };
        let Ok(Task::Segmentation(s)) = task(&[3, 16, 16], &labels(&["road", "__background__", "car"])) else { panic!("not a segmentation") };
        assert_eq!((s.classes, s.grid, s.background), (3, [16, 16], Some(1)));
        assert_eq!(task(&[3, 16, 16], &Default::default()).map(|t| t.as_str()), Ok("segmentation"));
        // A classifier's logits, and [K, 1, 1] maps, stay classification; the key overrides the shape.
        assert_eq!(task(&[1000], &Default::default()).map(|t| t.as_str()), Ok("classification"));
        assert_eq!(task(&[1000, 1, 1], &Default::default()).map(|t| t.as_str()), Ok("classification"));
        let classification = TaskConfig { task: Some(TaskName::Classification), ..Default::default() };
        assert_eq!(task(&[3, 16, 16], &classification).map(|t| t.as_str()), Ok("classification"));
        assert!(task(&[3, 16, 16], &labels(&["a", "b"])).unwrap_err().contains("2 labels for 3 classes"));
        let forced = TaskConfig { task: Some(TaskName::Segmentation), ..Default::default() };
        assert!(task(&[1000], &forced).unwrap_err().contains("class maps [N, classes, h, w]"));
        // Ultralytics' detectors are never read as class maps.
        assert_eq!(Task::recognise_from(&meta(&[("task", "detect"), ("names", "{0: 'a'}"), ("end2end", "True")]), &[300, 6], 1800, [3, 64, 64], &Default::default()).map(|t| t.as_str()), Ok("detection"));
    }

    #[test]
    fn label_maps_regions_and_seeds() {
        let s = Segmenter::new(&[3, 2, 4], None).unwrap();
        // Class maps [3, 2, 4]: class 2 wins the first row, class 1 the second; a tie (pixel 3) goes to the first.
        #[rustfmt::skip]
        let out = [
            0.0, 0.0, 0.0, 5.0,   0.0, 0.0, 0.0, 0.0,
            1.0, 1.0, 1.0, 5.0,   3.0, 3.0, 3.0, 3.0,
            2.0, 2.0, 2.0, 5.0,   1.0, 1.0, 1.0, 1.0f32,
        ];
        let labels = s.label_map(&out);
        assert_eq!(labels, [2, 2, 2, 0, 1, 1, 1, 1]);
        assert_eq!(s.present(&labels), vec![(1, 0.5), (2, 0.375), (0, 0.125)]);
        // An 8 x 16 input on this 2 x 4 grid: output pixel (i, j)'s centre is at (4 j + 2, 4 i + 2).
        assert_eq!(s.region_pixels([0.0, 0.0, 6.0, 8.0], [8, 16]), [true, false, false, false, true, false, false, false]);
        assert_eq!(s.region_pixels([6.0, 2.0, 100.0, 0.5], [8, 16]), [false, true, true, true, false, false, false, false]);
        assert_eq!(s.region_pixels([2.5, 0.0, 3.0, 8.0], [8, 16]), [false; 8], "no centre inside");
        let Target::Seed(seed) = s.seed(1, &[true, false, false, false, true, true, false, false]) else { panic!() };
        assert_eq!(seed.len(), 24);
        assert_eq!(seed.iter().enumerate().filter(|(_, v)| **v != 0.0).map(|(i, v)| (i, *v)).collect::<Vec<_>>(), [(8, 1.0), (12, 1.0), (13, 1.0)]);
    }

    #[test]
    fn ultralytics_layouts_from_the_metadata_and_the_shape() {
        let names = "{0: 'a', 1: 'b'}";
        let raw = [("task", "detect"), ("names", names), ("end2end", "False")];
        assert_eq!(format_of(&raw, &[6, 2100]), Ok(DetectionFormat::UltralyticsRaw { classes: 2, anchors: 2100 }));
        let e2e = [("task", "detect"), ("names", names), ("end2end", "True"), ("head", "Detect")];
        assert_eq!(format_of(&e2e, &[300, 6]), Ok(DetectionFormat::UltralyticsEndToEnd { classes: 2, rows: 300 }));
        // Without `end2end`, the shape decides: [Q, 6] is end-to-end, [6, A] a raw head of two classes.
        let bare = [("task", "detect"), ("names", names)];
        assert_eq!(format_of(&bare, &[300, 6]), Ok(DetectionFormat::UltralyticsEndToEnd { classes: 2, rows: 300 }));
        assert_eq!(format_of(&bare, &[6, 2100]), Ok(DetectionFormat::UltralyticsRaw { classes: 2, anchors: 2100 }));
        // The metadata and the shape disagree: refused, saying what the file claims.
        assert!(format_of(&e2e, &[6, 2100]).unwrap_err().contains("end2end True"));
        assert!(format_of(&raw, &[300, 6]).is_err(), "a raw head of 296 classes and 6 anchors, named for 2");
        // An end-to-end head without names does not say its classes.
        assert!(format_of(&[("task", "detect")], &[300, 6]).unwrap_err().contains("labels file"));
        // RT-DETR's [N, Q, 6] has normalised centre boxes: not an end-to-end YOLO.
        let rtdetr = [("task", "detect"), ("names", names), ("head", "RTDETRDecoder")];
        assert_eq!(format_of(&rtdetr, &[300, 6]), Ok(DetectionFormat::UltralyticsRtDetr { classes: 2, rows: 300 }));
        assert!(format_of(&rtdetr, &[300, 84]).unwrap_err().contains("RT-DETR"));
        assert!(format_of(&[("task", "detect"), ("head", "RTDETRDecoder")], &[300, 6]).unwrap_err().contains("labels file"));
    }

    /// The `detection_format` key decides the layout where the file says nothing (or says otherwise), and implies
    /// the detection task.
    #[test]
    fn detection_format_key_overrides_the_file() {
        use crate::config::FormatName;
        let with = |f: FormatName, labels: usize| TaskConfig { format: Some(f), labels: Some(vec!["x".into(); labels]), ..Default::default() };
        let of = |m: &[(&str, &str)], dims: &[i64], cfg: &TaskConfig| match Task::recognise_from(&meta(m), dims, dims.iter().product::<i64>() as usize, [3, 320, 320], cfg) {
            Ok(Task::Detection(d)) => Ok(d.format),
            Ok(other) => Err(other.as_str().to_string()),
            Err(e) => Err(e),
        };
        // No metadata at all (a plain torch.onnx.export of a YOLO): classification unless the key says otherwise.
        assert_eq!(of(&[], &[84, 2100], &TaskConfig::default()), Err("classification".into()));
        assert_eq!(of(&[], &[84, 2100], &with(FormatName::Ultralytics, 80)), Ok(DetectionFormat::UltralyticsRaw { classes: 80, anchors: 2100 }));
        assert_eq!(of(&[], &[300, 6], &with(FormatName::UltralyticsEndToEnd, 2)), Ok(DetectionFormat::UltralyticsEndToEnd { classes: 2, rows: 300 }));
        assert_eq!(of(&[], &[100, 6], &with(FormatName::UltralyticsRtdetr, 2)), Ok(DetectionFormat::UltralyticsRtDetr { classes: 2, rows: 100 }));
        // The key wins over the metadata: an RT-DETR head read as an end-to-end YOLO because the user says so.
        assert_eq!(of(&[("head", "RTDETRDecoder")], &[100, 6], &with(FormatName::UltralyticsEndToEnd, 2)), Ok(DetectionFormat::UltralyticsEndToEnd { classes: 2, rows: 100 }));
        // DETR needs its two outputs, which the rewrite joins.
        assert!(of(&[], &[100, 96], &with(FormatName::Detr, 91)).unwrap_err().contains("pred_boxes"));
        let classification = TaskConfig { task: Some(TaskName::Classification), format: Some(FormatName::Ultralytics), ..Default::default() };
        assert!(of(&[], &[84, 2100], &classification).unwrap_err().contains("detection_format"));
        // The config file spells the values as the model view does.
        for (text, f) in [("ultralytics", FormatName::Ultralytics), ("ultralytics_end2end", FormatName::UltralyticsEndToEnd), ("ultralytics_rtdetr", FormatName::UltralyticsRtdetr), ("detr", FormatName::Detr), ("detr_sigmoid", FormatName::DetrSigmoid), ("torchvision", FormatName::Torchvision)] {
            use figment::providers::Format as _;
            let toml = format!("name = \"m\"\npath = \"m.onnx\"\ndetection_format = \"{text}\"");
            let m: crate::config::ModelConfig = figment::Figment::from(figment::providers::Toml::string(&toml)).extract().unwrap();
            assert_eq!(m.detection_format, Some(f));
        }
    }

    /// A torchvision detector (the rewrite joined its boxes, scores and labels): recognised from the join, classes
    /// from the labels (required), the model's own thresholds (nothing more dropped), the key only where it fits.
    #[test]
    fn torchvision_from_its_joined_outputs() {
        use crate::config::FormatName;
        let joined = [(JOINED_OUTPUTS_KEY, TORCHVISION_JOINED)];
        let labels = |n: usize| TaskConfig { labels: Some(vec!["x".into(); n]), ..Default::default() };
        let of = |m: &[(&str, &str)], cfg: &TaskConfig| Task::recognise_from(&meta(m), &[1000, 6], 6000, [3, 320, 320], cfg);
        let Ok(Task::Detection(d)) = of(&joined, &labels(91)) else { panic!() };
        assert_eq!(d.format, DetectionFormat::Torchvision { classes: 91, rows: 1000 });
        assert_eq!((d.thresholds.score, d.thresholds.max_detections), (0.0, 1000));
        assert_eq!(d.format.default_preprocessing(), ([0.0; 3], [1.0; 3], ResizePolicy::Stretch));
        assert!(of(&joined, &TaskConfig::default()).unwrap_err().contains("labels file"));
        let key = |f: FormatName| TaskConfig { format: Some(f), ..labels(91) };
        assert!(of(&joined, &key(FormatName::Torchvision)).is_ok());
        assert!(of(&joined, &key(FormatName::UltralyticsEndToEnd)).unwrap_err().contains("`torchvision`"));
        assert!(of(&[], &key(FormatName::Torchvision)).unwrap_err().contains("labels int64 [D]"));
        // Its rows decode as an end-to-end head's: the zero rows after the model's detections are not detections.
        let mut out = vec![0.0f32; 1000 * 6];
        out[..12].copy_from_slice(&[1.0, 2.0, 30.0, 40.0, 0.9, 3.0, 5.0, 6.0, 7.0, 8.0, 0.05, 1.0]);
        let found = d.detect(&out, d.thresholds);
        assert_eq!(found.iter().map(|f| (f.anchor, f.class, f.score)).collect::<Vec<_>>(), [(0, 3, 0.9), (1, 1, 0.05)]);
        assert_eq!(d.score_index(&found[1]), 10);
    }

    #[test]
    fn detr_from_its_joined_outputs() {
        let joined = [(JOINED_OUTPUTS_KEY, "logits,pred_boxes")];
        // 91 + 1 class logits and 4 box values per query (transformers' facebook/detr-resnet-50).
        assert_eq!(format_of(&joined, &[100, 96]), Ok(DetectionFormat::Detr { classes: 91, queries: 100 }));
        assert!(format_of(&joined, &[100, 5]).unwrap_err().contains("pred_boxes"), "one logit: no real class");
        assert!(format_of(&joined, &[100]).is_err());
        let Ok(Task::Detection(d)) = Task::recognise_from(&meta(&joined), &[20, 10], 200, [3, 320, 320], &TaskConfig::default()) else { panic!() };
        assert_eq!((d.thresholds.score, d.thresholds.max_detections), (0.5, 20), "transformers' threshold, every query");
        assert!(!d.format.clips_boxes());
        let wrong = TaskConfig { labels: Some(vec!["a".into(); 6]), ..Default::default() };
        assert!(Task::recognise_from(&meta(&joined), &[20, 10], 200, [3, 320, 320], &wrong).unwrap_err().contains("6 labels for 5 classes"));
    }

    /// A sigmoid-scored DETR (the key says it; the file cannot): the best (query, class) pairs over all queries and
    /// classes, a query giving two detections, `top_k` (`max_detections`) cutting before the threshold; the seed is
    /// the gradient of the pair's sigmoid probability, checked against central differences.
    #[test]
    fn detr_sigmoid_from_the_key() {
        use crate::config::FormatName;
        let joined = [(JOINED_OUTPUTS_KEY, "logits,pred_boxes")];
        let cfg = TaskConfig { format: Some(FormatName::DetrSigmoid), ..Default::default() };
        let Ok(Task::Detection(d)) = Task::recognise_from(&meta(&joined), &[2, 7], 14, [3, 10, 20], &cfg) else { panic!() };
        assert_eq!(d.format, DetectionFormat::DetrSigmoid { classes: 3, queries: 2 });
        assert_eq!((d.thresholds.score, d.thresholds.max_detections), (0.5, 100));
        assert!(Task::recognise_from(&meta(&[]), &[2, 7], 14, [3, 10, 20], &cfg).unwrap_err().contains("pred_boxes"));
        // Without the key the same file is a softmax DETR of two classes.
        let Ok(Task::Detection(plain)) = Task::recognise_from(&meta(&joined), &[2, 7], 14, [3, 10, 20], &TaskConfig::default()) else { panic!() };
        assert_eq!(plain.format, DetectionFormat::Detr { classes: 2, queries: 2 });
        let out = vec![2.0, 0.5, -1.0, 0.5, 0.5, 0.2, 0.4, /* query 1 */ 1.0, 3.0, 0.1, 0.25, 0.25, 0.1, 0.1];
        let found = d.detect(&out, d.thresholds);
        assert_eq!(found.iter().map(|f| (f.anchor, f.class)).collect::<Vec<_>>(), [(1, 1), (0, 0), (1, 0), (0, 1), (1, 2)]);
        assert_eq!(found[0].xyxy, [(0.25 - 0.05) * 20.0, (0.25 - 0.05) * 10.0, (0.25 + 0.05) * 20.0, (0.25 + 0.05) * 10.0]);
        let top2 = d.detect(&out, Thresholds { max_detections: 2, ..d.thresholds });
        assert_eq!(top2.len(), 2);
        for f in &found {
            let Target::Seed(seed) = d.seed(&out, f) else { panic!() };
            let score = |o: &[f32]| detection::sigmoid(o[f.anchor * 7 + f.class]) as f64;
            for (j, g) in seed.iter().enumerate() {
                let (mut up, mut down) = (out.clone(), out.clone());
                up[j] += 1e-3;
                down[j] -= 1e-3;
                let fd = (score(&up) - score(&down)) / 2e-3;
                assert!((fd - *g as f64).abs() < 1e-4, "entry {j}: seed {g}, finite difference {fd}");
            }
        }
    }

    /// DETR's seed is the gradient of the softmax probability of the detection's class with respect to its query's
    /// logits: checked against central differences of the decoded score.
    #[test]
    fn detr_seed_is_the_probability_gradient() {
        let d = Detector { format: DetectionFormat::Detr { classes: 3, queries: 2 }, labels: None, thresholds: DetectionFormat::Detr { classes: 3, queries: 2 }.default_thresholds(), input_shape: [3, 10, 20] };
        let out = vec![0.1, 2.5, -0.3, 0.2, 0.5, 0.5, 0.2, 0.4, /* query 1 */ 3.0, 0.0, 0.0, 1.0, 0.5, 0.5, 1.0, 1.0];
        let found = d.detect(&out, Thresholds { score: 0.3, ..d.thresholds });
        assert_eq!(found.iter().map(|f| (f.anchor, f.class)).collect::<Vec<_>>(), [(1, 0), (0, 1)]);
        assert_eq!(found[1].xyxy, [(0.5 - 0.1) * 20.0, (0.5 - 0.2) * 10.0, (0.5 + 0.1) * 20.0, (0.5 + 0.2) * 10.0]);
        for f in &found {
            let Target::Seed(seed) = d.seed(&out, f) else { panic!() };
            let score = |o: &[f32]| detection::softmax(&o[f.anchor * 8..f.anchor * 8 + 4])[f.class] as f64;
            for (j, g) in seed.iter().enumerate() {
                let (mut up, mut down) = (out.clone(), out.clone());
                up[j] += 1e-3;
                down[j] -= 1e-3;
                let fd = (score(&up) - score(&down)) / 2e-3;
                assert!((fd - *g as f64).abs() < 1e-4, "entry {j}: seed {g}, finite difference {fd}");
            }
        }
    }

    #[test]
    fn similarity_seed_is_the_cosine_gradient() {
        let e = [0.3f32, -1.2, 2.0, 0.05, -0.7];
        let r = [1.0f32, 0.4, -0.3, 2.2, 0.1];
        let cos = |x: &[f64]| {
            let dot: f64 = x.iter().zip(&r).map(|(a, b)| a * *b as f64).sum();
            dot / (x.iter().map(|a| a * a).sum::<f64>().sqrt() * r.iter().map(|b| (*b as f64).powi(2)).sum::<f64>().sqrt())
        };
        let e64: Vec<f64> = e.iter().map(|v| *v as f64).collect();
        let (value, seed) = Embedder::similarity(&e, &r).unwrap();
        assert!((value - cos(&e64)).abs() < 1e-12);
        for (j, g) in seed.iter().enumerate() {
            let (mut up, mut down) = (e64.clone(), e64.clone());
            up[j] += 1e-6;
            down[j] -= 1e-6;
            let fd = (cos(&up) - cos(&down)) / 2e-6;
            assert!((fd - *g as f64).abs() < 1e-6, "entry {j}: seed {g}, finite difference {fd}");
        }
        // The seed is orthogonal to e (cosine does not change with e's length) and zero vectors have no similarity.
        assert!(seed.iter().zip(&e).map(|(g, a)| *g as f64 * *a as f64).sum::<f64>().abs() < 1e-6);
        assert!(Embedder::similarity(&[0.0; 5], &r).is_none() && Embedder::similarity(&e, &[0.0; 5]).is_none());
        // The mean direction counts each vector the same whatever its length.
        let m = Embedder::mean_direction(&[&[3.0, 0.0], &[0.0, 0.5]]).unwrap();
        assert_eq!(m, vec![0.5, 0.5]);
    }

    #[test]
    fn embedders_from_the_output_name_or_a_final_normalisation() {
        let meta = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<std::collections::BTreeMap<_, _>>();
        let cfg = TaskConfig::default();
        let task = |m: &std::collections::BTreeMap<String, String>, dims: &[i64], cfg: &TaskConfig| Task::recognise_from(m, dims, dims.iter().product::<i64>() as usize, [3, 224, 224], cfg);
        for name in ["embedding", "image_embeds", "pooler_output", "text_embeds_proj"] {
            assert_eq!(task(&meta(&[(OUTPUT_NAME_KEY, name)]), &[512], &cfg), Ok(Task::Embedding(Embedder { dim: 512, normalised: false })), "{name}");
        }
        assert_eq!(task(&meta(&[(OUTPUT_NAME_KEY, "output"), (FINAL_OP_KEY, L2_NORMALIZE)]), &[128], &cfg), Ok(Task::Embedding(Embedder { dim: 128, normalised: true })));
        // A classifier's output, or any output with a labels file, stays a classification.
        assert_eq!(task(&meta(&[(OUTPUT_NAME_KEY, "logits")]), &[1000], &cfg), Ok(Task::Classification));
        let labelled = TaskConfig { labels: Some(vec!["a".into(); 512]), ..Default::default() };
        assert_eq!(task(&meta(&[(OUTPUT_NAME_KEY, "embedding")]), &[512], &labelled), Ok(Task::Classification));
        // The key states it; an embedder takes no labels.
        let stated = TaskConfig { task: Some(TaskName::Embedding), ..Default::default() };
        assert_eq!(task(&meta(&[(OUTPUT_NAME_KEY, "output")]), &[64], &stated), Ok(Task::Embedding(Embedder { dim: 64, normalised: false })));
        let both = TaskConfig { task: Some(TaskName::Embedding), labels: Some(vec!["a".into(); 64]), ..Default::default() };
        assert!(task(&meta(&[]), &[64], &both).unwrap_err().contains("takes no labels file"));
        assert!(task(&meta(&[]), &[6, 8, 8], &stated).unwrap_err().contains("[N, D]"));
    }
}
