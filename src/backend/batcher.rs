//! Dynamic batching (docs/DESIGN.md §2): one queue and one worker thread per model.
//!
//! Requests (jobs) arrive with an image and one or more rows (one per target). A collector task groups waiting
//! jobs by plan and hands the worker thread a batch as soon as it is free: up to `max_batch` rows, after the
//! oldest job has waited `max_wait` for company. While the worker runs a batch, new jobs pile up and form the
//! next one, so batches grow with load. Jobs whose client has gone, or whose deadline has passed, are dropped
//! before they cost compute. A full queue refuses new jobs at once (the HTTP layer answers 429).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ndarray::{Array1, Array2, Array3, Array4, Axis};
use tokio::sync::{mpsc, oneshot};

use crate::backend::engine::{Batch, BatchOutput, EngineError, ModelInfo, ModelRunner, PlanKey};

#[derive(Debug, Clone, Copy)]
pub struct BatcherConfig {
    pub max_batch: usize,
    pub max_wait: Duration,
    /// Rows waiting (not yet running) beyond which `submit` refuses.
    pub queue_capacity: usize,
}

/// What one row explains.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// The n-th highest logit (0 = the prediction).
    Rank(usize),
    Class(usize),
    /// A seed over the logits (the gradient of the explained score with respect to them; Finer-CAM's). The row
    /// reports the seed's largest entry as its class.
    Seed(Arc<[f32]>),
}

/// A job's images.
pub enum Images {
    /// One preprocessed image `[C, H, W]`, run once per target.
    One(Array3<f32>),
    /// One array per target: images (masked, interpolated, noisy copies) or, for a [`PlanKey::Head`], a layer's
    /// activations `[C, h, w]`. All of one shape.
    PerRow(Vec<Array3<f32>>),
}

pub struct Job {
    pub plan: PlanKey,
    pub images: Images,
    pub targets: Vec<Target>,
    pub deadline: Instant,
    pub reply: oneshot::Sender<Result<JobOutput, EngineError>>,
    /// A background job's batch (an asynchronous job's, `core::jobs`): it runs only when no synchronous request's
    /// batch is waiting, so interactive requests are not starved by long work.
    pub background: bool,
}

/// A job's share of a batch run.
#[derive(Debug)]
pub struct JobOutput {
    pub output: BatchOutput,
    pub queue: Duration,
    pub inference: Duration,
    /// Rows in the batch this job ran in.
    pub batch_rows: usize,
    /// What this job's rows counted in forward-equivalents (`PassKind::of`): a request's progress.
    pub forward_equivalents: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the queue is full")]
    QueueFull,
    #[error("the model's worker has stopped")]
    Closed,
}

struct Queued {
    job: Job,
    enqueued: Instant,
}

/// The kinds of pass a model runs, as the time estimates tell them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassKind {
    /// A forward of the whole model (the predict plan: masked inputs, metrics).
    Forward,
    /// The part of the model after a layer ([`PlanKey::Head`]: Ablation-CAM, ReciproCAM).
    Head,
    /// A forward and backward (an explain plan).
    Explain,
}

impl PassKind {
    /// A plan's kind and what one of its rows counts in forward-equivalents (`methods::explain_pass_cost`: a
    /// forward, plus two per gradient chain; a head pass counts as one, a bound).
    pub fn of(plan: &PlanKey) -> (PassKind, u64) {
        match plan {
            PlanKey::Predict => (PassKind::Forward, 1),
            PlanKey::Head(_) | PlanKey::TokenHead(_) => (PassKind::Head, 1),
            // A part of the forward; counted as a whole one (a bound).
            PlanKey::Tap(_) => (PassKind::Forward, 1),
            PlanKey::Explain(p) => (PassKind::Explain, 1 + 2 * p.rules.len().max(1) as u64),
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// What one forward-equivalent of each kind of pass costs this model on this machine, in seconds: an exponentially
/// weighted mean (weight 0.2 for the newest batch) over the batches the worker ran, seeded at warm-up. A request's
/// time estimate is its cost in forward-equivalents of each kind times these.
#[derive(Debug, Default)]
pub struct PassTimes {
    /// Seconds as f64 bits; 0: nothing measured yet.
    seconds: [AtomicU64; 3],
}

impl PassTimes {
    /// Weight of the newest measurement.
    const ALPHA: f64 = 0.2;

    /// Records a batch: `seconds` for `rows` rows of `plan`.
    pub fn record(&self, plan: &PlanKey, rows: usize, seconds: f64) {
        let (kind, fe) = PassKind::of(plan);
        let per_fe = seconds / (rows.max(1) as u64 * fe) as f64;
        if !per_fe.is_finite() || per_fe <= 0.0 {
            return;
        }
        let cell = &self.seconds[kind.index()];
        let _ = cell.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |bits| {
            let old = f64::from_bits(bits);
            Some(if old > 0.0 { (1.0 - Self::ALPHA) * old + Self::ALPHA * per_fe } else { per_fe }.to_bits())
        });
    }

    /// Seconds per forward-equivalent of `kind`, where measured: a forward not yet measured is taken as an explain
    /// pass's forward-equivalent, and the reverse. A head pass is only ever its own measurement: the part after a late
    /// layer costs a small fraction of a forward (global pooling and a linear layer on ResNet-50's last layer), so
    /// pricing it as a whole forward would refuse Ablation-CAM requests that take a second (docs/BENCHMARKS.md (k):
    /// 11.9 s estimated, 0.14 s taken); until one runs, such a method has no estimate.
    pub fn per_forward(&self, kind: PassKind) -> Option<f64> {
        let get = |k: PassKind| Some(f64::from_bits(self.seconds[k.index()].load(Ordering::SeqCst))).filter(|&s| s > 0.0);
        match kind {
            PassKind::Head => get(PassKind::Head),
            PassKind::Forward => get(PassKind::Forward).or_else(|| get(PassKind::Explain)),
            PassKind::Explain => get(PassKind::Explain).or_else(|| get(PassKind::Forward)),
        }
    }
}

/// The submitting side of a model's queue.
#[derive(Clone)]
pub struct Queue {
    tx: mpsc::UnboundedSender<Queued>,
    waiting_rows: Arc<AtomicUsize>,
    capacity: usize,
    times: Arc<PassTimes>,
}

impl Queue {
    /// Queues a job, or refuses at once when the queue is full.
    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        let rows = job.targets.len().max(1);
        let before = self.waiting_rows.fetch_add(rows, Ordering::SeqCst);
        if before + rows > self.capacity {
            self.waiting_rows.fetch_sub(rows, Ordering::SeqCst);
            metrics::counter!("camserve_queue_rejections_total").increment(1);
            return Err(SubmitError::QueueFull);
        }
        self.tx.send(Queued { job, enqueued: Instant::now() }).map_err(|_| {
            self.waiting_rows.fetch_sub(rows, Ordering::SeqCst);
            SubmitError::Closed
        })
    }

    /// Rows waiting to run.
    pub fn depth(&self) -> usize {
        self.waiting_rows.load(Ordering::SeqCst)
    }

    /// What each kind of pass costs this model (the time estimates).
    pub fn times(&self) -> &PassTimes {
        &self.times
    }

    /// Whether `rows` more rows would fit now (checked again, atomically, by `submit`): lets a request be
    /// refused before it costs decoding.
    pub fn has_room(&self, rows: usize) -> bool {
        self.depth() + rows.max(1) <= self.capacity
    }
}

/// What the worker runs batches on: a model's ONNX Runtime sessions ([`ModelRunner`]), or a stand-in that
/// computes its outputs otherwise (the API's tests run the whole service on one, without ONNX Runtime).
pub trait Runner: Send + 'static {
    /// The model it runs.
    fn info(&self) -> Arc<ModelInfo>;
    /// Runs one batch through the plan's graph; the output is row-aligned with the batch.
    fn run(&mut self, plan: &PlanKey, batch: &Batch) -> Result<BatchOutput, EngineError>;
}

impl Runner for ModelRunner {
    fn info(&self) -> Arc<ModelInfo> {
        ModelRunner::info(self)
    }

    fn run(&mut self, plan: &PlanKey, batch: &Batch) -> Result<BatchOutput, EngineError> {
        ModelRunner::run(self, plan, batch)
    }
}

/// Starts a model's collector task and worker thread. Must be called inside a tokio runtime.
pub fn spawn(runner: impl Runner, config: BatcherConfig) -> Queue {
    let info = runner.info();
    let (tx, rx) = mpsc::unbounded_channel();
    let waiting_rows = Arc::new(AtomicUsize::new(0));
    // Capacity 1: the collector hands over the next batch only when the worker has taken the previous one.
    let (work_tx, work_rx) = mpsc::channel::<Vec<Queued>>(1);
    let name = info.name.clone();
    let times = Arc::new(PassTimes::default());
    let measured = times.clone();
    std::thread::Builder::new()
        .name(format!("camserve-worker-{name}"))
        .spawn(move || worker(runner, work_rx, &measured))
        .expect("spawning a thread. This is a bug.");
    tokio::spawn(collector(rx, work_tx, waiting_rows.clone(), config, info));
    Queue { tx, waiting_rows, capacity: config.queue_capacity, times }
}

async fn collector(
    mut rx: mpsc::UnboundedReceiver<Queued>,
    work_tx: mpsc::Sender<Vec<Queued>>,
    waiting_rows: Arc<AtomicUsize>,
    config: BatcherConfig,
    info: Arc<ModelInfo>,
) {
    let mut pending: VecDeque<Queued> = VecDeque::new();
    let rows = |q: &Queued| q.job.targets.len().max(1);
    loop {
        if pending.is_empty() {
            match rx.recv().await {
                Some(q) => pending.push_back(q),
                None => return,
            }
        }
        // Wait for company until the oldest job has waited max_wait or its plan has max_batch rows.
        let deadline = pending[0].enqueued + config.max_wait;
        loop {
            while let Ok(q) = rx.try_recv() {
                pending.push_back(q);
            }
            let plan = &pending[0].job.plan;
            let same: usize = pending.iter().filter(|q| &q.job.plan == plan).map(rows).sum();
            // Checked here, not left to the timer: tokio's timer rounds up to the next millisecond, so an
            // elapsed (or zero) wait would still cost about 1 ms.
            if same >= config.max_batch || Instant::now() >= deadline {
                break;
            }
            tokio::select! {
                q = rx.recv() => match q {
                    Some(q) => pending.push_back(q),
                    None => break,
                },
                _ = tokio::time::sleep_until(deadline.into()) => break,
            }
        }
        // The batch: the oldest synchronous job's plan (a background job's when none waits), in arrival order, up to
        // max_batch rows (one oversized job runs alone); background jobs join a batch of their plan only when no
        // synchronous job waits.
        let foreground = pending.iter().any(|q| !q.job.background);
        let plan = pending.iter().find(|q| !foreground || !q.job.background).map(|q| q.job.plan.clone()).expect("pending is not empty. This is a bug.");
        let now = Instant::now();
        let (mut batch, mut taken, mut rest) = (Vec::new(), 0usize, VecDeque::new());
        while let Some(q) = pending.pop_front() {
            if q.job.plan != plan || (foreground && q.job.background) || (taken > 0 && taken + rows(&q) > config.max_batch) {
                rest.push_back(q);
                continue;
            }
            waiting_rows.fetch_sub(rows(&q), Ordering::SeqCst);
            if q.job.reply.is_closed() {
                metrics::counter!("camserve_jobs_dropped_total", "reason" => "client_gone").increment(1);
                continue;
            }
            if q.job.deadline <= now {
                metrics::counter!("camserve_jobs_dropped_total", "reason" => "timeout").increment(1);
                continue;
            }
            taken += rows(&q);
            batch.push(q);
        }
        pending = rest;
        metrics::gauge!("camserve_queue_depth_rows", "model" => info.name.clone()).set(waiting_rows.load(Ordering::SeqCst) as f64);
        if batch.is_empty() {
            continue;
        }
        if work_tx.send(batch).await.is_err() {
            return;
        }
    }
}

fn worker(mut runner: impl Runner, mut work_rx: mpsc::Receiver<Vec<Queued>>, times: &PassTimes) {
    let info = runner.info();
    while let Some(jobs) = work_rx.blocking_recv() {
        // A job whose requester went away while its batch waited here (a cancelled job, a client that hung up) is
        // dropped unrun, like the collector drops those that went away before.
        let jobs: Vec<Queued> = jobs
            .into_iter()
            .filter(|q| {
                let gone = q.job.reply.is_closed();
                if gone {
                    metrics::counter!("camserve_jobs_dropped_total", "reason" => "client_gone").increment(1);
                }
                !gone
            })
            .collect();
        if jobs.is_empty() {
            continue;
        }
        let started = Instant::now();
        let plan = jobs[0].job.plan.clone();
        let rows: usize = jobs.iter().map(|q| q.job.targets.len().max(1)).sum();
        let plan_label = plan_label(&plan);
        // A panic while stacking the batch or inside ONNX Runtime's bindings fails this batch, not the model:
        // the worker keeps serving.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            test_hooks::maybe_panic(&info.name);
            let batch = assemble(&jobs, &info);
            runner.run(&plan, &batch)
        }))
        .unwrap_or_else(|p| {
            let msg = crate::backend::runtime::panic_message(&*p);
            tracing::error!(model = %info.name, plan = %plan_label, rows, "inference panicked: {msg}");
            // The message stays in the log: a 500 does not hand internals to the client.
            Err(EngineError::Ort("inference failed unexpectedly (a bug; the cause is in the server log)".into()))
        });
        let inference = started.elapsed();
        if result.is_ok() {
            times.record(&plan, rows, inference.as_secs_f64());
        }
        metrics::histogram!("camserve_inference_duration_seconds", "model" => info.name.clone(), "plan" => plan_label.clone())
            .record(inference.as_secs_f64());
        metrics::histogram!("camserve_batch_rows", "model" => info.name.clone()).record(rows as f64);
        metrics::counter!("camserve_rows_total", "model" => info.name.clone(), "plan" => plan_label).increment(rows as u64);
        // A batch of one job hands its output over as it is; otherwise each job gets a copy of its rows.
        let mut result = result.map(Some);
        let single = jobs.len() == 1;
        let mut offset = 0;
        for q in jobs {
            let n = q.job.targets.len().max(1);
            let reply = match &mut result {
                Ok(out) => {
                    let output = if single { out.take().expect("one job takes it once. This is a bug.") } else {
                        out.as_ref().expect("taken only by a single job. This is a bug.").rows(offset..offset + n)
                    };
                    Ok(JobOutput { output, queue: started - q.enqueued, inference, batch_rows: rows, forward_equivalents: n as u64 * PassKind::of(&plan).1 })
                }
                Err(EngineError::Ort(m)) => Err(EngineError::Ort(m.clone())),
                Err(e) => Err(EngineError::Ort(e.to_string())),
            };
            offset += n;
            let _ = q.job.reply.send(reply);
        }
    }
}

/// Stacks the jobs' images (one per row) with their seed rows and ranks. Jobs of one plan have images of one shape
/// (the model's input, or a [`PlanKey::Head`]'s layer): `Service` builds them so.
fn assemble(jobs: &[Queued], info: &ModelInfo) -> Batch {
    let (c, h, w) = match &jobs[0].job.images {
        Images::One(a) => a.dim(),
        Images::PerRow(v) => v.first().map(|a| a.dim()).unwrap_or((info.input_shape[0], info.input_shape[1], info.input_shape[2])),
    };
    let rows: usize = jobs.iter().map(|q| q.job.targets.len().max(1)).sum();
    let mut images = Array4::<f32>::zeros((rows, c, h, w));
    let mut seeds = Array2::<f32>::zeros((rows, info.num_classes));
    let mut ranks = Array1::<i64>::zeros(rows);
    let mut r = 0;
    for q in jobs {
        let targets: &[Target] = if q.job.targets.is_empty() { &[Target::Rank(0)] } else { &q.job.targets };
        for (i, t) in targets.iter().enumerate() {
            let image = match &q.job.images {
                Images::One(a) => a,
                Images::PerRow(v) => &v[i.min(v.len().saturating_sub(1))],
            };
            images.index_axis_mut(Axis(0), r).assign(image);
            match t {
                Target::Rank(k) => ranks[r] = *k as i64,
                Target::Class(class) => {
                    ranks[r] = -1;
                    seeds[[r, *class]] = 1.0;
                }
                Target::Seed(seed) => {
                    ranks[r] = -1;
                    seeds.row_mut(r).assign(&ndarray::ArrayView1::from(&seed[..]));
                }
            }
            r += 1;
        }
    }
    Batch { images, seeds, ranks }
}

pub fn plan_label(plan: &PlanKey) -> String {
    match plan {
        PlanKey::Predict => "predict".into(),
        PlanKey::Head(_) => "head".into(),
        PlanKey::TokenHead(_) => "token-head".into(),
        PlanKey::Tap(_) => "tap".into(),
        PlanKey::Explain(p) => {
            let mut parts = vec!["cam"];
            parts.extend(p.rules.iter().map(|r| r.as_str()));
            if p.attention {
                parts.push("attention");
            }
            parts.join("+")
        }
    }
}

/// A panic on demand inside a batch, for the tests of the worker's protection (tests/batching.rs). Nothing but
/// a test calls `panic_next_batch`; the check is one uncontended lock per batch.
#[doc(hidden)]
pub mod test_hooks {
    use std::sync::Mutex;

    static PANIC_FOR: Mutex<Vec<String>> = Mutex::new(Vec::new());

    /// The next batch of model `model` panics inside the worker's protection.
    pub fn panic_next_batch(model: &str) {
        PANIC_FOR.lock().unwrap_or_else(|e| e.into_inner()).push(model.to_string());
    }

    pub(super) fn maybe_panic(model: &str) {
        let mut armed = PANIC_FOR.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = armed.iter().position(|m| m == model) {
            armed.swap_remove(i);
            drop(armed);
            panic!("test hook: injected panic in a batch of model `{model}`");
        }
    }
}
