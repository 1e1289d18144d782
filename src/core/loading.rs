//! The model registry: every configured model loaded, analysed, warmed and given its batcher, and the request
//! limits the configuration sets. `crate::server` installs the result into the `Service` once it is ready.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::backend::batcher::{self, BatcherConfig};
use crate::backend::engine::{EngineOptions, ModelRunner, ModelSpec, PlanKey};
use crate::config::{self, Config};
use crate::core::options::OptionLimits;
use crate::core::pipeline::{ModelHandle, ServiceLimits};
use crate::core::task::{Task, TaskConfig};
use crate::preprocess::ResizePolicy;
use crate::onnx::rewrite::ExplainPlan;
use crate::onnx::rules::ReluRule;
use crate::preprocess::DecodeLimits;

/// Loads, warms and queues every configured model (blocking; call from a blocking thread).
pub fn load_models(config: &Config) -> anyhow::Result<BTreeMap<String, ModelHandle>> {
    let options = EngineOptions {
        device: config.runtime.device,
        intra_threads: config.runtime.threads,
        ort_library: config.runtime.ort_library.clone(),
        cuda_device: config.runtime.cuda_device,
        cpu_arena: config.runtime.cpu_arena,
    };
    let batching = BatcherConfig {
        max_batch: config.batching.max_batch,
        max_wait: Duration::from_millis(config.batching.max_wait_ms),
        queue_capacity: config.batching.queue_capacity,
    };
    let mut models = BTreeMap::new();
    for m in &config.models {
        let started = Instant::now();
        let labels = match &m.labels {
            Some(p) => {
                let p = config::resolve(p);
                Some(config::read_labels(&p).map_err(|e| anyhow::anyhow!("model `{}`: labels {}: {e}", m.name, p.display()))?)
            }
            None => None,
        };
        let task_config = TaskConfig {
            task: m.task,
            format: m.detection_format,
            labels: labels.clone(),
            score_threshold: m.score_threshold,
            iou_threshold: m.iou_threshold,
            max_detections: m.max_detections,
        };
        let pixels = |resize: ResizePolicy| crate::preprocess::PixelFormat {
            channel_order: m.channel_order,
            scale: m.scale,
            resize,
            resize_shorter_side: m.resize_shorter_side,
        };
        let spec = ModelSpec {
            name: m.name.clone(),
            path: config::resolve(&m.path),
            labels,
            mean: m.mean.unwrap_or(config::IMAGENET_MEAN),
            std: m.std.unwrap_or(config::IMAGENET_STD),
            default_layer: m.default_layer.clone(),
            input_size: m.input_size.map(|[h, w]| (h, w)),
            layout: m.layout,
            pixels: pixels(m.resize.unwrap_or_default()),
        };
        let mut runner = ModelRunner::load(&spec, &options).map_err(|e| anyhow::anyhow!("model `{}` ({}): {e}", m.name, spec.path.display()))?;
        let task = Task::recognise(runner.describe(), &task_config).map_err(|e| {
            anyhow::anyhow!("model `{}` ({}): {e} (config keys: task, detection_format, labels, score_threshold, iou_threshold, max_detections)", m.name, spec.path.display())
        })?;
        // A detector takes its exporter's preprocessing (Ultralytics: pixels / 255, letterboxed; DETR: resized,
        // ImageNet's mean and std), unless the configuration says otherwise.
        if let Task::Detection(d) = &task {
            let (mean, std, resize) = d.format.default_preprocessing();
            runner.set_preprocessing(m.mean.unwrap_or(mean), m.std.unwrap_or(std), pixels(m.resize.unwrap_or(resize)));
            if m.default_layer.is_none()
                && let Some(layer) = crate::core::task::detector_default_layer(d.format, runner.describe())
            {
                runner.set_default_layer(layer);
            }
        }
        let info = runner.info();
        // Warm the graphs the default request uses: predict, and Grad-CAM + guided Grad-CAM; for a classifier also
        // the part after the default layer (Ablation-CAM's and ReciproCAM's head, or a transformer's token head for
        // ViT ReciproCAM), so that those methods have a measured time estimate from the start and a request
        // estimated too long for its deadline goes as a job instead of meeting the timeout.
        let mut keys = vec![PlanKey::Predict];
        if info.rules.contains(&ReluRule::Guided) {
            let plan = ExplainPlan::new(info.default_layer.clone(), [ReluRule::Guided]);
            keys.push(PlanKey::explain(&info, plan));
        }
        let mut warm = runner.warm_up(&keys).map_err(|e| anyhow::anyhow!("model `{}`: warm-up failed: {e}", m.name))?;
        // The head is an extra: a model serves without it (its methods then have no estimate until they run), so a
        // head that cannot be built here is logged, not fatal.
        let head = match &task {
            Task::Classification | Task::MultiLabel(_) if info.why_no_head(&info.default_layer).is_none() => Some(PlanKey::Head(info.default_layer.clone())),
            Task::Classification | Task::MultiLabel(_) if info.why_no_token_head(&info.default_layer).is_none() => {
                Some(PlanKey::TokenHead(info.default_layer.clone()))
            }
            _ => None,
        };
        if let Some(key) = head {
            match runner.warm_up(std::slice::from_ref(&key)) {
                Ok(t) => warm.extend(t),
                Err(e) => tracing::warn!(model = %m.name, plan = ?key, error = %e, "the head after the default layer could not be warmed"),
            }
        }
        tracing::info!(model = %m.name, task = task.as_str(), device = %info.device, classes = info.num_classes, layer = %info.default_layer,
            seconds = started.elapsed().as_secs_f64(), "model loaded and warmed");
        let queue = batcher::spawn(runner, batching);
        for (key, took) in &warm {
            queue.times().record(key, 1, took.as_secs_f64());
        }
        let position = models.len();
        models.insert(m.name.clone(), ModelHandle::new(info, queue, position, batching.max_batch).with_task(task));
    }
    Ok(models)
}

pub fn service_limits(config: &Config) -> ServiceLimits {
    ServiceLimits {
        decode: DecodeLimits { max_pixels: config.server.max_image_pixels, max_dimension: config.server.max_image_dimension },
        options: OptionLimits {
            max_top_k: config.server.max_top_k,
            max_targets: config.server.max_targets,
            max_methods: config.server.max_methods,
            scorecam_max_channels: config.server.scorecam_max_channels,
        },
        request_timeout: Duration::from_millis(config.server.request_timeout_ms),
        max_forward_passes: config.server.max_forward_passes,
    }
}
