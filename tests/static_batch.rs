//! Transformers exported the way people export them without reading the docs (issue 28):
//! `torch.onnx.export(model, (torch.randn(1, 3, H, W),), path, dynamo=True)` with no `dynamic_shapes`, which fixes
//! the batch at 1. Tiny timm ViT, DeiT (distilled), Swin and ConvNeXt with random weights (tests/fixtures/static_batch,
//! made by make_static_batch_fixtures.py). Their graphs bake the batch of 1 into Reshapes and constants, slice the
//! packed q, k, v along an axis 0 of size 3, and (ConvNeXt's head) flatten the batch away and Gather along axis 0.
//! Before, the rewrite refused ViT and ConvNeXt there ("indexing along axis 0, the batch axis").
//!
//! Criteria, fixed before the first measurement: each model is served with `max_batch` 1; two images sent in one
//! OIP request (a batch of 2, run as two rows of one) get logits within 1e-4 of float64 PyTorch (relative to the
//! largest), Grad-CAM at the default layer (pytorch-grad-cam's layer for each family: `blocks[-1].norm1`, the last
//! Swin block's `norm1`, ConvNeXt's last stage) and the input gradient within 1e-4 of pytorch-grad-cam and
//! torch.autograd in float64 (max |a - b| / max |b|).

#[path = "support/server.rs"]
mod server;

use ndarray::ArrayD;
use ndarray_npy::NpzReader;
use serde_json::Value;
use server::*;

fn dir() -> std::path::PathBuf {
    root().join("tests/fixtures/static_batch")
}

fn rel(a: &[f64], b: &[f64]) -> f64 {
    let scale = b.iter().map(|v| v.abs()).fold(0.0, f64::max).max(1e-30);
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max) / scale
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_exports_with_a_static_batch_are_explained_exactly() {
    let spec: Value = serde_json::from_slice(&std::fs::read(dir().join("references.json")).unwrap()).unwrap();
    let mut z = NpzReader::new(std::fs::File::open(dir().join("references.npz")).unwrap()).unwrap();
    let mut rows = Vec::new();
    for name in ["vit", "deit", "swin", "convnext"] {
        let m = &spec["models"][name];
        let mut c = demo_config();
        c.models = vec![camserve::config::ModelConfig::new(name, dir().join(m["onnx"].as_str().unwrap()))];
        let mut s = Server::start(c).await;
        let view: Value = s.client.get(s.url(&format!("/v1/models/{name}"))).send().await.unwrap().json().await.unwrap();
        check_response("/v1/models/{model}", "get", 200, "application/json", &view);
        assert_eq!(view["max_batch"], 1, "{name}: {view}");
        assert_eq!(view["default_layer"], m["layer"]["onnx_tensor"], "{name}: the layer pytorch-grad-cam's tutorials use");
        let inputs: Vec<ArrayD<f32>> = (0..2).map(|k| z.by_name(&format!("{name}_input_{k}.npy")).unwrap()).collect();
        let shape = inputs[0].shape().to_vec();
        let data: Vec<f32> = inputs.iter().flat_map(|x| x.iter().copied()).collect();
        let targets: Vec<u64> = m["targets"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        let req = serde_json::json!({
            "inputs": [{ "name": "x", "datatype": "FP32", "shape": [2, shape[1], shape[2], shape[3]], "data": data }],
            "parameters": { "methods": ["gradcam", "saliency"], "target": targets },
            "outputs": [{ "name": "logits" }, { "name": "gradcam" }, { "name": "saliency" }],
        });
        let res = s.client.post(s.url(&format!("/v2/models/{name}/infer"))).json(&req).send().await.unwrap();
        let status = res.status().as_u16();
        let res: Value = res.json().await.unwrap();
        assert_eq!(status, 200, "{name}: {res}");
        check_response("/v2/models/{model}/infer", "post", 200, "application/json", &res);
        let out = |o: &str| -> Vec<f64> {
            res["outputs"].as_array().unwrap().iter().find(|x| x["name"] == o).unwrap_or_else(|| panic!("{name}: no {o}"))["data"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect()
        };
        let (logits, cam, grad) = (out("logits"), out("gradcam"), out("saliency"));
        for k in 0..2 {
            let per = |v: &[f64]| v.len() / 2;
            let want_logits: ArrayD<f64> = z.by_name(&format!("{name}_logits_{k}.npy")).unwrap();
            let want_cam: ArrayD<f64> = z.by_name(&format!("{name}_gradcam_{k}.npy")).unwrap();
            let want_grad: ArrayD<f64> = z.by_name(&format!("{name}_input_grad_{k}.npy")).unwrap();
            for (what, got, want) in [("logits", &logits, want_logits), ("Grad-CAM", &cam, want_cam), ("input gradient", &grad, want_grad)] {
                let n = per(got);
                let want: Vec<f64> = want.iter().copied().collect();
                assert_eq!(n, want.len(), "{name} {what}: size");
                let err = rel(&got[k * n..(k + 1) * n], &want);
                rows.push(format!("{name} image {k} {what}: {err:.2e}"));
                assert!(err <= 1e-4, "{name} image {k} {what}: {err:.3e} vs float64\n{}", rows.join("\n"));
            }
        }
        s.stop().await.unwrap();
    }
    println!("{}", rows.join("\n"));
    assert_eq!(rows.len(), 24);
}
