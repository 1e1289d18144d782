//! The handle through which a method submits extra batches to the model's batcher and awaits them.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ndarray::{concatenate, Array2, Array3, Array4, Axis};
use tokio::sync::oneshot;

use crate::backend::batcher::{Images, Job, JobOutput, Queue, SubmitError, Target};
use crate::backend::engine::{BatchOutput, ModelInfo, PlanKey};
use crate::error::ServiceError;
use crate::onnx::rewrite::ExplainPlan;
use crate::onnx::rules::ReluRule;

/// What a method may ask of the model: batches through its batcher, within the request's deadline. Every row
/// submitted is counted in `camserve_forward_passes_total{model, method}`.
pub struct Passes<'a> {
    pub queue: &'a Queue,
    pub info: &'a ModelInfo,
    /// Rows per submitted job: the batcher's `max_batch`, so one method's rows share batches with other requests.
    pub max_batch: usize,
    pub deadline: Instant,
    pub timeout: Duration,
    /// Forward-equivalents run so far, where someone watches (an asynchronous job's progress).
    pub progress: Option<&'a AtomicU64>,
    /// Whether the batches are a background job's (they yield to synchronous requests' batches).
    pub background: bool,
}

/// A submitted job's answer.
pub type Reply = oneshot::Receiver<Result<JobOutput, crate::backend::engine::EngineError>>;

impl<'a> Passes<'a> {
    /// A request's handle: its batches in the foreground, no progress watched.
    pub fn new(queue: &'a Queue, info: &'a ModelInfo, max_batch: usize, deadline: Instant, timeout: Duration) -> Passes<'a> {
        Passes { queue, info, max_batch, deadline, timeout, progress: None, background: false }
    }

    /// Submits one job, or refuses at once when the queue is full; counts its rows under `label`.
    pub fn submit(&self, plan: &PlanKey, images: Images, targets: Vec<Target>, label: &str) -> Result<Reply, ServiceError> {
        let rows = targets.len().max(1) as u64;
        let (tx, rx) = oneshot::channel();
        self.queue.submit(Job { plan: plan.clone(), images, targets, deadline: self.deadline, reply: tx, background: self.background }).map_err(|e| match e {
            SubmitError::QueueFull => ServiceError::QueueFull(self.info.name.clone()),
            SubmitError::Closed => ServiceError::Internal("the model's worker has stopped".into()),
        })?;
        ::metrics::counter!("camserve_forward_passes_total", "model" => self.info.name.clone(), "method" => label.to_string()).increment(rows);
        Ok(rx)
    }

    /// Awaits a submitted job within the request's deadline.
    pub async fn wait(&self, rx: Reply) -> Result<JobOutput, ServiceError> {
        match tokio::time::timeout_at(self.deadline.into(), rx).await {
            Err(_) | Ok(Err(_)) => Err(ServiceError::Timeout(self.timeout)),
            Ok(Ok(r)) => {
                let r = r.map_err(|e| ServiceError::Internal(e.to_string()))?;
                if let Some(p) = self.progress {
                    p.fetch_add(r.forward_equivalents, Ordering::Relaxed);
                }
                Ok(r)
            }
        }
    }

    /// Runs `n` rows through `plan`, `row(i)` making row i's array and target when its chunk is submitted (so a
    /// 2048-row Score-CAM never holds more than two chunks of masked images). Chunks of `max_batch` rows, two in
    /// flight, so the worker never waits for the next chunk to be built. Returns the chunks' outputs in order.
    pub async fn run<F>(&self, plan: &PlanKey, n: usize, label: &str, row: F) -> Result<Vec<BatchOutput>, ServiceError>
    where
        F: FnMut(usize) -> (Array3<f32>, Target),
    {
        let mut outs = Vec::with_capacity(n.div_ceil(self.max_batch.max(1)));
        self.run_each(plan, n, label, row, |_, out| {
            outs.push(out);
            Ok(())
        })
        .await?;
        Ok(outs)
    }

    /// [`Passes::run`], handing each chunk's output to `each(first row, output)` as it arrives instead of keeping
    /// them (D-RISE's thousand masked detector outputs would not fit).
    pub async fn run_each<F, G>(&self, plan: &PlanKey, n: usize, label: &str, mut row: F, mut each: G) -> Result<(), ServiceError>
    where
        F: FnMut(usize) -> (Array3<f32>, Target),
        G: FnMut(usize, BatchOutput) -> Result<(), ServiceError>,
    {
        let chunk = self.max_batch.max(1);
        let mut inflight: VecDeque<(usize, Reply)> = VecDeque::new();
        let mut start = 0;
        while start < n || !inflight.is_empty() {
            if start < n && inflight.len() < 2 {
                let end = (start + chunk).min(n);
                let (images, targets): (Vec<_>, Vec<_>) = (start..end).map(&mut row).unzip();
                inflight.push_back((start, self.submit(plan, Images::PerRow(images), targets, label)?));
                start = end;
                continue;
            }
            let (first, rx) = inflight.pop_front().expect("checked non-empty above. This is a bug.");
            each(first, self.wait(rx).await?.output)?;
        }
        Ok(())
    }

    /// The logits of `n` images (`row(i)`), `[n, K]`.
    pub async fn logits<F>(&self, n: usize, label: &str, mut row: F) -> Result<Array2<f32>, ServiceError>
    where
        F: FnMut(usize) -> Array3<f32>,
    {
        let outs = self.run(&PlanKey::Predict, n, label, |i| (row(i), Target::Rank(0))).await?;
        stack_logits(&outs)
    }

    /// The logits of the part of the model after `layer`, on `n` activations `[C, h, w]` (`row(i)`).
    pub async fn head_logits<F>(&self, layer: &str, n: usize, label: &str, row: F) -> Result<Array2<f32>, ServiceError>
    where
        F: FnMut(usize) -> Array3<f32>,
    {
        self.outputs(&PlanKey::Head(layer.to_string()), n, label, row).await
    }

    /// The first outputs `[n, K]` of `n` rows (`row(i)`) through `plan`, whose rows need no target (a head, a tap).
    pub async fn outputs<F>(&self, plan: &PlanKey, n: usize, label: &str, mut row: F) -> Result<Array2<f32>, ServiceError>
    where
        F: FnMut(usize) -> Array3<f32>,
    {
        let outs = self.run(plan, n, label, |i| (row(i), Target::Rank(0))).await?;
        stack_logits(&outs)
    }

    /// The plain input gradients `[n, C, H, W]` of `target` (a class's logit, or the score a seed stands for) at `n`
    /// images (`row(i)`).
    pub async fn plain_gradients<F>(&self, layer: &str, target: Target, n: usize, label: &str, mut row: F) -> Result<Array4<f32>, ServiceError>
    where
        F: FnMut(usize) -> Array3<f32>,
    {
        let plan = PlanKey::explain(self.info, ExplainPlan::new(layer.to_string(), [ReluRule::Plain]));
        let outs = self.run(&plan, n, label, |i| (row(i), target.clone())).await?;
        let grads: Vec<_> = outs
            .iter()
            .map(|o| o.input_grads.iter().find(|(r, _)| *r == ReluRule::Plain).map(|(_, g)| g.view()))
            .collect::<Option<_>>()
            .ok_or_else(|| ServiceError::Internal("the plain input gradient is missing. This is a bug.".into()))?;
        concatenate(Axis(0), &grads).map_err(|e| ServiceError::Internal(format!("stacking gradients: {e}")))
    }

    /// The layer's gradients `[C, h, w]` of the score whose gradient with respect to the logits is `seed`.
    pub async fn seeded_gradients(&self, layer: &str, image: &Array3<f32>, seed: Vec<f32>, label: &str) -> Result<Array3<f32>, ServiceError> {
        let plan = PlanKey::explain(self.info, ExplainPlan::new(layer.to_string(), []));
        let seed: std::sync::Arc<[f32]> = seed.into();
        let outs = self.run(&plan, 1, label, |_| (image.clone(), Target::Seed(seed.clone()))).await?;
        let g = outs.first().and_then(|o| o.gradients.as_ref()).ok_or_else(|| ServiceError::Internal("gradients missing. This is a bug.".into()))?;
        Ok(g.index_axis(Axis(0), 0).to_owned())
    }
}

fn stack_logits(outs: &[BatchOutput]) -> Result<Array2<f32>, ServiceError> {
    let views: Vec<_> = outs.iter().map(|o| o.logits.view()).collect();
    concatenate(Axis(0), &views).map_err(|e| ServiceError::Internal(format!("stacking logits: {e}")))
}
