//! The request pipeline behind every protocol: validate the options and the request's cost, decode and
//! preprocess the image, run the explain pass through the model's batcher, compute every (target, method) map
//! through `methods::compute` (one-pass and multi-pass alike), run the metrics on them, and render. It returns a
//! typed [`Answer`]; the protocols (`api::v1`, `api::oip`, `api::kserve`, the CLI) encode it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use image::RgbImage;
use ndarray::Array3;

use super::answer::{Answer, Detection, Embedding, ExplainedTarget, Explanation, ImageSize, ReferenceImage, SegmentClass, Segmentation, TaskResult, Timings};
use super::explanations::{prepare_all, render_all, ComputedMap};
use super::options::{DetectionPick, RequestOptions, OptionLimits, RawOptions, SegmentClassPick};
use super::task::{Detector, DetectorProposals, Embedder, MultiLabel, Segmenter, Task};
use crate::backend::batcher::{Images, Queue, Target};
use crate::backend::engine::{BatchOutput, ModelInfo, PlanKey};
use crate::detection::Thresholds;
use crate::letterbox;
use crate::error::ServiceError;
use crate::methods::{self, Kind, Passes};
use crate::onnx::rewrite::ExplainPlan;
use crate::preprocess::{self, DecodeLimits, ResizePolicy};

pub struct ModelHandle {
    pub info: Arc<ModelInfo>,
    /// What the model's outputs are (core/task.rs).
    pub task: Task,
    pub queue: Queue,
    /// Its place in the configuration: `GET /v1/models` lists models in that order (the page opens on the first).
    pub position: usize,
    /// The batcher's `max_batch`: the multi-pass methods submit their rows in jobs of this size.
    pub max_batch: usize,
}

impl ModelHandle {
    /// A loaded classifier behind its batcher's queue.
    pub fn new(info: Arc<ModelInfo>, queue: Queue, position: usize, max_batch: usize) -> ModelHandle {
        ModelHandle { task: Task::Classification, info, queue, position, max_batch }
    }

    /// The same with the task the registry recognised.
    pub fn with_task(self, task: Task) -> ModelHandle {
        ModelHandle { task, ..self }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct ServiceLimits {
    pub decode: DecodeLimits,
    pub options: OptionLimits,
    pub request_timeout: Duration,
    /// The most forward-equivalents one request may cost (`server.max_forward_passes`; methods::request_cost).
    pub max_forward_passes: u64,
}

pub struct Service {
    /// Set once every configured model is loaded and warmed.
    models: OnceLock<BTreeMap<String, ModelHandle>>,
    pub limits: ServiceLimits,
    draining: AtomicBool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Predict,
    Explain,
}

/// What a request brings as its image.
#[derive(Clone)]
pub enum ImageInput {
    /// An encoded file (JPEG, PNG, ...): decoded and preprocessed for the model.
    Encoded(Bytes),
    /// The model's input tensor `[C, H, W]`, already preprocessed; overlays are drawn on the image it stands for
    /// (the preprocessing undone).
    Tensor(ndarray::Array3<f32>),
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e5).round() / 100.0
}

// ------------------------------------------------------------------------------------------ the workflow

impl Service {
    pub fn new(limits: ServiceLimits) -> Service {
        Service { models: OnceLock::new(), limits, draining: AtomicBool::new(false) }
    }

    /// Makes the loaded models available; from now on the service is ready (unless draining).
    pub fn install(&self, models: BTreeMap<String, ModelHandle>) {
        if self.models.set(models).is_err() {
            tracing::warn!("models installed twice; keeping the first set");
        }
    }

    pub fn models(&self) -> Result<&BTreeMap<String, ModelHandle>, ServiceError> {
        self.models.get().ok_or_else(|| ServiceError::NotReady("the models are still loading".into()))
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.models.get().is_some() && !self.draining.load(Ordering::SeqCst)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    pub fn model(&self, name: &str) -> Result<&ModelHandle, ServiceError> {
        self.models()?.get(name).ok_or_else(|| ServiceError::UnknownModel(name.to_string()))
    }

    pub async fn handle(&self, model: &str, endpoint: Endpoint, image: Bytes, raw: RawOptions) -> Result<Answer, ServiceError> {
        self.handle_input(model, endpoint, ImageInput::Encoded(image), vec![], raw).await
    }

    /// One request, start to end: admit it, decode its image (and an embedder's reference images, each named as
    /// the request gave it, for the errors), run its pass (or passes), explain and render.
    pub async fn handle_input(&self, model: &str, endpoint: Endpoint, image: ImageInput, references: Vec<Reference>, raw: RawOptions) -> Result<Answer, ServiceError> {
        self.handle_run(model, endpoint, image, references, raw, Run::default()).await
    }

    /// What admitting a request would decide, without running it: its options checked, and for an explain request
    /// its cost against the budget and its estimated time against `timeout` (the request's deadline). An
    /// asynchronous job is assessed so before it is accepted.
    pub fn assess(&self, model: &str, endpoint: Endpoint, raw: &RawOptions, timeout: Duration) -> Result<Assessment, ServiceError> {
        let handle = self.model(model)?;
        self.admit(handle, endpoint, raw, timeout).map(|(_, a)| a)
    }

    /// [`Service::handle_input`] with its own deadline, progress counter and priority (an asynchronous job's).
    pub async fn handle_run(&self, model: &str, endpoint: Endpoint, image: ImageInput, references: Vec<Reference>, raw: RawOptions, run: Run) -> Result<Answer, ServiceError> {
        let started = Instant::now();
        let timeout = run.timeout.unwrap_or(self.limits.request_timeout);
        let handle = self.model(model)?;
        let info = handle.info.clone();
        let (options, _) = self.admit(handle, endpoint, &raw, timeout)?;
        if !references.is_empty() {
            if !matches!(handle.task, Task::Embedding(_)) {
                return Err(ServiceError::Unprocessable(format!(
                    "a reference image ({}) applies to embedders; model `{}`'s task is {}",
                    references[0].name,
                    info.name,
                    handle.task.as_str()
                )));
            }
            if options.reference_vector.is_some() {
                return Err(ServiceError::Unprocessable("give reference images or reference_vector, not both".into()));
            }
            if references.len() > MAX_REFERENCES {
                return Err(ServiceError::Unprocessable(format!("{} reference images; at most {MAX_REFERENCES} are accepted", references.len())));
            }
        }
        let decoded = decode(info.clone(), image, self.limits.decode).await?;
        let mut reference_images = Vec::with_capacity(references.len());
        for r in references {
            let named = |e: ServiceError| match e {
                ServiceError::BadRequest(m) => ServiceError::BadRequest(format!("reference image {}: {m}", r.name)),
                ServiceError::TooLarge(m) => ServiceError::TooLarge(format!("reference image {}: {m}", r.name)),
                other => other,
            };
            reference_images.push(decode(info.clone(), r.image.clone(), self.limits.decode).await.map_err(named)?);
        }
        let mut timings = Timings { decode: ms(started.elapsed()), ..Default::default() };
        let deadline = started + timeout;
        // The request's own pass and every multi-pass method's and metric's batches go through one handle.
        let passes = Passes { progress: run.progress.as_deref(), background: run.background, ..Passes::new(&handle.queue, &info, handle.max_batch, deadline, timeout) };
        let request = Request { info: &info, endpoint, options, passes: &passes, budget: self.limits.max_forward_passes };
        let (result, explanations) = match &handle.task {
            Task::Classification => request.classify(decoded, &mut timings, None).await?,
            Task::MultiLabel(ml) => request.classify(decoded, &mut timings, Some(ml)).await?,
            Task::Detection(detector) => request.detect(detector, decoded, &mut timings).await?,
            Task::Segmentation(segmenter) => request.segment(segmenter, decoded, &mut timings).await?,
            Task::Embedding(embedder) => request.embed(embedder, decoded, reference_images, &mut timings).await?,
        };
        timings.total = ms(started.elapsed());
        let ((result, image), explanations) = (result, explanations);
        Ok(Answer { model: info.name.clone(), device: info.device, image, result, explanations, timings })
    }

    /// Validates the options and, for an explain request, its cost and estimated time (against `timeout`); refuses
    /// before any work when the model's queue is full.
    fn admit(&self, handle: &ModelHandle, endpoint: Endpoint, raw: &RawOptions, timeout: Duration) -> Result<(RequestOptions, Assessment), ServiceError> {
        let info = &handle.info;
        let options = raw.validate_for(info, &handle.task, self.limits.options)?;
        let mut assessment = Assessment { cost: 1, estimate_seconds: None };
        if endpoint == Endpoint::Explain {
            let cost = methods::request_cost(info, &options.work());
            assessment.cost = cost;
            if cost > self.limits.max_forward_passes {
                return Err(ServiceError::Unprocessable(format!(
                    "this request costs {cost} forward passes (methods, metrics and targets together; GET /v1/models/{} gives each method's cost), over the limit of {} (server.max_forward_passes)",
                    info.name, self.limits.max_forward_passes
                )));
            }
            // The time it would take at the model's measured speed: a request that cannot finish within its deadline
            // is refused before any work, rather than answered 504 after the work was done.
            if let Some(seconds) = methods::request_seconds(info, handle.queue.times(), &options.work()) {
                assessment.estimate_seconds = Some(seconds);
                let limit = timeout.as_secs_f64();
                if seconds > limit {
                    let (what, how) = if timeout == self.limits.request_timeout {
                        ("request timeout (server.request_timeout_ms)", "send it as a job (`Prefer: respond-async` or `?async=true`), or ask")
                    } else {
                        ("job timeout (jobs.timeout_ms)", "ask")
                    };
                    return Err(ServiceError::Unprocessable(format!(
                        "this request is estimated to take {seconds:.1} s ({cost} forward passes at model `{}`'s measured speed; GET /v1/models/{} gives each method's estimate), over the {limit} s {what}: {how} for fewer `channels` (scorecam), `steps` (integrated_gradients), `samples` (smoothgrad), `masks` (drise) or `rise_masks` (rise), or fewer methods or targets",
                        info.name, info.name
                    )));
                }
            }
        }
        // Under overload, refuse before spending a decode on a request that cannot be queued.
        let rows = if endpoint == Endpoint::Predict { 1 } else { options.targets.len() };
        if !handle.queue.has_room(rows) {
            metrics::counter!("camserve_queue_rejections_total").increment(1);
            return Err(ServiceError::QueueFull(info.name.clone()));
        }
        Ok((options, assessment))
    }
}

/// How a request runs: its deadline (default `server.request_timeout_ms`) and, for an asynchronous job, the counter
/// its progress goes to and the background priority of its batches.
#[derive(Debug, Clone, Default)]
pub struct Run {
    pub timeout: Option<Duration>,
    pub progress: Option<Arc<std::sync::atomic::AtomicU64>>,
    pub background: bool,
}

/// What admitting a request decided: its cost in forward-equivalents and its estimated time in seconds (`None`
/// before the model has run a pass).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Assessment {
    pub cost: u64,
    pub estimate_seconds: Option<f64>,
}

/// One admitted request on its model.
struct Request<'a> {
    info: &'a Arc<ModelInfo>,
    endpoint: Endpoint,
    options: RequestOptions,
    passes: &'a Passes<'a>,
    /// `server.max_forward_passes`, for a cost known only after a first pass (a multi-label request's classes).
    budget: u64,
}

/// A task's result and the explanations, if asked for.
type Answered = ((TaskResult, ImageSize), Option<Vec<Explanation>>);

impl Request<'_> {
    /// A classifier: one pass, whose targets (ranks or classes) are chosen in the graph. A multi-label classifier
    /// (`multilabel`) scores classes with their sigmoid; its default targets, the classes at or above the threshold,
    /// are found by a forward pass first.
    async fn classify(self, decoded: Decoded, timings: &mut Timings, multilabel: Option<&MultiLabel>) -> Result<Answered, ServiceError> {
        let Request { info, endpoint, options, passes, budget } = self;
        let scores = |logits: ndarray::ArrayView1<f32>| match multilabel {
            Some(ml) => ml.scores(&logits.to_vec()),
            None => crate::maths::softmax(logits),
        };
        let mut targets = options.targets.clone();
        if endpoint == Endpoint::Explain
            && let Some((threshold, most)) = options.above_threshold
        {
            let first = passes.wait(passes.submit(&PlanKey::Predict, Images::One(decoded.input.clone()), vec![Target::Rank(0)], "predict")?).await?;
            let probabilities = scores(first.output.logits.row(0));
            let classes: Vec<usize> = multilabel.map(|ml| ml.above(&probabilities, threshold)).unwrap_or_default();
            if classes.is_empty() {
                (timings.queue, timings.inference) = (ms(first.queue), ms(first.inference));
                let result = Task::classify(info, first.output.logits.row(0).to_vec(), probabilities, options.top_k.max(5));
                return Ok(((result, decoded.size), Some(Vec::new())));
            }
            targets = classes.into_iter().take(most).map(Target::Class).collect();
            let cost = methods::request_cost(info, &methods::Work { targets: targets.len(), ..options.work() });
            if cost > budget {
                return Err(ServiceError::Unprocessable(format!(
                    "this request explains {} classes at or above the score threshold {threshold}, which costs {cost} forward passes, over the limit of {budget} (server.max_forward_passes): raise score_threshold or give target",
                    targets.len()
                )));
            }
        }
        let (plan, targets, label) = match endpoint {
            Endpoint::Predict => (PlanKey::Predict, vec![Target::Rank(0)], "predict"),
            Endpoint::Explain => (explain_plan(info, &options), targets, "explain"),
        };
        let needs_image = endpoint == Endpoint::Explain && (options.methods.iter().any(|m| m.is_multipass()) || !options.metrics.is_empty());
        let kept_input = needs_image.then(|| decoded.input.clone());
        let out = passes.wait(passes.submit(&plan, Images::One(decoded.input), targets, label)?).await?;
        (timings.queue, timings.inference) = (ms(out.queue), ms(out.inference));
        // Softmax (sigmoid for a multi-label classifier) once per row of the pass: the predictions, the targets'
        // scores and the metrics read it.
        let probabilities: Vec<Vec<f32>> = out.output.logits.outer_iter().map(scores).collect();
        let result = Task::classify(info, out.output.logits.row(0).to_vec(), probabilities[0].clone(), options.top_k.max(5));
        let explanations = match endpoint {
            Endpoint::Predict => None,
            Endpoint::Explain => {
                let output = out.output;
                let targets: Vec<ExplainedTarget> = (0..output.len())
                    .map(|row| {
                        let class = methods::row_class(&output, row)?;
                        Ok(ExplainedTarget::Class { index: class, label: info.label(class).map(str::to_string), score: probabilities[row][class] })
                    })
                    .collect::<Result<_, ServiceError>>()?;
                let scores = match multilabel {
                    Some(ml) if ml.sigmoid_in_graph => methods::Probabilities::AsIs,
                    Some(_) => methods::Probabilities::Sigmoid,
                    None => methods::Probabilities::Softmax,
                };
                let work = Explaining { info, options, output, probabilities, targets, passes, input: kept_input, proposals: None, seeds: vec![], scores };
                Some(work.run(decoded.orig, decoded.model_rgb, decoded.region, timings).await?)
            }
        };
        Ok(((result, decoded.size), explanations))
    }

    /// A detector: a forward pass finds the detections; an explain request then runs the explain pass with one
    /// seed row per picked detection (its class score at its own output row).
    async fn detect(self, detector: &Detector, decoded: Decoded, timings: &mut Timings) -> Result<Answered, ServiceError> {
        let Request { info, endpoint, options, passes, .. } = self;
        let first = passes.wait(passes.submit(&PlanKey::Predict, Images::One(decoded.input.clone()), vec![Target::Rank(0)], "detect")?).await?;
        (timings.queue, timings.inference) = (ms(first.queue), ms(first.inference));
        let d = detector.thresholds;
        let thresholds = Thresholds { score: options.score_threshold.unwrap_or(d.score), iou: options.iou_threshold.unwrap_or(d.iou), ..d };
        // The output row in place (a copy only if it is not contiguous); D-RISE reads the picked detections' class
        // vectors from it.
        let row = first.output.logits.row(0);
        let values: std::borrow::Cow<[f32]> = match row.as_slice() {
            Some(v) => std::borrow::Cow::Borrowed(v),
            None => std::borrow::Cow::Owned(row.to_vec()),
        };
        let found = detector.detect(&values, thresholds);
        let (w, h) = (decoded.size.width, decoded.size.height);
        let [_, ih, iw] = info.input_shape;
        let detections = if info.pixels.resize == ResizePolicy::Letterbox {
            let p = letterbox::placement(w, h, iw as u32, ih as u32);
            detector.describe(&found, |b| p.to_upload(b, w, h))
        } else {
            let r = decoded.region;
            let (sx, sy) = ((r.width / iw as f64) as f32, (r.height / ih as f64) as f32);
            let (x0, y0) = (r.x as f32, r.y as f32);
            let clip = |v: f32, max: u32| if detector.format.clips_boxes() { v.clamp(0.0, max as f32) } else { v };
            detector.describe(&found, |b| [clip(x0 + b[0] * sx, w), clip(y0 + b[1] * sy, h), clip(x0 + b[2] * sx, w), clip(y0 + b[3] * sy, h)])
        };
        if endpoint == Endpoint::Predict || detections.is_empty() {
            let explanations = (endpoint == Endpoint::Explain).then(Vec::new);
            return Ok(((TaskResult::Detection(detections), decoded.size), explanations));
        }
        let picked = pick(&options.picks, &detections)?;
        let seeds: Vec<Target> = picked.iter().map(|&i| detector.seed(&values, &found[i])).collect();
        let targets: Vec<ExplainedTarget> =
            picked.iter().map(|&i| ExplainedTarget::Detection { index: i, label: detections[i].label.clone(), score: detections[i].score }).collect();
        let needs_image = options.methods.iter().any(|m| m.is_multipass());
        let kept_input = needs_image.then(|| decoded.input.clone());
        let row_seeds = seeds_of(&seeds);
        let out = passes.wait(passes.submit(&explain_plan(info, &options), Images::One(decoded.input), seeds, "explain")?).await?;
        timings.queue += ms(out.queue);
        timings.inference += ms(out.inference);
        // D-RISE compares each masked image's detections with the picked ones.
        let proposals = options.methods.iter().any(|m| m.as_str() == "drise").then(|| DetectorProposals {
            detector,
            thresholds,
            targets: picked.iter().map(|&i| detector.proposal(&values, &found[i])).collect(),
        });
        let work = Explaining { info, options, output: out.output, probabilities: vec![], targets, passes, input: kept_input, proposals, seeds: row_seeds, scores: Default::default() };
        let explanations = work.run(decoded.orig, decoded.model_rgb, decoded.region, timings).await?;
        Ok(((TaskResult::Detection(detections), decoded.size), Some(explanations)))
    }
}

impl Request<'_> {
    /// A segmenter: a forward pass gives the label map; an explain request then runs the explain pass with one seed
    /// row per segment (its class's logits over its pixels).
    async fn segment(self, seg: &Segmenter, decoded: Decoded, timings: &mut Timings) -> Result<Answered, ServiceError> {
        let Request { info, endpoint, options, passes, .. } = self;
        let first = passes.wait(passes.submit(&PlanKey::Predict, Images::One(decoded.input.clone()), vec![Target::Rank(0)], "segment")?).await?;
        (timings.queue, timings.inference) = (ms(first.queue), ms(first.inference));
        let row = first.output.logits.row(0);
        let labels = match row.as_slice() {
            Some(v) => seg.label_map(v),
            None => seg.label_map(&row.to_vec()),
        };
        let present = seg.present(&labels);
        let (size, region) = (decoded.size, decoded.region);
        let result = tokio::task::spawn_blocking({
            let (seg, labels, present) = (seg.clone(), labels.clone(), present.clone());
            move || segmentation_result(&seg, labels, &present, size, region)
        })
        .await
        .map_err(|e| ServiceError::Internal(format!("label map task failed: {e}")))?;
        if endpoint == Endpoint::Predict {
            return Ok(((TaskResult::Segmentation(result), size), None));
        }
        let [_, ih, iw] = info.input_shape;
        // Upload pixels to the model's input pixels: the region of the upload the model saw fills its input.
        let to_input = |b: [f64; 4]| {
            let (sx, sy) = (iw as f64 / region.width, ih as f64 / region.height);
            [(b[0] - region.x) * sx, (b[1] - region.y) * sy, b[2] * sx, b[3] * sy]
        };
        let name = |c: usize| seg.label(c).map_or_else(|| format!("class {c}"), |l| format!("class {c} ({l})"));
        let larger: Vec<usize> = present.iter().map(|p| p.0).filter(|&c| Some(c) != seg.background).collect();
        let (mut seeds, mut targets) = (Vec::new(), Vec::new());
        for pick in &options.segments {
            let class = match pick.class {
                SegmentClassPick::Class(c) => c,
                SegmentClassPick::Largest(i) => match larger.get(i) {
                    Some(&c) => c,
                    None if i == 0 => {
                        return Err(ServiceError::Unprocessable(format!(
                            "the predicted label map has no class besides the background ({}): give a target",
                            name(seg.background.unwrap_or(0))
                        )));
                    }
                    None => continue,
                },
            };
            let predicted: Vec<bool> = labels.iter().map(|&l| l as usize == class).collect();
            let (mask, in_prediction) = match pick.region {
                None if !predicted.contains(&true) => {
                    let list: Vec<String> = present.iter().map(|p| name(p.0)).collect();
                    return Err(ServiceError::Unprocessable(format!(
                        "{} is absent from the predicted label map (present: {}); give a region to explain it there",
                        name(class),
                        list.join(", ")
                    )));
                }
                None => (predicted, true),
                Some(b) => {
                    let (w, h) = (size.width as f64, size.height as f64);
                    if b[0] >= w || b[1] >= h || b[0] + b[2] <= 0.0 || b[1] + b[3] <= 0.0 {
                        return Err(ServiceError::Unprocessable(format!(
                            "region {{x: {}, y: {}, width: {}, height: {}}} lies outside the {}x{} image",
                            b[0], b[1], b[2], b[3], size.width, size.height
                        )));
                    }
                    let inside = seg.region_pixels(to_input(b), [ih, iw]);
                    if !inside.contains(&true) {
                        return Err(ServiceError::Unprocessable(format!(
                            "region {{x: {}, y: {}, width: {}, height: {}}} holds no pixel centre of the model's {}x{} output grid",
                            b[0], b[1], b[2], b[3], seg.grid[1], seg.grid[0]
                        )));
                    }
                    let both: Vec<bool> = inside.iter().zip(&predicted).map(|(a, b)| *a && *b).collect();
                    if both.contains(&true) { (both, true) } else { (inside, false) }
                }
            };
            let pixels = mask.iter().filter(|m| **m).count();
            seeds.push(seg.seed(class, &mask));
            targets.push(ExplainedTarget::Segment { index: class, label: seg.label(class).map(str::to_string), pixels, region: pick.region, predicted: in_prediction });
        }
        if seeds.is_empty() {
            return Ok(((TaskResult::Segmentation(result), size), Some(Vec::new())));
        }
        let needs_image = options.methods.iter().any(|m| m.is_multipass());
        let kept_input = needs_image.then(|| decoded.input.clone());
        let row_seeds = seeds_of(&seeds);
        let out = passes.wait(passes.submit(&explain_plan(info, &options), Images::One(decoded.input), seeds, "explain")?).await?;
        timings.queue += ms(out.queue);
        timings.inference += ms(out.inference);
        let work = Explaining { info, options, output: out.output, probabilities: vec![], targets, passes, input: kept_input, proposals: None, seeds: row_seeds, scores: Default::default() };
        let explanations = work.run(decoded.orig, decoded.model_rgb, region, timings).await?;
        Ok(((TaskResult::Segmentation(result), size), Some(explanations)))
    }
}

/// The most reference images one request may compare with.
pub const MAX_REFERENCES: usize = 8;

/// An embedder's reference image, and how the request named it (`part \`reference\` 1`, `reference_image[0]`, ...).
#[derive(Clone)]
pub struct Reference {
    pub name: String,
    pub image: ImageInput,
}

impl Request<'_> {
    /// An embedder: one forward pass embeds the image and its reference images (rows of one batch); the similarity
    /// is the cosine to the reference (the one reference image's embedding, the mean direction of several, or the
    /// client's vector). An explain request then runs one explain pass over the same rows, each seeded with its
    /// similarity's gradient: the image against the reference, each reference image against the image.
    async fn embed(self, emb: &Embedder, decoded: Decoded, references: Vec<Decoded>, timings: &mut Timings) -> Result<Answered, ServiceError> {
        let Request { info, endpoint, options, passes, budget } = self;
        if endpoint == Endpoint::Explain && references.is_empty() && options.reference_vector.is_none() {
            return Err(ServiceError::Unprocessable(format!(
                "model `{}` is an embedder: an explanation shows what makes the image similar to a reference; give one: a `reference` image part (multipart), `reference_image` (JSON, base64) or `reference_vector` ({} numbers)",
                info.name, emb.dim
            )));
        }
        let rows = 1 + references.len();
        if endpoint == Endpoint::Explain {
            let cost = methods::request_cost(info, &methods::Work { targets: rows, ..options.work() });
            if cost > budget {
                return Err(ServiceError::Unprocessable(format!(
                    "this request explains {rows} images (the image and its references), which costs {cost} forward passes, over the limit of {budget} (server.max_forward_passes)"
                )));
            }
        }
        let mut images = Vec::with_capacity(rows);
        images.push(decoded.input.clone());
        images.extend(references.iter().map(|r| r.input.clone()));
        let first = passes.wait(passes.submit(&PlanKey::Predict, Images::PerRow(images.clone()), vec![Target::Rank(0); rows], "embed")?).await?;
        (timings.queue, timings.inference) = (ms(first.queue), ms(first.inference));
        let vectors: Vec<Vec<f32>> = first.output.logits.outer_iter().map(|r| r.to_vec()).collect();
        let query = &vectors[0];
        let zero = |what: &str| ServiceError::Unprocessable(format!("the similarity is undefined: {what} is zero"));
        let concept: Option<Vec<f32>> = match (&options.reference_vector, &vectors[1..]) {
            (Some(v), _) => Some(v.clone()),
            (None, []) => None,
            (None, [one]) => Some(one.clone()),
            (None, several) => Some(Embedder::mean_direction(&several.iter().map(Vec::as_slice).collect::<Vec<_>>()).ok_or_else(|| zero("a reference image's embedding"))?),
        };
        // Each row's similarity and its gradient: the image against the reference, each reference image against
        // the image.
        let mut compared = Vec::with_capacity(rows);
        if let Some(c) = &concept {
            let what = if options.reference_vector.is_some() { "the reference vector or the image's embedding" } else { "an embedding" };
            compared.push(Embedder::similarity(query, c).ok_or_else(|| zero(what))?);
            for r in &vectors[1..] {
                compared.push(Embedder::similarity(r, query).ok_or_else(|| zero("an embedding"))?);
            }
        }
        let result = Embedding {
            vector: query.clone(),
            send_vector: endpoint == Endpoint::Predict || options.outputs.embedding,
            similarity: compared.first().map(|c| c.0),
            references: references.iter().zip(compared.iter().skip(1)).map(|(r, c)| ReferenceImage { size: r.size, similarity: c.0 }).collect(),
        };
        if endpoint == Endpoint::Predict {
            return Ok(((TaskResult::Embedding(result), decoded.size), None));
        }
        let seeds: Vec<Target> = compared.iter().map(|(_, g)| Target::Seed(Arc::from(g.as_slice()))).collect();
        let row_seeds = seeds_of(&seeds);
        let out = passes.wait(passes.submit(&explain_plan(info, &options), Images::PerRow(images), seeds, "explain")?).await?;
        timings.queue += ms(out.queue);
        timings.inference += ms(out.inference);
        // Each image's explanations on its own picture.
        let size = decoded.size;
        let mut explanations = Vec::new();
        let (mut explain, mut render) = (0.0, 0.0);
        for (i, image) in std::iter::once(decoded).chain(references).enumerate() {
            let target = ExplainedTarget::Similarity { reference: i.checked_sub(1), similarity: compared[i].0 };
            let work = Explaining {
                info,
                options: options.clone(),
                output: out.output.row(i),
                probabilities: vec![],
                targets: vec![target],
                passes,
                input: None,
                proposals: None,
                seeds: vec![row_seeds[i].clone()],
                scores: Default::default(),
            };
            explanations.extend(work.run(image.orig, image.model_rgb, image.region, timings).await?);
            (explain, render) = (explain + timings.explain, render + timings.render);
        }
        (timings.explain, timings.render) = (explain, render);
        Ok(((TaskResult::Embedding(result), size), Some(explanations)))
    }
}

/// A segmenter's answer: the classes present, the label map on its grid, and at the upload's size as a PNG (each
/// upload pixel takes the output pixel its centre falls in, through the region of the upload the model saw).
fn segmentation_result(seg: &Segmenter, labels: Vec<u16>, present: &[(usize, f64)], size: ImageSize, region: preprocess::Region) -> Segmentation {
    let [gh, gw] = seg.grid;
    let cell = |v: f64, lo: f64, len: f64, n: usize| (((v - lo) / len * n as f64).floor().max(0.0) as usize).min(n - 1);
    let cols: Vec<usize> = (0..size.width).map(|x| cell(x as f64 + 0.5, region.x, region.width, gw)).collect();
    let mut upload = Vec::with_capacity(size.width as usize * size.height as usize);
    for y in 0..size.height {
        let r = cell(y as f64 + 0.5, region.y, region.height, gh) * gw;
        upload.extend(cols.iter().map(|&c| labels[r + c]));
    }
    let mask_png = crate::render::png_labels(&upload, size.width, size.height, seg.classes);
    let classes = present.iter().map(|&(index, fraction)| SegmentClass { index, label: seg.label(index).map(str::to_string), fraction }).collect();
    Segmentation { classes, grid: seg.grid, label_map: labels, mask_png }
}

/// The detections a request's picks name, as indices into `detections` (best first): 422 for an index beyond
/// them or a label with none; `top_k` beyond the detections explains those there are.
fn pick(picks: &[DetectionPick], detections: &[Detection]) -> Result<Vec<usize>, ServiceError> {
    let n = detections.len();
    picks
        .iter()
        .filter(|p| !matches!(p, DetectionPick::Rank(i) if *i >= n))
        .map(|p| match p {
            DetectionPick::Index(i) | DetectionPick::Rank(i) if *i < n => Ok(*i),
            DetectionPick::Index(i) | DetectionPick::Rank(i) => Err(ServiceError::Unprocessable(format!("detection {i} does not exist: the image has {n} detections (0..{})", n.saturating_sub(1)))),
            DetectionPick::Label(l) => detections
                .iter()
                .position(|d| d.label.as_deref() == Some(l.as_str()) || d.class_index.to_string() == *l)
                .ok_or_else(|| ServiceError::Unprocessable(format!("no detection of `{l}`: the image has {n} detections"))),
            DetectionPick::Overlap([x, y, bw, bh]) => {
                let b = [*x as f32, *y as f32, (*x + *bw) as f32, (*y + *bh) as f32];
                let (best, overlap) = detections.iter().map(|d| crate::detection::iou(d.xyxy, b)).enumerate().fold((0, 0.0f32), |a, (i, v)| if v > a.1 { (i, v) } else { a });
                if overlap > 0.0 { Ok(best) } else { Err(ServiceError::Unprocessable(format!("no detection overlaps the box: the image has {n} detections"))) }
            }
        })
        .collect()
}

/// The explain plan a request needs: its layer, the input-gradient chains its methods read, attention if any
/// method reads it.
fn explain_plan(info: &ModelInfo, options: &RequestOptions) -> PlanKey {
    let rules = options.methods.iter().filter_map(|m| m.input_rule);
    let mut plan = ExplainPlan::new(options.layer.clone(), rules);
    if options.methods.iter().any(|m| m.kind == Kind::Attention) {
        plan = plan.with_attention();
    }
    PlanKey::explain(info, plan)
}

/// The image as the model sees it and as the answer draws on it.
struct Decoded {
    size: ImageSize,
    orig: RgbImage,
    /// The upload at the model's input size (what overlays at `size=model` are drawn on).
    model_rgb: RgbImage,
    input: Array3<f32>,
    /// The part of the upload the model saw.
    region: preprocess::Region,
}

/// Decodes and preprocesses off the async runtime.
async fn decode(info: Arc<ModelInfo>, image: ImageInput, limits: DecodeLimits) -> Result<Decoded, ServiceError> {
    tokio::task::spawn_blocking(move || -> Result<Decoded, ServiceError> {
        let [c, h, w] = info.input_shape;
        let (orig, model_rgb, input, region) = match image {
            ImageInput::Encoded(bytes) => {
                let orig = preprocess::decode(&bytes, limits)?;
                let (resized, region) = preprocess::to_model_size(&orig, w as u32, h as u32, info.pixels);
                let input = preprocess::normalize(&resized, info.mean, info.std, info.pixels);
                (orig, resized, input, region)
            }
            ImageInput::Tensor(input) => {
                let want = [c, h, w];
                if input.shape() != want {
                    return Err(ServiceError::BadRequest(format!(
                        "the input tensor of one image has shape {:?}; model `{}` takes {want:?}",
                        input.shape(),
                        info.name
                    )));
                }
                if input.iter().any(|v| !v.is_finite()) {
                    return Err(ServiceError::BadRequest("the input tensor holds a NaN or an infinity".into()));
                }
                let rgb = preprocess::denormalize(input.view(), info.mean, info.std, info.pixels);
                let whole = preprocess::Region { x: 0.0, y: 0.0, width: w as f64, height: h as f64 };
                (rgb.clone(), rgb, input, whole)
            }
        };
        Ok(Decoded { size: ImageSize { width: orig.width(), height: orig.height() }, orig, model_rgb, input, region })
    })
    .await
    .map_err(|e| ServiceError::Internal(format!("preprocessing task failed: {e}")))?
}

/// An explain request after its pass: the maps, the metrics, the pictures.
struct Explaining<'a> {
    info: &'a Arc<ModelInfo>,
    options: RequestOptions,
    output: BatchOutput,
    /// Each row's softmax (a classifier's; what the metrics read).
    probabilities: Vec<Vec<f32>>,
    /// What each row explains.
    targets: Vec<ExplainedTarget>,
    passes: &'a Passes<'a>,
    /// The preprocessed image, kept when a multi-pass method or a metric needs it.
    input: Option<Array3<f32>>,
    /// A detector's detections, when D-RISE runs.
    proposals: Option<DetectorProposals<'a>>,
    /// Each row's seed, where it has one (a detection's or a segment's): the multi-pass gradient methods reuse it.
    seeds: Vec<Option<Arc<[f32]>>>,
    /// How the model's output gives class probabilities (RISE weighs its masks with them).
    scores: methods::Probabilities,
}

/// The seeds among a pass's targets, row by row.
fn seeds_of(targets: &[Target]) -> Vec<Option<Arc<[f32]>>> {
    targets.iter().map(|t| if let Target::Seed(s) = t { Some(s.clone()) } else { None }).collect()
}

impl Explaining<'_> {
    async fn run(self, orig: RgbImage, model_rgb: RgbImage, region: preprocess::Region, timings: &mut Timings) -> Result<Vec<Explanation>, ServiceError> {
        let Explaining { info, options, output, probabilities, targets, passes, input, proposals, seeds, scores } = self;
        // Every (row, method) map, through the one computation path.
        let t0 = Instant::now();
        let request = methods::Request {
            info,
            layer: &options.layer,
            params: &options.params,
            out: &output,
            passes: input.as_ref().map(|i| (passes, i)),
            proposals: proposals.as_ref().map(|p| p as &dyn methods::drise::Proposals),
            seeds: &seeds,
            probabilities: scores,
        };
        let mut computed = Vec::with_capacity(output.len() * options.methods.len());
        for row in 0..output.len() {
            let class = methods::row_class(&output, row)?;
            for &method in &options.methods {
                computed.push(ComputedMap { row, class, method, computed: methods::compute(method, &request, row).await? });
            }
        }
        let t_compute = t0.elapsed();
        let options = Arc::new(options);
        let (mut prepared, t_prepare, orig, model_rgb) = tokio::task::spawn_blocking({
            let options = options.clone();
            move || {
                let (p, t) = prepare_all(&options, computed, &orig, &model_rgb, region);
                (p, t, orig, model_rgb)
            }
        })
        .await
        .map_err(|e| ServiceError::Internal(format!("explanation task failed: {e}")))?;
        // The metrics, on each map at the model's input size, through the batcher.
        let t1 = Instant::now();
        if let Some(input) = &input {
            for p in prepared.iter_mut() {
                for &metric in &options.metrics {
                    let score = methods::metrics::evaluate(passes, metric, input, &p.model_map, p.class, probabilities[p.row][p.class] as f64).await?;
                    p.scores.push(score);
                }
            }
        }
        let t_metrics = t1.elapsed();
        let (explanations, t_render) = tokio::task::spawn_blocking({
            let options = options.clone();
            move || render_all(prepared, &options, &targets, &orig, &model_rgb)
        })
        .await
        .map_err(|e| ServiceError::Internal(format!("render task failed: {e}")))?;
        timings.explain = ms(t_compute + t_prepare);
        timings.metrics = ms(t_metrics);
        timings.render = ms(t_render);
        Ok(explanations)
    }
}
