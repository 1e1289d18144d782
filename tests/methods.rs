//! The multi-pass methods and the faithfulness metrics against their references, on the same weights and input.
//!
//! `tests/fixtures/make_method_fixtures.py` exports a small CNN (`tests/fixtures/models/methods_cnn.onnx`: three
//! conv + ReLU, global average pooling, a linear layer) and computes, for two images (targets: the top class of the
//! first, the second class of the second), IN FLOAT64 (the PyTorch model in double; pytorch-grad-cam rounds
//! Score-CAM's and Ablation-CAM's scores and the confidence change to float32 on the way):
//! - plain CAM from the linear layer's weights; pytorch-grad-cam 1.5.7's ScoreCAM and AblationCAM raw maps (its
//!   own `get_cam_image`); Finer-CAM with pytorch-grad-cam's `FinerWeightedTarget`, its seed d f / d logits and
//!   its comparison classes;
//! - Captum 0.9's IntegratedGradients (Gauss-Legendre, 50 steps) against the black-image baseline, and its
//!   quadrature nodes and weights;
//! - SmoothGrad as the mean plain input gradient at the fixture's own noisy copies (what Captum's NoiseTunnel
//!   computes for that noise), and the plain gradient;
//! - on given random maps: a transcription of RISE's CausalMetric (deletion, insertion: curves and AUC, its
//!   `gkern` and blurred substrate) and pytorch-grad-cam's CamMultImageConfidenceChange.
//!
//! Here the same model runs in float32 through ONNX Runtime and camserve's batcher (jobs of 4 rows, so the
//! chunking is exercised) and each result is compared with the float64 reference: max|a - b| / max|b| within the
//! stated tolerance. Input gradients of this shallow net are well-conditioned (no MaxPool, three ReLUs); float32
//! against float64 agrees to 1e-7..7e-7 here (maps, curves); the tolerance, 1e-5, leaves a margin of about 15.

use std::time::{Duration, Instant};

use camserve::backend::batcher::{self, BatcherConfig, Images, Job, Target};
use camserve::backend::engine::{BatchOutput, DeviceChoice, EngineOptions, ModelInfo, ModelRunner, ModelSpec, PlanKey};
use camserve::config::{IMAGENET_MEAN, IMAGENET_STD};
use camserve::methods::metrics::Metric;
use camserve::maths::cam;
use camserve::methods::{self, ablationcam, finercam, integrated_gradients, metrics, scorecam, smoothgrad, Passes};
use camserve::onnx::rewrite::ExplainPlan;
use camserve::onnx::rules::ReluRule;
use ndarray::{s, Array1, Array2, Array3, ArrayD, Axis, Ix2, Ix3};
use ndarray_npy::NpzReader;

/// float32 camserve against float64 references (maps: max|a-b| / max|b|).
const TOL: f64 = 1e-5;

fn root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn npz() -> NpzReader<std::fs::File> {
    NpzReader::new(std::fs::File::open(root().join("tests/fixtures/methods.npz")).unwrap()).unwrap()
}

fn f32s(name: &str) -> ArrayD<f32> {
    npz().by_name(name).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn i64s(name: &str) -> ArrayD<i64> {
    npz().by_name(name).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn rel(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f64 {
    assert_eq!(a.shape(), b.shape());
    let d = a.iter().zip(b).fold(0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs()));
    d / b.iter().fold(0f64, |m, &y| m.max((y as f64).abs())).max(1e-30)
}

fn runner() -> ModelRunner {
    let spec = ModelSpec::new("methods_cnn", root().join("tests/fixtures/models/methods_cnn.onnx"), IMAGENET_MEAN, IMAGENET_STD);
    ModelRunner::load(&spec, &EngineOptions { device: DeviceChoice::Cpu, intra_threads: 1, ..Default::default() }).unwrap()
}

struct Setup {
    queue: batcher::Queue,
    info: std::sync::Arc<ModelInfo>,
    x: Vec<Array3<f32>>,
    targets: Vec<usize>,
}

impl Setup {
    fn new() -> Setup {
        let r = runner();
        let info = r.info();
        let queue = batcher::spawn(r, BatcherConfig { max_batch: 4, max_wait: Duration::from_millis(1), queue_capacity: 4096 });
        let x = f32s("x").into_dimensionality::<ndarray::Ix4>().unwrap();
        let x = x.outer_iter().map(|a| a.to_owned()).collect();
        let targets = i64s("targets").iter().map(|&t| t as usize).collect();
        Setup { queue, info, x, targets }
    }

    fn passes(&self) -> Passes<'_> {
        Passes::new(&self.queue, &self.info, 4, Instant::now() + Duration::from_secs(120), Duration::from_secs(120))
    }

    /// The request's explain pass for image `i` and its target (plain rule too, for saliency).
    async fn explain(&self, i: usize) -> BatchOutput {
        let plan = PlanKey::Explain(ExplainPlan::new(self.info.default_layer.clone(), [ReluRule::Plain]).with_target_selection());
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job = Job {
            plan,
            images: Images::One(self.x[i].clone()),
            targets: vec![Target::Class(self.targets[i])],
            deadline: Instant::now() + Duration::from_secs(60),
            reply: tx,
            background: false,
        };
        self.queue.submit(job).unwrap();
        rx.await.unwrap().unwrap().output
    }
}

#[tokio::test]
async fn the_fixture_model_is_the_reference_model() {
    let s = Setup::new();
    assert_eq!(s.info.layer(&s.info.default_layer).unwrap().dims, vec![1, 12, 16, 16], "the default layer is the last ReLU");
    let logits = f32s("logits");
    let acts = f32s("activations");
    for i in 0..2 {
        let out = s.explain(i).await;
        let e = rel(&out.logits.row(0).to_owned().into_dyn(), &logits.slice(s![i, ..]).to_owned().into_dyn());
        assert!(e < TOL, "logits of image {i}: {e:e}");
        eprintln!("logits of image {i}: {e:.2e} (tolerance {TOL:e})");
        let a = out.activations.unwrap().index_axis(Axis(0), 0).to_owned().into_dyn();
        let e = rel(&a, &acts.slice(s![i, .., .., ..]).to_owned().into_dyn());
        assert!(e < TOL, "activations of image {i}: {e:e}");
        eprintln!("activations of image {i}: {e:.2e} (tolerance {TOL:e})");
    }
}

#[tokio::test]
async fn cam_matches_the_linear_heads_weights() {
    let s = Setup::new();
    let head = s.info.linear_head(&s.info.default_layer).expect("GAP + Linear head found");
    assert_eq!((head.classes, head.channels), (10, 12));
    let want = f32s("cam");
    for i in 0..2 {
        let out = s.explain(i).await;
        let acts = out.activations.as_ref().unwrap().index_axis(Axis(0), 0);
        let got = cam::weighted(acts, head.class_weights(s.targets[i])).into_dyn();
        let e = rel(&got, &want.slice(s![i, .., ..]).to_owned().into_dyn());
        assert!(e < TOL, "cam image {i}: {e:e}");
        eprintln!("cam image {i}: {e:.2e} (tolerance {TOL:e})");
    }
}

#[tokio::test]
async fn scorecam_matches_pytorch_grad_cam() {
    let s = Setup::new();
    let want = f32s("scorecam");
    for i in 0..2 {
        let out = s.explain(i).await;
        let acts = out.activations.as_ref().unwrap().index_axis(Axis(0), 0);
        let (got, used) = scorecam::run(&s.passes(), acts, &s.x[i], s.targets[i], None, "scorecam").await.unwrap();
        assert_eq!(used, 12);
        let e = rel(&got.into_dyn(), &want.slice(s![i, .., ..]).to_owned().into_dyn());
        assert!(e < TOL, "scorecam image {i}: {e:e}");
        eprintln!("scorecam image {i}: {e:.2e} (tolerance {TOL:e})");
    }
    // A cap keeps the highest-variance channels, and only they are weighted.
    let out = s.explain(0).await;
    let acts = out.activations.as_ref().unwrap().index_axis(Axis(0), 0);
    let kept = scorecam::channels(acts, Some(5));
    assert_eq!(kept.len(), 5);
    let var = |k: usize| {
        let a = acts.index_axis(Axis(0), k);
        let m = a.mean().unwrap();
        a.mapv(|v| (v - m) * (v - m)).mean().unwrap()
    };
    let min_kept = kept.iter().map(|&k| var(k)).fold(f32::INFINITY, f32::min);
    assert!((0..12).filter(|k| !kept.contains(k)).all(|k| var(k) <= min_kept));
}

#[tokio::test]
async fn ablationcam_matches_pytorch_grad_cam_running_only_the_head() {
    let s = Setup::new();
    assert_eq!(s.info.why_no_head(&s.info.default_layer), None);
    let want = f32s("ablationcam");
    for i in 0..2 {
        let out = s.explain(i).await;
        let acts = out.activations.as_ref().unwrap().index_axis(Axis(0), 0);
        assert_eq!(ablationcam::ablation_value(acts), 0.0, "after a ReLU the ablation value is 0");
        let y = out.logits[[0, s.targets[i]]];
        let got = ablationcam::run(&s.passes(), &s.info.default_layer, acts, s.targets[i], y, "ablationcam").await.unwrap();
        let e = rel(&got.into_dyn(), &want.slice(s![i, .., ..]).to_owned().into_dyn());
        assert!(e < TOL, "ablationcam image {i}: {e:e}");
        eprintln!("ablationcam image {i}: {e:.2e} (tolerance {TOL:e})");
    }
}

#[tokio::test]
async fn finercam_matches_pytorch_grad_cam() {
    let s = Setup::new();
    let (want, want_seed, want_cmp) = (f32s("finercam"), f32s("finercam_seed"), i64s("finercam_comparisons"));
    for i in 0..2 {
        let out = s.explain(i).await;
        let t = s.targets[i];
        let cmp = finercam::similar_classes(out.logits.row(0), t, 3);
        assert_eq!(cmp.iter().map(|&c| c as i64).collect::<Vec<_>>(), want_cmp.slice(s![i, ..]).to_vec(), "comparison classes");
        let seed = finercam::seed(out.logits.row(0), t, finercam::ALPHA, finercam::COMPARISONS);
        let e = rel(&Array1::from(seed.clone()).into_dyn(), &want_seed.slice(s![i, ..]).to_owned().into_dyn());
        assert!(e < TOL, "finercam seed image {i}: {e:e}");
        eprintln!("finercam seed image {i}: {e:.2e} (tolerance {TOL:e})");
        let grads = s.passes().seeded_gradients(&s.info.default_layer, &s.x[i], seed, "finercam").await.unwrap();
        let acts = out.activations.as_ref().unwrap().index_axis(Axis(0), 0);
        let got = cam::gradcam(acts, grads.view()).into_dyn();
        let e = rel(&got, &want.slice(s![i, .., ..]).to_owned().into_dyn());
        assert!(e < TOL, "finercam image {i}: {e:e}");
        eprintln!("finercam image {i}: {e:.2e} (tolerance {TOL:e})");
    }
}

#[tokio::test]
async fn integrated_gradients_match_captum() {
    let (alphas, weights) = integrated_gradients::gauss_legendre(50);
    let (wa, ww) = (f32s("ig_alphas"), f32s("ig_weights"));
    for k in 0..50 {
        assert!((alphas[k] - wa[k] as f64).abs() < 1e-7 && (weights[k] - ww[k] as f64).abs() < 1e-7, "node {k}");
    }
    assert!((weights.iter().sum::<f64>() - 1.0).abs() < 1e-13);
    let s = Setup::new();
    let baseline = f32s("ig_baseline").into_dimensionality::<Ix3>().unwrap();
    assert!(rel(&methods::black_input(&s.info).into_dyn(), &baseline.clone().into_dyn()) < 1e-6, "the baseline is the black image");
    let want = f32s("ig");
    for i in 0..2 {
        let got = integrated_gradients::run(&s.passes(), &s.info.default_layer, &s.x[i], &baseline, Target::Class(s.targets[i]), 50, "ig").await.unwrap();
        let e = rel(&got.into_dyn(), &want.slice(s![i, .., .., ..]).to_owned().into_dyn());
        assert!(e < TOL, "integrated gradients image {i}: {e:e}");
        eprintln!("integrated gradients image {i}: {e:.2e} (tolerance {TOL:e})");
    }
}

#[tokio::test]
async fn smoothgrad_matches_the_mean_gradient_and_is_saliency_without_noise() {
    let s = Setup::new();
    let noise = f32s("sg_noise");
    let want = f32s("smoothgrad");
    let layer = s.info.default_layer.clone();
    for i in 0..2 {
        let got = smoothgrad::mean_gradient(&s.passes(), &layer, Target::Class(s.targets[i]), 6, "smoothgrad", |k| &s.x[i] + &noise.slice(s![i, k, .., .., ..]))
            .await
            .unwrap();
        let e = rel(&got.into_dyn(), &want.slice(s![i, .., .., ..]).to_owned().into_dyn());
        assert!(e < TOL, "smoothgrad image {i}: {e:e}");
        eprintln!("smoothgrad image {i}: {e:.2e} (tolerance {TOL:e})");
        // noise = 0: every copy is the input, and the map is the request's saliency map bit for bit.
        let out = s.explain(i).await;
        let saliency = out.input_grads.iter().find(|(r, _)| *r == ReluRule::Plain).unwrap().1.index_axis(Axis(0), 0).to_owned();
        let e = rel(&saliency.clone().into_dyn(), &f32s("saliency").slice(s![i, .., .., ..]).to_owned().into_dyn());
        assert!(e < TOL, "saliency image {i}: {e:e}");
        eprintln!("saliency image {i}: {e:.2e} (tolerance {TOL:e})");
        let flat = smoothgrad::run(&s.passes(), &layer, &s.x[i], Target::Class(s.targets[i]), 5, 0.0, 1, "smoothgrad").await.unwrap();
        assert_eq!(flat, saliency, "smoothgrad with noise 0 is saliency exactly");
    }
    // The noise: reproducible from its seed, different for another seed, of the stated sigma.
    let x = &s.x[0];
    let sigma = smoothgrad::sigma(x, 0.15);
    let want_sigma = f32s("sg_sigma")[0];
    assert!((sigma - want_sigma).abs() <= 1e-6 * want_sigma, "sigma {sigma} vs {want_sigma}");
    let (mut a, mut b, mut c) = (smoothgrad::Noise::new(42, sigma), smoothgrad::Noise::new(42, sigma), smoothgrad::Noise::new(43, sigma));
    let (na, nb, nc) = (a.copy(x) - x, b.copy(x) - x, c.copy(x) - x);
    assert_eq!(na, nb);
    assert_ne!(na, nc);
    let n = na.len() as f64;
    let mean = na.iter().map(|&v| v as f64).sum::<f64>() / n;
    let sd = (na.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
    // 3,072 samples: the sample sd is within 4 % of sigma with overwhelming probability (its sd is ~1.3 %).
    assert!((sd / sigma as f64 - 1.0).abs() < 0.04 && mean.abs() < 0.1 * sigma as f64, "noise sd {sd} mean {mean} for sigma {sigma}");
}

#[tokio::test]
async fn metrics_match_rise_and_pytorch_grad_cam() {
    let k = metrics::gkern(11, 5.0).into_dyn();
    let e = rel(&k, &f32s("gkern"));
    assert!(e < 1e-6, "gkern: {e:e}");
    let s = Setup::new();
    let maps = f32s("metric_maps");
    let logits = f32s("logits").into_dimensionality::<Ix2>().unwrap();
    let (del_curve, ins_curve) = (f32s("deletion_curve"), f32s("insertion_curve"));
    let (del_auc, ins_auc, conf) = (f32s("deletion_auc"), f32s("insertion_auc"), f32s("confidence_change"));
    let substrate = f32s("insertion_substrate");
    assert_eq!(metrics::steps(32, 32), (5, 205));
    for i in 0..2 {
        let t = s.targets[i];
        let blurred = metrics::blur(&s.x[i], &metrics::gkern(11, 5.0)).into_dyn();
        let e = rel(&blurred, &substrate.slice(s![i, .., .., ..]).to_owned().into_dyn());
        assert!(e < 1e-5, "insertion substrate {i}: {e:e}");
        eprintln!("insertion substrate {i}: {e:.2e} (tolerance 1e-5)");
        let map: Array2<f32> = maps.slice(s![i, .., ..]).to_owned().into_dimensionality().unwrap();
        let row = logits.row(i);
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let z: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
        let score = (row[t] as f64 - max).exp() / z;
        for (metric, curve, auc) in [(Metric::Deletion, &del_curve, &del_auc), (Metric::Insertion, &ins_curve, &ins_auc)] {
            let got = metrics::evaluate(&s.passes(), metric, &s.x[i], &map, t, score).await.unwrap();
            let c = got.curve.unwrap();
            assert_eq!(c.len(), 206);
            let want_c = curve.slice(s![i, ..]);
            let worst = c.iter().zip(want_c.iter()).fold(0f64, |m, (&a, &b)| m.max((a - b as f64).abs()));
            // Softmax scores in [0, 1]: absolute error. float32 logits differ from float64 by ~1e-6.
            assert!(worst < 1e-5, "{metric:?} curve image {i}: {worst:e}");
            eprintln!("{metric:?} image {i}: curve {worst:.2e}, auc {:.2e} (tolerance 1e-5)", (got.value - auc[i] as f64).abs());
            assert!((got.value - auc[i] as f64).abs() < 1e-5, "{metric:?} auc image {i}: {} vs {}", got.value, auc[i]);
        }
        let got = metrics::evaluate(&s.passes(), Metric::ConfidenceChange, &s.x[i], &map, t, score).await.unwrap();
        assert!((got.value - conf[i] as f64).abs() < 1e-5, "confidence change image {i}: {} vs {}", got.value, conf[i]);
        eprintln!("confidence change image {i}: {:.2e} (tolerance 1e-5)", (got.value - conf[i] as f64).abs());
    }
}
