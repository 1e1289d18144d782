//! Property-based fuzzing of everything that reads untrusted bytes: image decoding, request parsing (query
//! strings, JSON and multipart bodies, option validation) and ONNX model loading and rewriting. Properties:
//! nothing panics; every failure is an error value with the right kind. Inputs are random bytes and mutations of
//! valid inputs (bit flips, truncations, splices).
//!
//! CI runs FUZZ_CASES (default 200) cases per target, a quarter of that (50) for the two model targets, which
//! build ONNX Runtime sessions; long runs: `scripts/fuzz-long.sh` or `FUZZ_CASES=20000 cargo test --release --test fuzz`.
//! Findings are fixed and kept as regression cases in `tests/fuzz_corpus/`.

use std::sync::OnceLock;

use bytes::Bytes;
use camserve::backend::engine::{DeviceChoice, EngineOptions, ModelInfo, ModelRunner, ModelSpec};
use camserve::core::options::{OptionLimits, RawOptions};
use camserve::onnx::rewrite::PrepareOptions;
use camserve::onnx::{io, proto::ModelProto};
use camserve::preprocess::{self, DecodeLimits};
use proptest::prelude::*;

/// FUZZ_CASES, default 200. A value that would run no case (0, or not a number) fails the targets rather than let
/// them pass having checked nothing.
fn cases() -> u32 {
    match std::env::var("FUZZ_CASES") {
        Err(_) => 200,
        Ok(v) => match v.trim().parse::<u32>() {
            Ok(n) if n >= 1 => n,
            _ => panic!("FUZZ_CASES={v:?} runs no case: give a positive number (unset: 200)"),
        },
    }
}

const LIMITS: DecodeLimits = DecodeLimits { max_pixels: 4_000_000, max_dimension: 8192 };

fn seeds() -> &'static Vec<Vec<u8>> {
    static S: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    S.get_or_init(|| {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let jpg = std::fs::read(root.join("tests/data/shapes/000.jpg")).unwrap();
        let img = image::load_from_memory(&jpg).unwrap();
        let mut out = vec![jpg];
        for fmt in [image::ImageFormat::Png, image::ImageFormat::Gif, image::ImageFormat::Bmp, image::ImageFormat::Tiff, image::ImageFormat::WebP] {
            let mut b = std::io::Cursor::new(Vec::new());
            let i = if fmt == image::ImageFormat::Gif { image::DynamicImage::ImageRgba8(img.to_rgba8()) } else { img.clone() };
            i.write_to(&mut b, fmt).unwrap();
            out.push(b.into_inner());
        }
        let corpus = root.join("tests/fuzz_corpus");
        if let Ok(entries) = std::fs::read_dir(&corpus) {
            for e in entries.flatten() {
                if e.path().extension().is_some_and(|x| x == "bin") {
                    out.push(std::fs::read(e.path()).unwrap());
                }
            }
        }
        out
    })
}

/// A valid seed with up to 8 mutations: byte flips, overwrites, truncation, duplication of a slice.
fn mutated(seed_pool: &'static [Vec<u8>]) -> impl Strategy<Value = Vec<u8>> {
    (0..seed_pool.len(), prop::collection::vec((any::<u8>(), any::<u32>(), any::<u8>()), 0..8), any::<u32>()).prop_map(
        move |(i, edits, cut)| {
            let mut b = seed_pool[i].clone();
            for (kind, pos, val) in edits {
                if b.is_empty() {
                    break;
                }
                let p = pos as usize % b.len();
                match kind % 4 {
                    0 => b[p] ^= 1 << (val % 8),
                    1 => b[p] = val,
                    2 => {
                        let end = (p + (val as usize) * 4).min(b.len());
                        let dup = b[p..end].to_vec();
                        b.splice(p..p, dup);
                    }
                    _ => b.truncate(p.max(1)),
                }
            }
            if cut % 5 == 0 && b.len() > 1 {
                b.truncate(1 + cut as usize % (b.len() - 1));
            }
            b
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn image_decoding_never_panics(bytes in prop_oneof![mutated(seeds()), prop::collection::vec(any::<u8>(), 0..2048)]) {
        match preprocess::decode(&bytes, LIMITS) {
            Ok(img) => prop_assert!(img.width() as u64 * img.height() as u64 <= LIMITS.max_pixels),
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }
}

fn demo_info() -> &'static ModelInfo {
    static INFO: OnceLock<ModelInfo> = OnceLock::new();
    INFO.get_or_init(|| {
        let spec = ModelSpec {
            labels: Some(vec!["circle", "square", "triangle", "star", "cross", "hexagon"].into_iter().map(String::from).collect()),
            ..ModelSpec::new("demo", concat!(env!("CARGO_MANIFEST_DIR"), "/models/demo.onnx"), [0.5; 3], [0.25; 3])
        };
        let r = ModelRunner::load(&spec, &EngineOptions { device: DeviceChoice::Cpu, ..Default::default() }).unwrap();
        (*r.info()).clone()
    })
}

const OPTION_LIMITS: OptionLimits = OptionLimits { max_top_k: 10, max_targets: 10, max_methods: 10, scorecam_max_channels: None };

fn token() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("gradcam".to_string()), Just("guided_gradcam".to_string()), Just("gradcam++".to_string()), Just("circle".to_string()),
        Just("-1".to_string()), Just("3".to_string()), Just("99999999999999999999".to_string()), Just("NaN".to_string()),
        Just("inf".to_string()), Just("1e309".to_string()), Just("original".to_string()), Just("raw".to_string()), Just("".to_string()),
        "[a-z_+,0-9.%\\-]{0,12}",
        any::<String>(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn query_options_never_panic(pairs in prop::collection::vec((prop_oneof![
            Just("methods"), Just("target"), Just("top_k"), Just("layer"), Just("outputs"), Just("colormap"),
            Just("alpha"), Just("size"), Just("bogus")], token()), 0..8)) {
        let mut o = RawOptions::default();
        let mut ok = true;
        for (k, v) in &pairs {
            if o.set_text(k, v).is_err() { ok = false; break; }
        }
        if ok
            && let Ok(v) = o.validate(demo_info(), OPTION_LIMITS) {
                prop_assert!(!v.methods.is_empty() && v.methods.len() <= 10);
                prop_assert!(!v.targets.is_empty() && v.targets.len() <= 10);
                prop_assert!((0.0..=1.0).contains(&v.alpha));
            }
    }

    #[test]
    fn json_options_never_panic(text in prop_oneof![
            any::<String>(),
            prop::collection::vec(token(), 0..6).prop_map(|t| format!("{{\"methods\": {:?}, \"target\": [{}], \"top_k\": {}, \"alpha\": {}}}",
                t, t.iter().map(|s| s.parse::<f64>().map(|f| f.to_string()).unwrap_or_else(|_| format!("{s:?}"))).collect::<Vec<_>>().join(","),
                t.first().cloned().unwrap_or_default().parse::<f64>().unwrap_or(1.0), t.len() as f64 / 3.0)),
            (0usize..200).prop_map(|d| format!("{}1{}", "[".repeat(d), "]".repeat(d))),
            (0usize..200).prop_map(|d| format!("{}{}", "{\"a\":".repeat(d), "}".repeat(d))),
        ]) {
        if let Ok(o) = RawOptions::from_json_object(text.as_bytes()) {
            let _ = o.validate(demo_info(), OPTION_LIMITS);
        }
    }

    #[test]
    fn request_bodies_never_panic(
        content_type in prop_oneof![Just("multipart/form-data; boundary=XyZ".to_string()), Just("application/json".to_string()),
            Just("image/png".to_string()), Just("multipart/form-data".to_string()), Just("text/plain".to_string()), "[ -~]{0,40}"],
        body in prop_oneof![
            mutated(seeds()),
            prop::collection::vec(any::<u8>(), 0..512),
            prop::collection::vec(token(), 0..4).prop_map(|t| format!(
                "--XyZ\r\nContent-Disposition: form-data; name=\"{}\"\r\n\r\n{}\r\n--XyZ\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a\"\r\n\r\nGIF89a\r\n--XyZ--\r\n",
                t.first().cloned().unwrap_or_default(), t.join(",")).into_bytes()),
            prop::collection::vec(token(), 0..4).prop_map(|t| format!("{{\"image\": {:?}, \"methods\": {:?}}}", t.join(""), t).into_bytes()),
        ],
        query in prop::option::of("[a-z_=&%,0-9.+\\-]{0,40}"),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let uri = match &query { Some(q) => format!("/v1/models/demo/explain?{q}"), None => "/v1/models/demo/explain".into() };
        let req = axum::http::Request::builder().method("POST").uri(uri).header("content-type", content_type.as_str())
            .body(axum::body::Body::from(body)).unwrap();
        let res = rt.block_on(camserve::api::upload::parse(req, 1 << 20));
        if let Err(e) = res {
            prop_assert!([400u16, 413, 415, 422].contains(&e.status.as_u16()), "{}", e.status);
        }
    }
}

/// The demo model first (the structural mutations start from it), then the committed model findings.
fn demo_bytes() -> &'static Vec<Vec<u8>> {
    static B: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    B.get_or_init(|| {
        let mut out = vec![std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/models/demo.onnx")).unwrap()];
        out.extend(corpus_models().into_iter().map(|(_, b)| b));
        out
    })
}

/// `tests/fuzz_corpus/*.onnx`: models that once crashed the loader.
fn corpus_models() -> Vec<(String, Vec<u8>)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_corpus");
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "onnx"))
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()))
        .collect();
    out.sort();
    out
}

/// Each past model finding, as it was found: loading and inspecting it is an error, not a panic.
#[test]
fn corpus_models_are_refused_cleanly() {
    let models = corpus_models();
    assert!(!models.is_empty(), "tests/fuzz_corpus holds the model findings");
    for (name, bytes) in models {
        let refused = match io::decode_model(Bytes::from(bytes), None) {
            Err(_) => true,
            Ok(m) => camserve::backend::probe::inspect(m, &PrepareOptions::default()).is_err(),
        };
        assert!(refused, "{name} was accepted");
    }
}

/// Structural mutations of a valid model: removed or rewired nodes, dropped initializers, changed attributes.
fn model_mutation() -> impl Strategy<Value = Vec<(u8, u32, i64)>> {
    prop::collection::vec((any::<u8>(), any::<u32>(), -3i64..300), 1..4)
}

fn mutate_model(mut m: ModelProto, edits: &[(u8, u32, i64)]) -> ModelProto {
    let g = m.graph.as_mut().unwrap();
    for &(kind, pos, val) in edits {
        let n = g.node.len().max(1);
        let i = pos as usize % n;
        match kind % 6 {
            0 if !g.node.is_empty() => { g.node.remove(i); }
            1 if !g.initializer.is_empty() => { let k = pos as usize % g.initializer.len(); g.initializer.remove(k); }
            2 if !g.node.is_empty() => {
                let j = (pos as usize / 7) % n;
                let other = g.node[j].output.first().cloned().unwrap_or_default();
                if let Some(inp) = g.node[i].input.first_mut() { *inp = other; }
            }
            3 if !g.node.is_empty() => {
                if let Some(a) = g.node[i].attribute.first_mut() { a.ints = vec![val; (val.unsigned_abs() % 5) as usize]; a.i = Some(val); }
            }
            4 if !g.node.is_empty() => { g.node[i].op_type = Some(["Conv", "Relu", "Foo", "MaxPool", "Gemm", ""][pos as usize % 6].into()); }
            _ => {
                let k = pos as usize % g.initializer.len().max(1);
                if let Some(t) = g.initializer.get_mut(k) { t.dims.push(val); }
            }
        }
    }
    m
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases().div_ceil(4), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn model_bytes_never_panic(bytes in mutated(demo_bytes())) {
        if let Ok(m) = io::decode_model(Bytes::from(bytes), None) {
            let _ = camserve::backend::probe::inspect(m, &PrepareOptions::default());
        }
    }

    #[test]
    fn model_rewrites_never_panic(edits in model_mutation()) {
        let m = io::decode_model(Bytes::from(demo_bytes()[0].clone()), None).unwrap();
        let m = mutate_model(m, &edits);
        if let Ok(ex) = camserve::backend::probe::analyse(m, &PrepareOptions::default())
            && let Some(layer) = ex.default_layer.clone() {
                let _ = ex.build(&camserve::onnx::rewrite::ExplainPlan::new(layer, camserve::onnx::rules::ReluRule::ALL));
            }
    }
}
