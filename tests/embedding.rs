//! Embedders (a ResNet-50 trunk, DINOv2-small's widths at 4 of its 12 layers, CLIP ViT-B/32's image encoder at 2 of
//! its 12 layers) against the PyTorch models and pytorch-grad-cam's `SimilarityToConceptTarget` (the tutorial's
//! class: the cosine similarity of the image's embedding to a concept vector), on committed fixtures
//! (tests/fixtures/embedding, made by make_embedding_fixtures.py: seeded random weights, BatchNorm calibrated on the
//! 7 photos, exported with the TorchScript exporter at 224 x 224; the photos jittered by half a grey level).
//!
//! Criteria, fixed before the first measurement:
//! - each photo's embedding through OIP is within 1e-4 of ONNX Runtime's on the exported model (max |a - b| / max |b|),
//!   and the similarity within 1e-5 of the float64 one;
//! - per row (a photo explained against a reference image's embedding, a client's vector, or the mean direction of
//!   two photos' embeddings), Grad-CAM and HiResCAM at each fixture layer (pytorch-grad-cam's map after its ReLU, at
//!   the layer's grid) and the input gradient (saliency) are within 1e-4 of pytorch-grad-cam and torch.autograd on
//!   the float64 model. As for the segmenters (tests/segmentation.rs), a row whose reference moves by more than 1e-5
//!   under float32-sized perturbations of the input (the fixture's `stability`) cannot be matched by any float32
//!   computation and is printed with both numbers, not asserted; this rule and the fixture's figures were known
//!   before camserve was measured on it (the ResNet-50's input gradients and layer3 maps move by up to 1.5e-1: ReLU
//!   inputs and max-pool windows within float32 rounding of their kinks). A map that the reference's ReLU zeroes
//!   everywhere must be zero in camserve too.
//! - Through /v1, the image and its reference run in one batch and are both explained: the reference's map equals
//!   the one it gets as the image with the other as its reference (within 1e-4).

#[path = "support/detections.rs"]
#[allow(dead_code)]
mod detections;
#[path = "support/fixture.rs"]
#[allow(dead_code)]
mod fixture;
#[path = "support/server.rs"]
mod server;

use base64::Engine as _;
use ndarray::ArrayD;
use ndarray_npy::NpzReader;
use reqwest::multipart::{Form, Part};
use serde_json::{json, Value};
use detections::rel;
use fixture::{floats, oip_output, Fixture};
use server::*;

const MODELS: [&str; 3] = ["resnet50", "dinov2", "clip"];

fn fixture() -> Fixture {
    Fixture::new("embedding")
}

fn config() -> camserve::config::Config {
    let mut c = demo_config();
    for name in MODELS {
        c.models.push(camserve::config::ModelConfig::new(name, fixture().path(&format!("{name}_224.onnx"))));
    }
    c
}

/// The bundled embedder (64 x 64 pictures of the demo's shapes) and the demo classifier.
fn bundled_config() -> camserve::config::Config {
    let mut c = demo_config();
    let mut m = camserve::config::ModelConfig::new("embedder", root().join("models/shapes_embedder.onnx"));
    (m.mean, m.std) = (Some(camserve::config::IMAGENET_MEAN), Some(camserve::config::IMAGENET_STD));
    c.models.push(m);
    c
}

/// Photo `k`'s input tensor `[3, 224, 224]`, as the flat values.
fn input(inputs: &mut NpzReader<std::fs::File>, k: u64) -> Vec<f32> {
    let x: ArrayD<f32> = inputs.by_name(&format!("{k}.npy")).unwrap();
    x.iter().copied().collect()
}

fn tensor(name: &str, shape: Vec<usize>, data: Vec<f32>) -> Value {
    json!({ "name": name, "datatype": "FP32", "shape": shape, "data": data })
}

/// The OIP request that explains a fixture row: its photo as `input`, its reference as the `reference` input (the
/// concept photo's tensor, or the two photos of a mean) or as `reference_vector`.
fn row_request(row: &Value, inputs: &mut NpzReader<std::fs::File>, refs: &mut NpzReader<std::fs::File>, parameters: Value, outputs: &[&str]) -> Value {
    let k = row["photo"].as_u64().unwrap();
    let concept = &row["concept"];
    let reference = match concept["source"].as_str().unwrap() {
        "embedding" => tensor("reference", vec![1, 3, 224, 224], input(inputs, concept["photo"].as_u64().unwrap())),
        "mean" => {
            let photos: Vec<u64> = concept["photos"].as_array().unwrap().iter().map(|p| p.as_u64().unwrap()).collect();
            tensor("reference", vec![photos.len(), 3, 224, 224], photos.iter().flat_map(|&p| input(inputs, p)).collect())
        }
        "vector" => {
            let v: ArrayD<f32> = refs.by_name("vector.npy").unwrap();
            tensor("reference_vector", vec![v.len()], v.iter().copied().collect())
        }
        other => panic!("unknown concept source {other}"),
    };
    json!({
        "inputs": [tensor("input", vec![1, 3, 224, 224], input(inputs, k)), reference],
        "parameters": parameters,
        "outputs": outputs.iter().map(|o| json!({ "name": o })).collect::<Vec<_>>(),
    })
}

async fn infer(s: &Server, model: &str, req: &Value) -> Value {
    let res = s.client.post(s.url(&format!("/v2/models/{model}/infer"))).json(req).send().await.unwrap();
    let status = res.status().as_u16();
    let body: Value = res.json().await.unwrap();
    assert_eq!(status, 200, "{body}");
    check_response("/v2/models/{model}/infer", "post", 200, "application/json", &body);
    body
}

/// Each model is recognised as an embedder from its output's name; its embeddings through OIP equal ONNX Runtime's,
/// and its similarities the float64 ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_and_similarities_equal_the_models_own() {
    let mut s = Server::start(config()).await;
    let mut inputs = fixture().npz("inputs.npz");
    for name in MODELS {
        let spec = fixture().json(&format!("references_{name}.json"));
        let dim = spec["dim"].as_u64().unwrap();
        let m: Value = s.client.get(s.url(&format!("/v1/models/{name}"))).send().await.unwrap().json().await.unwrap();
        check_response("/v1/models/{model}", "get", 200, "application/json", &m);
        assert_eq!((m["task"].as_str(), m["embedding"]["dim"].as_u64()), (Some("embedding"), Some(dim)), "{m}");
        assert_eq!(m["default_methods"], json!(["gradcam"]));
        let mut refs = fixture().npz(&format!("references_{name}.npz"));
        for k in 0..7u64 {
            let req = json!({ "inputs": [tensor("input", vec![1, 3, 224, 224], input(&mut inputs, k))], "outputs": [{ "name": "embedding" }] });
            let res = infer(&s, name, &req).await;
            let want: ArrayD<f32> = refs.by_name(&format!("embedding_onnx_{k}.npy")).unwrap();
            let err = rel(&floats(oip_output(&res, "embedding")), &want.iter().map(|v| *v as f64).collect::<Vec<_>>());
            assert!(err <= 1e-4, "{name} photo {k}: embedding {err:.3e} from ONNX Runtime's");
        }
        for row in spec["rows"].as_array().unwrap() {
            let req = row_request(row, &mut inputs, &mut refs, json!({}), &["similarity"]);
            let res = infer(&s, name, &req).await;
            let got = floats(oip_output(&res, "similarity"))[0];
            let want = row["similarity"].as_f64().unwrap();
            assert!((got - want).abs() <= 1e-5, "{name} {}: similarity {got} vs {want}", row["row"]);
        }
    }
    s.stop().await.unwrap();
}

/// Per row: Grad-CAM and HiResCAM at each layer and the input gradient against pytorch-grad-cam and torch.autograd on
/// the float64 model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn similarity_maps_equal_pytorch_grad_cam_in_float64() {
    let mut s = Server::start(config()).await;
    let mut inputs = fixture().npz("inputs.npz");
    let (mut lines, mut failed, mut judged, mut unstable, mut zero) = (Vec::new(), Vec::new(), 0, 0, 0);
    for name in MODELS {
        let spec = fixture().json(&format!("references_{name}.json"));
        let mut refs = fixture().npz(&format!("references_{name}.npz"));
        let layers: Vec<(&String, &Value)> = spec["layers"].as_object().unwrap().iter().collect();
        for row in spec["rows"].as_array().unwrap() {
            let what = format!("{name} {}", row["row"].as_str().unwrap());
            let stability = &row["stability"];
            for (i, (layer, l)) in layers.iter().enumerate() {
                let tensor = l["onnx_tensor"].as_str().unwrap();
                // The input gradient once per row, with the first layer's request.
                let outputs: &[&str] = if i == 0 { &["gradcam", "hirescam", "saliency"] } else { &["gradcam", "hirescam"] };
                let req = row_request(row, &mut inputs, &mut refs, json!({ "layer": tensor }), outputs);
                let res = infer(&s, name, &req).await;
                for m in row["maps"].as_array().unwrap().iter().filter(|m| m["layer"] == **layer) {
                    let method = m["method"].as_str().unwrap().to_ascii_lowercase();
                    let key = m["cam"].as_str().unwrap();
                    let want: ArrayD<f64> = refs.by_name(&format!("{key}.npy")).unwrap();
                    let out = oip_output(&res, &method);
                    let shape: Vec<usize> = out["shape"].as_array().unwrap().iter().skip(1).map(|v| v.as_u64().unwrap() as usize).collect();
                    assert_eq!(shape[shape.len() - 2..], want.shape()[..], "{what} {key}");
                    let got = floats(out);
                    let want: Vec<f64> = want.iter().copied().collect();
                    if want.iter().all(|v| *v == 0.0) {
                        let largest = got.iter().fold(0f64, |a, v| a.max(v.abs()));
                        lines.push(format!("{what} {method} at {layer}: zero in the reference, camserve's largest {largest:.2e}"));
                        zero += 1;
                        if largest != 0.0 {
                            failed.push(format!("{what} {key}: the reference is zero everywhere, camserve's map is not ({largest:.3e})"));
                        }
                        continue;
                    }
                    judge(format!("{what} {method} at {layer}"), rel(&got, &want), stability["maps"][key].as_f64(), &mut lines, &mut failed, &mut judged, &mut unstable);
                }
                if i == 0 {
                    let want: ArrayD<f32> = refs.by_name(&format!("{}.npy", row["input_grad"].as_str().unwrap())).unwrap();
                    let err = rel(&floats(oip_output(&res, "saliency")), &want.iter().map(|v| *v as f64).collect::<Vec<_>>());
                    judge(format!("{what} saliency (input gradient)"), err, stability["input_grad"].as_f64(), &mut lines, &mut failed, &mut judged, &mut unstable);
                }
            }
        }
    }
    eprintln!("{}", lines.join("\n"));
    assert!(failed.is_empty(), "above 1e-4:\n{}\n\nall:\n{}", failed.join("\n"), lines.join("\n"));
    eprintln!("{judged} comparisons judged, {unstable} not (their reference moves by more than 1e-5), {zero} maps zero in the reference");
    // The fixture: 11 rows per model; ResNet-50 2 layers x 2 methods + the input gradient, the ViTs 1 x 2 + 1.
    assert_eq!(judged + unstable + zero, 11 * (5 + 3 + 3), "every fixture row is compared");
    // A guard on the fixture, not on camserve: the first version of this test asked for 100, a number written
    // before counting what the fixture offers; it has 68 stable references (every DINOv2 and CLIP row, the stable
    // ResNet-50 layer4 maps), which the first run judged. 60 keeps the guard meaningful.
    assert!(judged >= 60, "only {judged} comparisons judged");
    s.stop().await.unwrap();
}

/// A row: asserted at 1e-4 when its reference is stable (moves by at most 1e-5), printed with both numbers otherwise.
fn judge(what: String, err: f64, moves: Option<f64>, lines: &mut Vec<String>, failed: &mut Vec<String>, judged: &mut usize, unstable: &mut usize) {
    match moves {
        Some(m) if m > 1e-5 => {
            *unstable += 1;
            lines.push(format!("{what}: {err:.2e}, not judged: the reference moves by {m:.1e} under float32-sized perturbations"));
        }
        _ => {
            *judged += 1;
            lines.push(format!("{what}: {err:.2e}"));
            if err > 1e-4 {
                failed.push(format!("{what}: {err:.3e}"));
            }
        }
    }
}

/// Through /v1 the image and its reference are explained in one batch: the reference's map is the one it gets as
/// the image with the first as its reference, and both carry the same similarity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_images_are_explained_in_one_request() {
    let mut s = Server::start(config()).await;
    let photos: Vec<std::path::PathBuf> = {
        let mut p: Vec<_> = std::fs::read_dir(root().join("tests/fixtures/detection/photos")).unwrap().map(|e| e.unwrap().path()).collect();
        p.sort();
        p
    };
    let (a, b) = (std::fs::read(&photos[2]).unwrap(), std::fs::read(&photos[3]).unwrap());
    for name in ["dinov2", "clip"] {
        let explain = |query: &Vec<u8>, reference: &Vec<u8>| {
            let form = Form::new()
                .part("image", Part::bytes(query.clone()).file_name("a.png"))
                .part("reference", Part::bytes(reference.clone()).file_name("b.png"))
                .text("outputs", "raw,overlay");
            s.client.post(s.url(&format!("/v1/models/{name}/explain"))).multipart(form).send()
        };
        let ab: Value = explain(&a, &b).await.unwrap().json().await.unwrap();
        check_response("/v1/models/{model}/explain", "post", 200, "application/json", &ab);
        let ba: Value = explain(&b, &a).await.unwrap().json().await.unwrap();
        let e = ab["explanations"].as_array().unwrap();
        assert_eq!(e.len(), 2, "{name}: the image and its reference");
        assert_eq!((e[0]["target"]["image"].as_str(), e[1]["target"]["image"].as_str(), e[1]["target"]["reference"].as_u64()), (Some("query"), Some("reference"), Some(0)));
        let sim = ab["similarity"].as_f64().unwrap();
        assert!((sim - ba["similarity"].as_f64().unwrap()).abs() < 1e-6 && (sim - ab["references"][0]["similarity"].as_f64().unwrap()).abs() < 1e-12, "{name}: {sim}");
        let raw = |e: &Value| -> Vec<f64> {
            let bytes = base64::engine::general_purpose::STANDARD.decode(e["raw"]["data"].as_str().unwrap()).unwrap();
            bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64).collect()
        };
        let err = rel(&raw(&e[1]), &raw(&ba["explanations"][0]));
        assert!(err <= 1e-4, "{name}: the reference's map in one batch vs as the image: {err:.3e}");
        // Each overlay is drawn on its own picture.
        let size = |p: &Vec<u8>| image::load_from_memory(p).map(|i| (i.width(), i.height())).unwrap();
        let png = |e: &Value| base64::engine::general_purpose::STANDARD.decode(e["overlay_png"].as_str().unwrap()).unwrap();
        assert_eq!(size(&png(&e[0])), (224, 224));
        assert_eq!(ab["references"][0]["image"], json!({ "width": size(&b).0, "height": size(&b).1 }));
        // At size=original, each at its own picture's size.
        let form = Form::new()
            .part("image", Part::bytes(a.clone()).file_name("a.png"))
            .part("reference", Part::bytes(b.clone()).file_name("b.png"))
            .text("size", "original");
        let orig: Value = s.client.post(s.url(&format!("/v1/models/{name}/explain"))).multipart(form).send().await.unwrap().json().await.unwrap();
        let e = orig["explanations"].as_array().unwrap();
        assert_ne!(size(&a), size(&b), "two pictures of different sizes");
        assert_eq!((size(&png(&e[0])), size(&png(&e[1]))), (size(&a), size(&b)), "{name}: each overlay at its own picture's size");
    }
    s.stop().await.unwrap();
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    dot / (a.iter().map(|x| x * x).sum::<f64>().sqrt() * b.iter().map(|x| x * x).sum::<f64>().sqrt())
}

fn vector(e: &Value) -> Vec<f64> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(e["data"].as_str().unwrap_or_else(|| panic!("no vector in {e}"))).unwrap();
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64).collect()
}

/// The requests the bundled embedder answers and refuses, in the three request forms, OIP and KServe v1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_on_the_bundled_embedder() {
    let mut s = Server::start(bundled_config()).await;
    let pic = |i: usize| std::fs::read(root().join(format!("tests/data/shapes/{i:03}.jpg"))).unwrap();
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let url = |path: &str| s.url(&format!("/v1/models/embedder/{path}"));
    let status_detail = |res: reqwest::Response| async move {
        let status = res.status().as_u16();
        let body: Value = res.json().await.unwrap();
        (status, body["detail"].as_str().or(body["error"].as_str()).unwrap_or_default().to_string())
    };
    let m: Value = s.client.get(s.url("/v1/models/embedder")).send().await.unwrap().json().await.unwrap();
    assert_eq!((m["task"].as_str(), m["embedding"]["dim"].as_u64(), m["embedding"]["max_references"].as_u64()), (Some("embedding"), Some(64), Some(8)), "{m}");

    // predict: the embedding, with its values.
    let mut e = Vec::new();
    for i in 0..3 {
        let body: Value = s.client.post(url("predict")).header("content-type", "image/jpeg").body(pic(i)).send().await.unwrap().json().await.unwrap();
        check_response("/v1/models/{model}/predict", "post", 200, "application/json", &body);
        assert_eq!(body["embedding"]["dim"], 64);
        assert!(body.get("similarity").is_none() && body.get("explanations").is_none(), "{body}");
        e.push(vector(&body["embedding"]));
    }
    // explain needs a reference.
    let (status, detail) = status_detail(s.client.post(url("explain")).header("content-type", "image/jpeg").body(pic(0)).send().await.unwrap()).await;
    assert_eq!(status, 422);
    assert!(detail.contains("give one: a `reference` image part"), "{detail}");

    // multipart: `reference` part; both explained, the similarity that of the two embeddings.
    let form = Form::new().part("image", Part::bytes(pic(0)).file_name("0.jpg")).part("reference", Part::bytes(pic(1)).file_name("1.jpg"));
    let body: Value = s.client.post(url("explain")).multipart(form).send().await.unwrap().json().await.unwrap();
    check_response("/v1/models/{model}/explain", "post", 200, "application/json", &body);
    assert_eq!(body["explanations"].as_array().unwrap().len(), 2);
    assert!((body["similarity"].as_f64().unwrap() - cosine(&e[0], &e[1])).abs() < 1e-6, "{body}");
    assert!(body["embedding"].get("data").is_none(), "the vector only with outputs=embedding: {body}");

    // JSON: two reference images compare through their mean direction; three images explained.
    let req = json!({ "image": b64(&pic(0)), "reference_images": [b64(&pic(1)), b64(&pic(2))], "outputs": ["heatmap", "embedding"] });
    let body: Value = s.client.post(url("explain")).json(&req).send().await.unwrap().json().await.unwrap();
    check_response("/v1/models/{model}/explain", "post", 200, "application/json", &body);
    let unit = |v: &[f64]| -> Vec<f64> {
        let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        v.iter().map(|x| x / n).collect()
    };
    let mean: Vec<f64> = unit(&e[1]).iter().zip(unit(&e[2])).map(|(a, b)| (a + b) / 2.0).collect();
    assert!((body["similarity"].as_f64().unwrap() - cosine(&e[0], &mean)).abs() < 1e-6, "{body}");
    let targets: Vec<&Value> = body["explanations"].as_array().unwrap().iter().map(|x| &x["target"]).collect();
    assert_eq!(targets.len(), 3);
    assert!((targets[2]["similarity"].as_f64().unwrap() - cosine(&e[2], &e[0])).abs() < 1e-6, "each reference against the image: {targets:?}");
    assert_eq!(vector(&body["embedding"]).len(), 64);

    // reference_vector: the similarity to it; a wrong length is a 422 stating the expected one.
    let v: Vec<f64> = (0..64).map(|i| ((i * 7919) % 23) as f64 - 11.0).collect();
    let req = json!({ "image": b64(&pic(0)), "reference_vector": v, "methods": ["gradcam", "saliency", "eigencam"] });
    let body: Value = s.client.post(url("explain")).json(&req).send().await.unwrap().json().await.unwrap();
    check_response("/v1/models/{model}/explain", "post", 200, "application/json", &body);
    assert!((body["similarity"].as_f64().unwrap() - cosine(&e[0], &v)).abs() < 1e-6, "{body}");
    assert_eq!(body["explanations"].as_array().unwrap().len(), 3);
    let query = format!("?reference_vector={}", v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(","));
    let q: Value = s.client.post(url(&format!("explain{query}"))).header("content-type", "image/jpeg").body(pic(0)).send().await.unwrap().json().await.unwrap();
    assert_eq!(q["similarity"], body["similarity"], "the query-string form");
    // A multipart text part (a JSON array reads too) and the `options` part, which may hold a vector longer than
    // the other options' 16 KiB (here 64 numbers written with 300 decimals each).
    let long = format!(r#"{{"methods": "gradcam", "reference_vector": [{}]}}"#, v.iter().map(|x| format!("{x:.300}")).collect::<Vec<_>>().join(","));
    assert!(long.len() > camserve::core::options::MAX_OPTION_BYTES);
    for form in [
        Form::new().part("image", Part::bytes(pic(0)).file_name("0.jpg")).text("reference_vector", serde_json::to_string(&v).unwrap()),
        Form::new().part("image", Part::bytes(pic(0)).file_name("0.jpg")).text("options", long),
    ] {
        let m: Value = s.client.post(url("explain")).multipart(form).send().await.unwrap().json().await.unwrap();
        assert!((m["similarity"].as_f64().unwrap() - cosine(&e[0], &v)).abs() < 1e-6, "{m}");
    }

    // Bad input.
    let bad_vector = json!({ "image": b64(&pic(0)), "reference_vector": [1.0, 2.0, 3.0] });
    let (status, detail) = status_detail(s.client.post(url("explain")).json(&bad_vector).send().await.unwrap()).await;
    assert_eq!((status, detail.contains("has 3 values") && detail.contains("have 64")), (422, true), "{detail}");
    let form = Form::new().part("image", Part::bytes(pic(0)).file_name("0.jpg")).part("reference", Part::bytes(b"not an image".to_vec()).file_name("x.jpg"));
    let (status, detail) = status_detail(s.client.post(url("explain")).multipart(form).send().await.unwrap()).await;
    assert_eq!(status, 400, "{detail}");
    assert!(detail.contains("reference image part `reference` 1"), "{detail}");
    let (status, detail) = status_detail(s.client.post(url("explain")).json(&json!({ "image": b64(&pic(0)), "reference_image": "%%%" })).send().await.unwrap()).await;
    assert_eq!(status, 400);
    assert!(detail.contains("`reference_image` is not valid base64"), "{detail}");
    let both = json!({ "image": b64(&pic(0)), "reference_image": b64(&pic(1)), "reference_vector": v });
    let (status, detail) = status_detail(s.client.post(url("explain")).json(&both).send().await.unwrap()).await;
    assert_eq!((status, detail.as_str()), (422, "give reference images or reference_vector, not both"));
    for (extra, needle) in [
        (json!({ "methods": ["scorecam"] }), "an embedder's target is a similarity"),
        (json!({ "methods": ["integrated_gradients"] }), "an embedder's target is a similarity"),
        (json!({ "metrics": ["deletion"] }), "an embedder's target is a similarity"),
        (json!({ "target": 3 }), "not a class or `top_k`"),
        (json!({ "region": [0, 0, 10, 10] }), "applies to detectors and segmenters"),
    ] {
        let mut req = json!({ "image": b64(&pic(0)), "reference_image": b64(&pic(1)) });
        req.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        let (status, detail) = status_detail(s.client.post(url("explain")).json(&req).send().await.unwrap()).await;
        assert_eq!(status, 422, "{extra}: {detail}");
        assert!(detail.contains(needle), "{extra}: {detail}");
    }
    // A reference or a vector on a classifier names its task.
    let form = Form::new().part("image", Part::bytes(pic(0)).file_name("0.jpg")).part("reference", Part::bytes(pic(1)).file_name("1.jpg"));
    let (status, detail) = status_detail(s.client.post(s.url("/v1/models/demo/explain")).multipart(form).send().await.unwrap()).await;
    assert_eq!(status, 422);
    assert!(detail.contains("applies to embedders; model `demo`'s task is classification"), "{detail}");
    let (status, detail) = status_detail(s.client.post(s.url("/v1/models/demo/explain")).json(&json!({ "image": b64(&pic(0)), "reference_vector": [1.0] })).send().await.unwrap()).await;
    assert_eq!((status, detail.contains("`reference_vector` applies to embedders")), (422, true), "{detail}");
    // Still serving.
    let res = s.client.post(url("predict")).header("content-type", "image/jpeg").body(pic(0)).send().await.unwrap();
    assert_eq!(res.status(), 200);

    // OIP: encoded images, a reference input, the embedding and similarity outputs.
    let meta: Value = s.client.get(s.url("/v2/models/embedder")).send().await.unwrap().json().await.unwrap();
    let inputs: Vec<&str> = meta["inputs"].as_array().unwrap().iter().map(|i| i["name"].as_str().unwrap()).collect();
    assert_eq!(inputs, ["image", "input", "reference", "reference_vector"]);
    let bytes_input = |name: &str, files: Vec<Vec<u8>>| json!({ "name": name, "datatype": "BYTES", "shape": [files.len()], "data": files.iter().map(|f| b64(f)).collect::<Vec<_>>() });
    let req = json!({
        "inputs": [bytes_input("image", vec![pic(0), pic(2)]), bytes_input("reference", vec![pic(1)])],
        "outputs": [{ "name": "embedding" }, { "name": "similarity" }, { "name": "gradcam" }],
    });
    let res = infer(&s, "embedder", &req).await;
    assert_eq!(oip_output(&res, "embedding")["shape"], json!([2, 64]));
    let sims = floats(oip_output(&res, "similarity"));
    assert!((sims[0] - cosine(&e[0], &e[1])).abs() < 1e-6 && (sims[1] - cosine(&e[2], &e[1])).abs() < 1e-6, "{sims:?}");
    assert_eq!(oip_output(&res, "gradcam")["shape"], json!([2, 8, 8]));
    let req = json!({ "inputs": [bytes_input("image", vec![pic(0)])], "outputs": [{ "name": "similarity" }] });
    let res = s.client.post(s.url("/v2/models/embedder/infer")).json(&req).send().await.unwrap();
    let (status, detail) = status_detail(res).await;
    assert_eq!((status, detail.contains("needs a reference")), (400, true), "{detail}");
    let req = json!({ "inputs": [bytes_input("image", vec![pic(0)]), { "name": "reference_vector", "datatype": "FP32", "shape": [64], "data": v }], "outputs": [{ "name": "similarity" }] });
    let res = infer(&s, "embedder", &req).await;
    assert!((floats(oip_output(&res, "similarity"))[0] - cosine(&e[0], &v)).abs() < 1e-6);

    // KServe v1: an instance's reference.
    let req = json!({ "instances": [{ "image": { "b64": b64(&pic(0)) }, "reference": { "b64": b64(&pic(1)) } }] });
    let res: Value = s.client.post(s.url("/v1/models/embedder:explain")).json(&req).send().await.unwrap().json().await.unwrap();
    assert_eq!(res["explanations"][0]["explanations"].as_array().map(Vec::len), Some(2), "{res}");
    s.stop().await.unwrap();
}

/// The bundled embedder through camserve: a picture's nearest neighbour (cosine) among the first 60 held-out
/// pictures is of the same shape for at least 90 % of them (models/train_embedder.py measured 97.5 % on all 200).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bundled_embedder_groups_shapes() {
    let mut s = Server::start(bundled_config()).await;
    let boxes: Value = serde_json::from_slice(&std::fs::read(root().join("tests/data/shapes/boxes.json")).unwrap()).unwrap();
    let label = |i: usize| -> String {
        let entry = &boxes[i];
        assert_eq!(entry["file"].as_str(), Some(format!("{i:03}.jpg").as_str()));
        entry["label"].as_str().unwrap().to_string()
    };
    let mut vectors = Vec::new();
    for i in 0..60 {
        let pic = std::fs::read(root().join(format!("tests/data/shapes/{i:03}.jpg"))).unwrap();
        let body: Value = s.client.post(s.url("/v1/models/embedder/predict")).header("content-type", "image/jpeg").body(pic).send().await.unwrap().json().await.unwrap();
        vectors.push(vector(&body["embedding"]));
    }
    let hits = (0..60)
        .filter(|&i| {
            let nearest = (0..60).filter(|&j| j != i).max_by(|&a, &b| cosine(&vectors[i], &vectors[a]).total_cmp(&cosine(&vectors[i], &vectors[b]))).unwrap();
            label(nearest) == label(i)
        })
        .count();
    eprintln!("recall@1 over 60 held-out pictures: {hits}/60");
    assert!(hits >= 54, "recall@1 {hits}/60");
    s.stop().await.unwrap();
}

/// `camserve inspect` says what it recognised; `camserve explain --reference` writes both images' maps.
#[test]
fn inspect_and_explain_on_the_command_line() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_camserve")).arg("inspect").arg(root().join("models/shapes_embedder.onnx")).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("task: embedding (64-dimensional vectors"), "{text}");
    let tmp = std::env::temp_dir().join(format!("camserve-emb-{}", std::process::id()));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_camserve"))
        .args(["explain", "--model", "embedder", "--image"])
        .arg(root().join("tests/data/shapes/000.jpg"))
        .arg("--reference")
        .arg(root().join("tests/data/shapes/001.jpg"))
        .arg("--out")
        .arg(&tmp)
        .current_dir(root())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(tmp.join("gradcam_query_overlay.png").exists() && tmp.join("gradcam_ref0_overlay.png").exists());
    let json: Value = serde_json::from_slice(&std::fs::read(tmp.join("explanation.json")).unwrap()).unwrap();
    assert!(json["similarity"].as_f64().is_some(), "{json}");
    std::fs::remove_dir_all(&tmp).unwrap();
}
