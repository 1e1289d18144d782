//! Asynchronous jobs: an explain request that runs in the background while the client polls it (RFC 7240's
//! `Prefer: respond-async`; the HTTP side is `api::jobs`).
//!
//! A job is admitted like a synchronous request (`Service::assess`: its options, its cost, its estimate against the
//! job's own deadline, `jobs.timeout_ms`), then runs on the runtime through `Service::handle_run` with a progress
//! counter (forward-equivalents done, counted by `methods::Passes` as its batches finish) and background priority
//! (the batcher runs its batches only when no synchronous request's batch waits). It is `queued` until its task
//! starts, `running`, then `done` (its answer kept), `failed` (its error kept) or `cancelled`. Cancelling aborts its
//! task: the batches it has queued are dropped by the batcher unrun (their reply channels are closed), only the batch
//! already running finishes.
//!
//! Jobs live in this process's memory, each visible only with the API key that created it (`owner`, a keyed hash of
//! the key; another key's job reads as unknown). At most `jobs.max_running` are queued or running and `jobs.max_kept`
//! are kept; a finished job's result is dropped `jobs.ttl_ms` after it finished, and its id is remembered (up to
//! [`TOMBSTONES`] ids) so that a late poll learns it expired.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::answer::Answer;
use super::pipeline::Assessment;
use crate::error::ServiceError;

/// Expired ids remembered for their 410.
pub const TOMBSTONES: usize = 4096;

/// The limits of `[jobs]` (config.rs).
#[derive(Debug, Clone, Copy)]
pub struct JobLimits {
    pub timeout: Duration,
    pub max_running: usize,
    pub max_kept: usize,
    pub ttl: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Done,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn finished(self) -> bool {
        matches!(self, JobState::Done | JobState::Failed | JobState::Cancelled)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}

/// A job as a poll sees it.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub id: String,
    pub model: String,
    pub state: JobState,
    /// Forward-equivalents run so far and planned (the request's cost); `done` may pass `planned` by a pass that
    /// the cost does not count (a multi-label request's first forward).
    pub done: u64,
    pub planned: u64,
    pub elapsed: Duration,
    /// The estimate when the job was accepted, in seconds (`None` before the model had run a pass).
    pub estimate_seconds: Option<f64>,
    /// Seconds left: from the progress so far once some is made, else the estimate less the time elapsed; 0 once
    /// finished.
    pub remaining_seconds: Option<f64>,
    /// The answer or error of a finished job (`None` while it runs and when cancelled).
    pub outcome: Option<Arc<Result<Answer, ServiceError>>>,
}

/// What a lookup found.
#[derive(Debug)]
pub enum Lookup {
    Found(Snapshot),
    /// Finished and dropped after `jobs.ttl_ms` (410).
    Expired,
    /// Never existed, or another key's (404).
    Unknown,
}

/// Why a job was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `jobs.max_running` jobs are queued or running (429).
    TooManyRunning(usize),
    /// `jobs.max_kept` jobs are kept and none has finished to make room (503).
    Full(usize),
}

struct Entry {
    owner: u64,
    model: String,
    state: JobState,
    progress: Arc<AtomicU64>,
    planned: u64,
    created: Instant,
    finished: Option<Instant>,
    estimate_seconds: Option<f64>,
    outcome: Option<Arc<Result<Answer, ServiceError>>>,
    abort: Option<tokio::task::AbortHandle>,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<String, Entry>,
    expired: HashSet<String>,
    expired_order: VecDeque<String>,
}

/// The process's jobs.
pub struct Jobs {
    pub limits: JobLimits,
    inner: Mutex<Inner>,
    /// Keys the owner hash (per process, so that a hash says nothing outside it).
    keys: std::collections::hash_map::RandomState,
    /// This replica's name in job ids (`HOSTNAME`, a Kubernetes pod's name, where set).
    replica: String,
    streams: AtomicUsize,
}

impl Jobs {
    pub fn new(limits: JobLimits) -> Jobs {
        let replica = std::env::var("HOSTNAME")
            .ok()
            .map(|h| h.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').take(63).collect::<String>())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "camserve".into());
        Jobs { limits, inner: Mutex::new(Inner::default()), keys: Default::default(), replica, streams: AtomicUsize::new(0) }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The owner of what `key` (the presented API key, `None` without keys) creates and may see.
    pub fn owner(&self, key: Option<&str>) -> u64 {
        let mut h = self.keys.build_hasher();
        h.write(key.unwrap_or("").as_bytes());
        h.write_u8(key.is_some() as u8);
        h.finish()
    }

    /// Accepts a job and starts it on the runtime: `work(progress)` runs the request with that progress counter.
    pub fn start<F, Fut>(self: &Arc<Self>, owner: u64, model: &str, assessment: Assessment, work: F) -> Result<Snapshot, Refusal>
    where
        F: FnOnce(Arc<AtomicU64>) -> Fut,
        Fut: Future<Output = Result<Answer, ServiceError>> + Send + 'static,
    {
        let now = Instant::now();
        let mut inner = self.lock();
        self.expire(&mut inner, now);
        let running = inner.entries.values().filter(|e| !e.state.finished()).count();
        if running >= self.limits.max_running {
            return Err(Refusal::TooManyRunning(self.limits.max_running));
        }
        if inner.entries.len() >= self.limits.max_kept {
            // Room from the oldest finished job, which is then gone as if expired.
            let oldest = inner.entries.iter().filter(|(_, e)| e.state.finished()).min_by_key(|(_, e)| e.finished).map(|(id, _)| id.clone());
            match oldest {
                Some(id) => Self::forget(&mut inner, id),
                None => return Err(Refusal::Full(self.limits.max_kept)),
            }
        }
        let id = format!("{}.{:016x}{:016x}", self.replica, rand::random::<u64>(), rand::random::<u64>());
        let progress = Arc::new(AtomicU64::new(0));
        let entry = Entry {
            owner,
            model: model.to_string(),
            state: JobState::Queued,
            progress: progress.clone(),
            planned: assessment.cost,
            created: now,
            finished: None,
            estimate_seconds: assessment.estimate_seconds,
            outcome: None,
            abort: None,
        };
        inner.entries.insert(id.clone(), entry);
        let fut = work(progress);
        let jobs = self.clone();
        let task_id = id.clone();
        let handle = tokio::spawn(async move {
            jobs.set_running(&task_id);
            let result = fut.await;
            jobs.finish(&task_id, result);
        });
        if let Some(e) = inner.entries.get_mut(&id) {
            e.abort = Some(handle.abort_handle());
        }
        metrics::counter!("camserve_jobs_total", "model" => model.to_string()).increment(1);
        let snap = Self::snapshot(&id, &inner.entries[&id], now);
        Ok(snap)
    }

    fn set_running(&self, id: &str) {
        if let Some(e) = self.lock().entries.get_mut(id)
            && e.state == JobState::Queued
        {
            e.state = JobState::Running;
        }
    }

    fn finish(&self, id: &str, result: Result<Answer, ServiceError>) {
        let mut inner = self.lock();
        if let Some(e) = inner.entries.get_mut(id)
            && !e.state.finished()
        {
            e.state = if result.is_ok() { JobState::Done } else { JobState::Failed };
            e.outcome = Some(Arc::new(result));
            e.finished = Some(Instant::now());
            e.abort = None;
        }
    }

    /// The job `id` as `owner` may see it.
    pub fn get(&self, owner: u64, id: &str) -> Lookup {
        let now = Instant::now();
        let mut inner = self.lock();
        self.expire(&mut inner, now);
        match inner.entries.get(id) {
            Some(e) if e.owner == owner => Lookup::Found(Self::snapshot(id, e, now)),
            Some(_) => Lookup::Unknown,
            None if inner.expired.contains(id) => Lookup::Expired,
            None => Lookup::Unknown,
        }
    }

    /// Cancels the job `id`: its task is aborted and its queued batches are dropped unrun. A finished job is returned
    /// as it is (the caller answers 409).
    pub fn cancel(&self, owner: u64, id: &str) -> Lookup {
        let now = Instant::now();
        let mut inner = self.lock();
        self.expire(&mut inner, now);
        let gone = inner.expired.contains(id);
        match inner.entries.get_mut(id) {
            Some(e) if e.owner == owner => {
                if !e.state.finished() {
                    if let Some(a) = e.abort.take() {
                        a.abort();
                    }
                    e.state = JobState::Cancelled;
                    e.finished = Some(now);
                    metrics::counter!("camserve_jobs_cancelled_total").increment(1);
                }
                Lookup::Found(Self::snapshot(id, e, now))
            }
            Some(_) => Lookup::Unknown,
            None if gone => Lookup::Expired,
            None => Lookup::Unknown,
        }
    }

    /// Jobs kept now (running and finished).
    pub fn kept(&self) -> usize {
        let mut inner = self.lock();
        self.expire(&mut inner, Instant::now());
        inner.entries.len()
    }

    /// Event streams open now.
    pub fn streams(&self) -> usize {
        self.streams.load(Ordering::SeqCst)
    }

    /// Counts an event stream while the guard lives.
    pub fn stream_guard(self: &Arc<Self>) -> StreamGuard {
        self.streams.fetch_add(1, Ordering::SeqCst);
        metrics::gauge!("camserve_job_streams").increment(1.0);
        StreamGuard(self.clone())
    }

    fn expire(&self, inner: &mut Inner, now: Instant) {
        let ttl = self.limits.ttl;
        let old: Vec<String> = inner.entries.iter().filter(|(_, e)| e.finished.is_some_and(|f| now.duration_since(f) >= ttl)).map(|(id, _)| id.clone()).collect();
        for id in old {
            Self::forget(inner, id);
        }
    }

    fn forget(inner: &mut Inner, id: String) {
        inner.entries.remove(&id);
        if inner.expired.insert(id.clone()) {
            inner.expired_order.push_back(id);
        }
        while inner.expired_order.len() > TOMBSTONES {
            if let Some(old) = inner.expired_order.pop_front() {
                inner.expired.remove(&old);
            }
        }
    }

    fn snapshot(id: &str, e: &Entry, now: Instant) -> Snapshot {
        let done = e.progress.load(Ordering::Relaxed);
        let elapsed = e.finished.unwrap_or(now).duration_since(e.created);
        let remaining = if e.state.finished() {
            Some(0.0)
        } else if done > 0 && e.planned > 0 {
            let left = e.planned.saturating_sub(done) as f64;
            Some(elapsed.as_secs_f64() * left / done as f64)
        } else {
            e.estimate_seconds.map(|s| (s - elapsed.as_secs_f64()).max(0.0))
        };
        Snapshot {
            id: id.to_string(),
            model: e.model.clone(),
            state: e.state,
            done,
            planned: e.planned,
            elapsed,
            estimate_seconds: e.estimate_seconds,
            remaining_seconds: remaining,
            outcome: e.outcome.clone(),
        }
    }
}

/// An open event stream, counted until dropped (when its client goes away or the job ends).
pub struct StreamGuard(Arc<Jobs>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::SeqCst);
        metrics::gauge!("camserve_job_streams").decrement(1.0);
    }
}
