//! The batcher with a real model: concurrent jobs share a run, abandoned and expired jobs cost nothing, a
//! full queue refuses at once.

use std::time::{Duration, Instant};

use camserve::backend::batcher::{self, BatcherConfig, Images, Job, SubmitError, Target};
use camserve::backend::engine::{DeviceChoice, EngineOptions, ModelRunner, ModelSpec, PlanKey};
use camserve::onnx::rewrite::ExplainPlan;
use camserve::onnx::rules::ReluRule;
use ndarray::Array3;
use tokio::sync::oneshot;

fn runner() -> ModelRunner {
    let spec = ModelSpec::new("demo", concat!(env!("CARGO_MANIFEST_DIR"), "/models/demo.onnx"), [0.5; 3], [0.25; 3]);
    let options = EngineOptions { device: DeviceChoice::Cpu, intra_threads: 1, ..Default::default() };
    ModelRunner::load(&spec, &options).unwrap()
}

fn job(plan: &PlanKey, targets: Vec<Target>, seed: f32) -> (Job, oneshot::Receiver<Result<batcher::JobOutput, camserve::backend::engine::EngineError>>) {
    let (tx, rx) = oneshot::channel();
    let image = Array3::from_shape_fn((3, 64, 64), |(c, y, x)| ((c + y * 3 + x * 7) as f32 * seed).sin());
    (Job { plan: plan.clone(), images: Images::One(image), targets, deadline: Instant::now() + Duration::from_secs(30), reply: tx, background: false }, rx)
}

fn explain_plan(r: &ModelRunner) -> PlanKey {
    PlanKey::Explain(ExplainPlan::new(r.info().default_layer.clone(), [ReluRule::Guided]).with_target_selection())
}

#[tokio::test]
async fn concurrent_jobs_share_one_run_and_get_their_own_rows() {
    let r = runner();
    let plan = explain_plan(&r);
    let q = batcher::spawn(r, BatcherConfig { max_batch: 8, max_wait: Duration::from_millis(200), queue_capacity: 64 });
    let mut rxs = vec![];
    for i in 0..3 {
        let (j, rx) = job(&plan, vec![Target::Rank(0), Target::Class(i)], 0.1 + i as f32);
        q.submit(j).unwrap();
        rxs.push(rx);
    }
    let mut outs = vec![];
    for rx in rxs {
        outs.push(rx.await.unwrap().unwrap());
    }
    for (i, o) in outs.iter().enumerate() {
        assert_eq!(o.batch_rows, 6, "three jobs of two rows ran as one batch");
        assert_eq!(o.output.len(), 2);
        let targets = o.output.targets.clone().unwrap();
        assert_eq!(targets[1], i, "the explicit class row");
        assert_eq!(targets[0], camserve::backend::engine::argmax(o.output.logits.row(0).iter()), "the rank-0 row is the prediction");
    }
    // Each job got its own image's rows: different inputs, different logits.
    assert_ne!(outs[0].output.logits.row(0), outs[1].output.logits.row(0));

    // The same jobs one at a time give the same numbers (batching does not change results).
    let (j, rx) = job(&plan, vec![Target::Rank(0), Target::Class(1)], 1.1);
    q.submit(j).unwrap();
    let alone = rx.await.unwrap().unwrap();
    assert_eq!(alone.batch_rows, 2);
    let d = (&alone.output.gradients.unwrap() - outs[1].output.gradients.as_ref().unwrap()).mapv(f32::abs).fold(0f32, |m, &v| m.max(v));
    assert!(d < 1e-5, "batched vs alone: {d}");
}

/// `max_wait` 0 (the default): a lone job runs at once, and jobs that are waiting together still share a run.
#[tokio::test]
async fn without_waiting_queued_jobs_still_share_a_run() {
    let r = runner();
    let plan = explain_plan(&r);
    let q = batcher::spawn(r, BatcherConfig { max_batch: 8, max_wait: Duration::ZERO, queue_capacity: 64 });
    let (j, rx) = job(&plan, vec![Target::Rank(0)], 0.3);
    q.submit(j).unwrap();
    assert_eq!(rx.await.unwrap().unwrap().batch_rows, 1);
    // Submitted without yielding to the collector (a current-thread runtime): all three are waiting when it looks.
    let rxs: Vec<_> = (0..3)
        .map(|i| {
            let (j, rx) = job(&plan, vec![Target::Rank(0)], 0.5 + i as f32);
            q.submit(j).unwrap();
            rx
        })
        .collect();
    for rx in rxs {
        assert_eq!(rx.await.unwrap().unwrap().batch_rows, 3);
    }
}

#[tokio::test]
async fn abandoned_and_expired_jobs_are_dropped_before_running() {
    let r = runner();
    let plan = explain_plan(&r);
    let q = batcher::spawn(r, BatcherConfig { max_batch: 16, max_wait: Duration::from_millis(150), queue_capacity: 64 });
    for i in 0..3 {
        let (j, rx) = job(&plan, vec![Target::Rank(0)], i as f32);
        q.submit(j).unwrap();
        drop(rx); // the client went away
    }
    let (mut expired, _keep) = job(&plan, vec![Target::Rank(0)], 5.0);
    expired.deadline = Instant::now();
    q.submit(expired).unwrap();
    let (j, rx) = job(&plan, vec![Target::Rank(0)], 9.0);
    q.submit(j).unwrap();
    let out = rx.await.unwrap().unwrap();
    assert_eq!(out.batch_rows, 1, "only the live job ran");
}

#[tokio::test]
async fn a_full_queue_refuses_at_once() {
    let r = runner();
    let plan = PlanKey::Predict;
    let q = batcher::spawn(r, BatcherConfig { max_batch: 4, max_wait: Duration::from_millis(300), queue_capacity: 3 });
    let (a, ra) = job(&plan, vec![Target::Rank(0), Target::Rank(1)], 1.0);
    q.submit(a).unwrap();
    let (b, _rb) = job(&plan, vec![Target::Rank(0), Target::Rank(1)], 2.0);
    let started = Instant::now();
    assert!(matches!(q.submit(b), Err(SubmitError::QueueFull)));
    assert!(started.elapsed() < Duration::from_millis(50));
    assert_eq!(q.depth(), 2);
    assert!(ra.await.unwrap().is_ok());
    assert_eq!(q.depth(), 0);
}
