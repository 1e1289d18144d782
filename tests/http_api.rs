//! The HTTP API end to end: a real server on 127.0.0.1:0, a real HTTP client, every request form, method,
//! output kind and error of docs/DESIGN.md §5, each response checked against openapi.yaml.

#[path = "support/server.rs"]
mod server;

use base64::Engine as _;
use reqwest::multipart::{Form, Part};
use serde_json::{json, Value};
use server::*;

const EXPLAIN: &str = "/v1/models/{model}/explain";
const PREDICT: &str = "/v1/models/{model}/predict";

async fn json_of(r: reqwest::Response, path: &str, method: &str) -> (u16, Value) {
    let status = r.status().as_u16();
    let ct = r.headers().get("content-type").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    let body: Value = r.json().await.unwrap();
    check_response(path, method, status, &ct, &body);
    if status >= 400 {
        assert_eq!(ct, "application/problem+json", "errors are problem+json");
        assert_eq!(body["status"], status);
    }
    (status, body)
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn png_dims(b64png: &str) -> (u32, u32) {
    let bytes = base64::engine::general_purpose::STANDARD.decode(b64png).unwrap();
    let img = image::load_from_memory_with_format(&bytes, image::ImageFormat::Png).unwrap();
    (img.width(), img.height())
}

#[tokio::test]
async fn service_routes() {
    let mut s = Server::start(demo_config()).await;
    let (st, body) = json_of(s.client.get(s.url("/healthz")).send().await.unwrap(), "/healthz", "get").await;
    assert_eq!((st, body["status"].as_str()), (200, Some("ok")));
    let (st, _) = json_of(s.client.get(s.url("/readyz")).send().await.unwrap(), "/readyz", "get").await;
    assert_eq!(st, 200);
    let yaml = s.client.get(s.url("/openapi.yaml")).send().await.unwrap().text().await.unwrap();
    assert_eq!(yaml, std::fs::read_to_string(root().join("openapi.yaml")).unwrap());
    let page = s.client.get(s.url("/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.headers()["content-type"].to_str().unwrap().starts_with("text/html"));

    let (st, body) = json_of(s.client.get(s.url("/v1/models")).send().await.unwrap(), "/v1/models", "get").await;
    assert_eq!(st, 200);
    let m = &body["models"][0];
    // The catalogue the page builds its method list from: every method of the registry, with its kind, how its
    // heatmap shows and whether it is a default.
    assert_eq!(body["methods"][0], json!({"name": "gradcam", "kind": "cam", "heatmap": "map", "default": true}));
    assert_eq!(body["methods"][6], json!({"name": "guided_backprop", "kind": "gradient", "heatmap": "gradient_image", "default": false}));
    assert_eq!(body["methods"][9]["default"], true, "guided_gradcam");
    assert_eq!(body["methods"][16], json!({"name": "integrated_gradients", "kind": "gradient", "heatmap": "summed_magnitude", "default": false}));
    assert_eq!(body["methods"].as_array().unwrap().len(), camserve::methods::Method::ALL.len());
    assert_eq!(m["name"], "demo");
    assert_eq!(m["input_shape"], json!([3, 64, 64]));
    assert_eq!(m["classes"], 6);
    assert_eq!(m["labels"], true);
    assert_eq!(m["device"], "cpu");
    // Every method but the two attention rollouts, D-RISE (a detector's) and ViT ReciproCAM (a transformer's): the
    // demo CNN ends in global average pooling and a linear layer.
    assert_eq!(m["methods"].as_array().unwrap().len(), 18);
    // Each offered method's time estimate, from the passes measured at warm-up: positive, and ordered as the costs
    // (Score-CAM 64 channels' forwards, RISE 4,000); the methods that run the part after the layer (Ablation-CAM,
    // ReciproCAM) have theirs from the head pass warmed at load.
    let est = m["estimates"].as_object().unwrap();
    assert_eq!(est.len(), 18, "{est:?}");
    assert!(est["ablationcam"].as_f64().is_some_and(|t| t > 0.0) && est["reciprocam"].as_f64().is_some_and(|t| t > 0.0), "{est:?}");
    let secs = |k: &str| est[k].as_f64().unwrap();
    assert!(secs("gradcam") > 0.0 && secs("gradcam") < secs("scorecam") && secs("scorecam") < secs("rise"), "{est:?}");
    // The four it does not offer, each with the reason the page shows.
    let why = m["unavailable"].as_object().unwrap();
    assert_eq!(why.keys().collect::<Vec<_>>(), ["attention_rollout", "drise", "gradient_rollout", "vit_reciprocam"]);
    assert!(why["vit_reciprocam"].as_str().unwrap().contains("not a transformer's token layer"), "{why:?}");
    assert!(why["drise"].as_str().unwrap().contains("detection"), "{why:?}");
    assert!(why["attention_rollout"].as_str().unwrap().contains("has no attention blocks"), "{why:?}");
    assert!(m["layers"].as_array().unwrap().iter().any(|l| l["name"] == m["default_layer"]));
    let (st, one) = json_of(s.client.get(s.url("/v1/models/demo")).send().await.unwrap(), "/v1/models/{model}", "get").await;
    assert_eq!((st, &one), (200, m));
    let (st, _) = json_of(s.client.get(s.url("/v1/models/nope")).send().await.unwrap(), "/v1/models/{model}", "get").await;
    assert_eq!(st, 404);

    // Some traffic, then the metrics show it.
    let _ = s.client.post(s.url("/v1/models/demo/predict")).header("content-type", "image/jpeg").body(image_bytes("000.jpg")).send().await.unwrap();
    let metrics = s.client.get(s.url("/metrics")).send().await.unwrap().text().await.unwrap();
    for name in ["camserve_http_requests_total", "camserve_inference_duration_seconds", "camserve_batch_rows"] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
    s.stop().await.unwrap();
}

#[tokio::test]
async fn three_request_forms_agree() {
    let mut s = Server::start(demo_config()).await;
    let img = image_bytes("001.jpg");
    let url = s.url("/v1/models/demo/explain");
    // multipart, options as text parts
    let form = Form::new().part("image", Part::bytes(img.clone()).file_name("001.jpg").mime_str("image/jpeg").unwrap())
        .text("methods", "gradcam,guided_gradcam").text("outputs", "raw");
    let (st, a) = json_of(s.client.post(&url).multipart(form).send().await.unwrap(), EXPLAIN, "post").await;
    assert_eq!(st, 200, "{a}");
    // multipart, options as one JSON part
    let form = Form::new().part("image", Part::bytes(img.clone()).file_name("x.jpg"))
        .text("options", json!({"methods": ["gradcam", "guided_gradcam"], "outputs": ["raw"]}).to_string());
    let (_, b) = json_of(s.client.post(&url).multipart(form).send().await.unwrap(), EXPLAIN, "post").await;
    // JSON with base64
    let body = json!({"image": b64(&img), "methods": ["gradcam", "guided_gradcam"], "outputs": "raw"});
    let (_, c) = json_of(s.client.post(&url).json(&body).send().await.unwrap(), EXPLAIN, "post").await;
    // raw body, options in the query string
    let r = s.client.post(format!("{url}?methods=gradcam,guided_gradcam&outputs=raw")).header("content-type", "image/jpeg").body(img.clone()).send().await.unwrap();
    let (_, d) = json_of(r, EXPLAIN, "post").await;
    for other in [&b, &c, &d] {
        assert_eq!(a["predictions"], other["predictions"]);
        for (x, y) in a["explanations"].as_array().unwrap().iter().zip(other["explanations"].as_array().unwrap()) {
            assert_eq!(x["raw"], y["raw"]);
            assert_eq!(x["peak"], y["peak"]);
        }
    }
    assert_eq!(a["model"], "demo");
    assert_eq!(a["image"], json!({"width": 64, "height": 64}));
    assert_eq!(a["predictions"].as_array().unwrap().len(), 5, "top max(5, top_k)");
    let ex = a["explanations"].as_array().unwrap();
    assert_eq!(ex.len(), 2);
    assert_eq!(ex[0]["method"], "gradcam");
    assert_eq!(ex[0]["raw"]["shape"], json!([16, 16]));
    assert_eq!(ex[1]["raw"]["shape"], json!([3, 64, 64]));
    assert_eq!(ex[0]["target"]["index"], a["predictions"][0]["index"], "default target: the top prediction");
    s.stop().await.unwrap();
}

#[tokio::test]
async fn every_method_and_output() {
    let mut s = Server::start(demo_config()).await;
    let methods = ["gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "eigencam", "guided_backprop", "deconvnet", "saliency", "guided_gradcam"];
    let body = json!({"image": b64(&image_bytes("002.jpg")), "methods": methods, "outputs": ["heatmap", "overlay", "mask", "raw"], "colormap": "turbo", "alpha": 0.3});
    let (st, r) = json_of(s.client.post(s.url("/v1/models/demo/explain")).json(&body).send().await.unwrap(), EXPLAIN, "post").await;
    assert_eq!(st, 200, "{r}");
    let ex = r["explanations"].as_array().unwrap();
    assert_eq!(ex.len(), methods.len());
    for (e, m) in ex.iter().zip(methods) {
        assert_eq!(e["method"], m);
        for k in ["heatmap_png", "overlay_png", "mask_png"] {
            assert_eq!(png_dims(e[k].as_str().unwrap()), (64, 64), "{m} {k}");
        }
        let raw = &e["raw"];
        let n: usize = raw["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).product();
        let data = base64::engine::general_purpose::STANDARD.decode(raw["data"].as_str().unwrap()).unwrap();
        assert_eq!(data.len(), n * 4, "{m}: raw data length");
        let values: Vec<f32> = data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        assert!(values.iter().all(|v| v.is_finite()));
        assert!(values.iter().any(|&v| v != 0.0), "{m}: all-zero raw map");
        let cam = !matches!(m, "guided_backprop" | "deconvnet" | "saliency" | "guided_gradcam");
        if cam && m != "eigencam" {
            assert!(values.iter().all(|&v| v >= 0.0), "{m}: CAM raw maps are after the method's ReLU");
        }
        assert_eq!(raw["shape"], if cam { json!([16, 16]) } else { json!([3, 64, 64]) });
        assert_eq!(e.get("layer").is_some(), cam || m == "guided_gradcam");
        let p = &e["peak"];
        assert!(p["x"].as_u64().unwrap() < 64 && p["y"].as_u64().unwrap() < 64);
        let b = &e["bbox"];
        assert!(b["x"].as_u64().unwrap() + b["width"].as_u64().unwrap() <= 64);
    }
    // predict: no explanations
    let r = s.client.post(s.url("/v1/models/demo/predict")).header("content-type", "image/jpeg").body(image_bytes("002.jpg")).send().await.unwrap();
    let (st, p) = json_of(r, PREDICT, "post").await;
    assert_eq!(st, 200);
    assert!(p.get("explanations").is_none());
    assert_eq!(p["predictions"], r_predictions(&r_body(&s, "002.jpg").await));
    s.stop().await.unwrap();
}

async fn r_body(s: &Server, name: &str) -> Value {
    let r = s.client.post(s.url("/v1/models/demo/explain?methods=gradcam&outputs=raw")).header("content-type", "image/jpeg").body(image_bytes(name)).send().await.unwrap();
    r.json().await.unwrap()
}

fn r_predictions(v: &Value) -> Value {
    v["predictions"].clone()
}

#[tokio::test]
async fn targets_top_k_and_sizes() {
    let mut s = Server::start(demo_config()).await;
    let url = s.url("/v1/models/demo/explain");
    let img = image_bytes("003.jpg");
    // top_k = 3: three targets per method, in prediction order, from one batched run
    let (st, r) = json_of(s.client.post(format!("{url}?top_k=3&methods=gradcam,saliency&outputs=raw")).header("content-type", "image/jpeg").body(img.clone()).send().await.unwrap(), EXPLAIN, "post").await;
    assert_eq!(st, 200);
    let ex = r["explanations"].as_array().unwrap();
    assert_eq!(ex.len(), 6);
    for k in 0..3 {
        assert_eq!(ex[2 * k]["target"]["index"], r["predictions"][k]["index"]);
        assert_eq!(ex[2 * k]["target"]["score"], r["predictions"][k]["score"]);
        assert_eq!(ex[2 * k + 1]["target"]["index"], r["predictions"][k]["index"]);
    }
    // explicit targets by label and index, the same as top-k rows
    let second = r["predictions"][1]["label"].as_str().unwrap().to_string();
    let idx = r["predictions"][2]["index"].as_u64().unwrap();
    let (st, t) = json_of(
        s.client.post(&url).json(&json!({"image": b64(&img), "target": [second, idx], "methods": "gradcam,saliency", "outputs": "raw"})).send().await.unwrap(),
        EXPLAIN, "post").await;
    assert_eq!(st, 200);
    let tex = t["explanations"].as_array().unwrap();
    assert_eq!(tex.len(), 4);
    assert_eq!(tex[0]["raw"], ex[2]["raw"], "target by label = the rank-2 row");
    assert_eq!(tex[2]["raw"], ex[4]["raw"], "target by index = the rank-3 row");
    // size=original with a larger upload: maps at the upload's size
    let big = image::load_from_memory(&img).unwrap().resize_exact(150, 100, image::imageops::FilterType::Triangle);
    let mut png = std::io::Cursor::new(Vec::new());
    big.write_to(&mut png, image::ImageFormat::Png).unwrap();
    let r = s.client.post(format!("{url}?size=original&methods=gradcam,guided_backprop&outputs=heatmap,overlay,mask")).header("content-type", "image/png").body(png.into_inner()).send().await.unwrap();
    let (st, o) = json_of(r, EXPLAIN, "post").await;
    assert_eq!(st, 200);
    assert_eq!(o["image"], json!({"width": 150, "height": 100}));
    for e in o["explanations"].as_array().unwrap() {
        for k in ["heatmap_png", "overlay_png", "mask_png"] {
            assert_eq!(png_dims(e[k].as_str().unwrap()), (150, 100));
        }
        assert!(e["peak"]["x"].as_u64().unwrap() < 150);
    }
    s.stop().await.unwrap();
}

#[tokio::test]
async fn image_formats_and_orientation() {
    let mut s = Server::start(demo_config()).await;
    let src = image::load_from_memory(&image_bytes("004.jpg")).unwrap();
    let url = s.url("/v1/models/demo/predict");
    let mut reference = None;
    for (fmt, mime) in [
        (image::ImageFormat::Png, "image/png"),
        (image::ImageFormat::Bmp, "image/bmp"),
        (image::ImageFormat::Tiff, "image/tiff"),
        (image::ImageFormat::WebP, "image/webp"),
        (image::ImageFormat::Gif, "image/gif"),
    ] {
        let img = if fmt == image::ImageFormat::Gif { image::DynamicImage::ImageRgba8(src.to_rgba8()) } else { src.clone() };
        let mut buf = std::io::Cursor::new(Vec::new());
        img.write_to(&mut buf, fmt).unwrap();
        let (st, r) = json_of(s.client.post(&url).header("content-type", mime).body(buf.into_inner()).send().await.unwrap(), PREDICT, "post").await;
        assert_eq!(st, 200, "{mime}: {r}");
        if fmt != image::ImageFormat::Gif {
            // Lossless formats decode to the same pixels, hence the same prediction.
            let top = r["predictions"][0]["index"].clone();
            assert_eq!(reference.get_or_insert(top.clone()), &top, "{mime}");
        }
    }
    // greyscale and RGBA are converted to RGB
    for img in [image::DynamicImage::ImageLuma8(src.to_luma8()), image::DynamicImage::ImageRgba8(src.to_rgba8())] {
        let mut buf = std::io::Cursor::new(Vec::new());
        img.write_to(&mut buf, image::ImageFormat::Png).unwrap();
        let (st, _) = json_of(s.client.post(&url).header("content-type", "image/png").body(buf.into_inner()).send().await.unwrap(), PREDICT, "post").await;
        assert_eq!(st, 200);
    }
    s.stop().await.unwrap();
}

/// A JPEG with an EXIF orientation tag (6 = rotate 90 degrees clockwise) made from a 48x32 picture.
fn jpeg_with_orientation(orientation: u16) -> Vec<u8> {
    let img = image::RgbImage::from_fn(48, 32, |x, _| if x < 24 { image::Rgb([250, 10, 10]) } else { image::Rgb([10, 10, 250]) });
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 95).encode_image(&img).unwrap();
    // APP1 Exif segment: "Exif\0\0" + a little-endian TIFF header with one IFD entry (Orientation).
    let mut tiff = vec![b'I', b'I', 42, 0, 8, 0, 0, 0, 1, 0];
    tiff.extend_from_slice(&0x0112u16.to_le_bytes());
    tiff.extend_from_slice(&3u16.to_le_bytes());
    tiff.extend_from_slice(&1u32.to_le_bytes());
    tiff.extend_from_slice(&orientation.to_le_bytes());
    tiff.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    let mut app1 = b"Exif\0\0".to_vec();
    app1.extend(tiff);
    let mut out = vec![0xFF, 0xD8, 0xFF, 0xE1];
    out.extend_from_slice(&((app1.len() + 2) as u16).to_be_bytes());
    out.extend(app1);
    out.extend_from_slice(&jpeg[2..]);
    out
}

#[tokio::test]
async fn exif_orientation_is_honoured() {
    let mut s = Server::start(demo_config()).await;
    let r = s.client.post(s.url("/v1/models/demo/predict")).header("content-type", "image/jpeg").body(jpeg_with_orientation(6)).send().await.unwrap();
    let (st, body) = json_of(r, PREDICT, "post").await;
    assert_eq!(st, 200);
    assert_eq!(body["image"], json!({"width": 32, "height": 48}), "rotated by the EXIF orientation");
    let r = s.client.post(s.url("/v1/models/demo/predict")).header("content-type", "image/jpeg").body(jpeg_with_orientation(1)).send().await.unwrap();
    let (_, body) = json_of(r, PREDICT, "post").await;
    assert_eq!(body["image"], json!({"width": 48, "height": 32}));
    s.stop().await.unwrap();
}

#[tokio::test]
async fn errors_are_problems_with_the_right_status() {
    let mut config = demo_config();
    config.server.body_limit_bytes = 200_000;
    config.server.max_image_pixels = 100_000;
    let mut s = Server::start(config).await;
    let url = s.url("/v1/models/demo/explain");
    let jpg = image_bytes("005.jpg");
    let big_png = {
        let img = image::RgbImage::from_pixel(400, 300, image::Rgb([1, 2, 3]));
        let mut b = std::io::Cursor::new(Vec::new());
        img.write_to(&mut b, image::ImageFormat::Png).unwrap();
        b.into_inner()
    };
    let cases: Vec<(&str, reqwest::RequestBuilder, u16, &str)> = vec![
        ("garbage", s.client.post(&url).header("content-type", "image/jpeg").body(&b"definitely not an image"[..]), 400, "not an image"),
        ("truncated", s.client.post(&url).header("content-type", "image/jpeg").body(jpg[..jpg.len() / 2].to_vec()), 400, "cannot be decoded"),
        ("empty", s.client.post(&url).header("content-type", "image/jpeg").body(Vec::<u8>::new()), 400, "empty"),
        ("media type", s.client.post(&url).header("content-type", "text/plain").body(jpg.clone()), 415, "text/plain"),
        ("no media type", s.client.post(&url).body(jpg.clone()), 415, "Content-Type"),
        ("body limit", s.client.post(&url).header("content-type", "image/jpeg").body(vec![0u8; 300_000]), 413, "larger than"),
        ("pixel limit", s.client.post(&url).header("content-type", "image/png").body(big_png), 413, "over the limit"),
        ("bad base64", s.client.post(&url).json(&json!({"image": "%%%not base64%%%"})), 400, "base64"),
        ("json without image", s.client.post(&url).json(&json!({"methods": "gradcam"})), 400, "no `image`"),
        ("malformed json", s.client.post(&url).header("content-type", "application/json").body("{\"image\": "), 400, "not valid JSON"),
        ("multipart without image", s.client.post(&url).multipart(Form::new().text("methods", "gradcam")), 400, "no `image` part"),
        ("unknown model", s.client.post(s.url("/v1/models/nope/explain")).header("content-type", "image/jpeg").body(jpg.clone()), 404, "nope"),
        ("unknown method", s.client.post(format!("{url}?methods=gradcam,magic")).header("content-type", "image/jpeg").body(jpg.clone()), 422, "magic"),
        ("unknown layer", s.client.post(format!("{url}?layer=conv99")).header("content-type", "image/jpeg").body(jpg.clone()), 422, "conv99"),
        ("class index", s.client.post(format!("{url}?target=6")).header("content-type", "image/jpeg").body(jpg.clone()), 422, "out of range"),
        ("negative class", s.client.post(format!("{url}?target=-1")).header("content-type", "image/jpeg").body(jpg.clone()), 422, "out of range"),
        ("class label", s.client.post(format!("{url}?target=dodecahedron")).header("content-type", "image/jpeg").body(jpg.clone()), 422, "dodecahedron"),
        ("alpha", s.client.post(format!("{url}?alpha=2")).header("content-type", "image/jpeg").body(jpg.clone()), 422, "alpha"),
        ("alpha nan", s.client.post(format!("{url}?alpha=NaN")).header("content-type", "image/jpeg").body(jpg.clone()), 422, "alpha"),
        ("top_k 0", s.client.post(format!("{url}?top_k=0")).header("content-type", "image/jpeg").body(jpg.clone()), 422, "top_k"),
        ("top_k huge", s.client.post(format!("{url}?top_k=100000")).header("content-type", "image/jpeg").body(jpg.clone()), 422, "top_k"),
        ("top_k text", s.client.post(format!("{url}?top_k=three")).header("content-type", "image/jpeg").body(jpg.clone()), 422, "top_k"),
        ("size", s.client.post(format!("{url}?size=huge")).header("content-type", "image/jpeg").body(jpg.clone()), 422, "size"),
        ("colormap", s.client.post(format!("{url}?colormap=rainbow")).header("content-type", "image/jpeg").body(jpg.clone()), 422, "rainbow"),
        ("outputs", s.client.post(format!("{url}?outputs=svg")).header("content-type", "image/jpeg").body(jpg.clone()), 422, "svg"),
        ("unknown option", s.client.post(format!("{url}?colour=red")).header("content-type", "image/jpeg").body(jpg.clone()), 422, "colour"),
        ("target and top_k", s.client.post(format!("{url}?target=1&top_k=2")).header("content-type", "image/jpeg").body(jpg.clone()), 422, "not both"),
        ("json option types", s.client.post(&url).json(&json!({"image": b64(&jpg), "top_k": 1.5})), 422, "top_k"),
        ("negative top_k", s.client.post(&url).json(&json!({"image": b64(&jpg), "top_k": -3})), 422, "top_k"),
        ("deeply nested json", s.client.post(&url).header("content-type", "application/json")
            .body(format!("{}{}", "[".repeat(5000), "]".repeat(5000))), 400, "must be a JSON object"),
        ("deeply nested option", s.client.post(&url).header("content-type", "application/json")
            .body(format!("{{\"image\": \"\", \"alpha\": {}{}}}", "[".repeat(5000), "]".repeat(5000))), 400, "option `alpha` is not valid JSON"),
        ("non-finite number", s.client.post(&url).header("content-type", "application/json")
            .body(format!("{{\"image\": \"{}\", \"alpha\": 1e999}}", b64(&jpg))), 400, "not valid JSON"),
        ("NaN in json", s.client.post(&url).header("content-type", "application/json").body("{\"image\": \"\", \"alpha\": NaN}"), 400, "not valid JSON"),
        ("unknown method among many", s.client.post(&url).json(&json!({"image": b64(&jpg), "methods": ["gradcam", "gradcam++", "xgradcam",
            "hirescam", "layercam", "eigencam", "guided_backprop", "deconvnet", "saliency", "guided_gradcam", "nope"]})), 422, "nope"),
        ("too many targets", s.client.post(&url).json(&json!({"image": b64(&jpg), "target": vec![1; 11]})), 422, "11 targets"),
        ("image not a string", s.client.post(&url).json(&json!({"image": 42})), 400, "base64 string"),
        ("json array body", s.client.post(&url).json(&json!([1, 2])), 400, "must be a JSON object"),
        ("options part not json", s.client.post(&url).multipart(Form::new().part("image", Part::bytes(jpg.clone())).text("options", "{nope")), 400, "`options` part is not valid JSON"),
        ("two image parts", s.client.post(&url).multipart(Form::new().part("image", Part::bytes(jpg.clone())).part("image", Part::bytes(jpg.clone()))), 400, "more than one"),
        ("zero bytes image", s.client.post(&url).header("content-type", "image/png").body(vec![0u8; 1000]), 400, "not an image"),
    ];
    for (name, req, status, needle) in cases {
        let r = req.send().await.unwrap();
        let (st, body) = json_of(r, EXPLAIN, "post").await;
        assert_eq!(st, status, "{name}: {body}");
        assert!(body["detail"].as_str().unwrap().contains(needle), "{name}: `{needle}` not in {body}");
    }
    // Unknown routes are problems too, and the server still answers.
    let r = s.client.get(s.url("/v2/nothing")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    // So is a known route with the wrong method: 405 with problem details and the Allow header.
    for (req, allow) in [(s.client.get(&url), "POST"), (s.client.delete(s.url("/v1/models")), "GET")] {
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 405);
        assert_eq!(r.headers()["content-type"], "application/problem+json");
        assert!(r.headers()["allow"].to_str().unwrap().contains(allow), "{:?}", r.headers());
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["status"], 405);
        assert_eq!(body["type"], "urn:camserve:problem:method-not-allowed");
        assert!(body["detail"].as_str().unwrap().contains("not allowed"), "{body}");
    }
    let (st, _) = json_of(s.client.post(&url).header("content-type", "image/jpeg").body(jpg).send().await.unwrap(), EXPLAIN, "post").await;
    assert_eq!(st, 200);
    s.stop().await.unwrap();
}

#[tokio::test]
async fn queue_full_and_timeout() {
    let mut config = demo_config();
    config.batching.queue_capacity = 1;
    let mut s = Server::start(config).await;
    // Two target rows cannot fit a queue of one row: refused at once with Retry-After.
    let r = s.client.post(s.url("/v1/models/demo/explain?top_k=2")).header("content-type", "image/jpeg").body(image_bytes("006.jpg")).send().await.unwrap();
    assert_eq!(r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string()), Some("1".into()));
    let (st, _) = json_of(r, EXPLAIN, "post").await;
    assert_eq!(st, 429);
    s.stop().await.unwrap();

    // A lone request waits 500 ms for batch company, past its 50 ms timeout: 504.
    let mut config = demo_config();
    config.server.request_timeout_ms = 50;
    config.batching.max_wait_ms = 500;
    let mut s = Server::start(config).await;
    let r = s.client.post(s.url("/v1/models/demo/explain")).header("content-type", "image/jpeg").body(image_bytes("006.jpg")).send().await.unwrap();
    let (st, _) = json_of(r, EXPLAIN, "post").await;
    assert_eq!(st, 504);
    s.stop().await.unwrap();
}

/// A client that sends its headers and then trickles (here: stops sending) its body gets 408 after
/// `server.body_timeout_ms`, and the server keeps answering others meanwhile and afterwards.
#[tokio::test]
async fn slow_bodies_get_408() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut config = demo_config();
    config.server.body_timeout_ms = 300;
    let mut s = Server::start(config).await;
    let mut conn = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let head = "POST /v1/models/demo/explain HTTP/1.1\r\nHost: camserve\r\nContent-Type: image/jpeg\r\nContent-Length: 100000\r\n\r\n";
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(&image_bytes("006.jpg")[..100]).await.unwrap();
    // Another client is served while this one stalls.
    let r = s.client.post(s.url("/v1/models/demo/predict")).header("content-type", "image/jpeg").body(image_bytes("006.jpg")).send().await.unwrap();
    assert_eq!(r.status(), 200);

    let mut buf = Vec::new();
    let response = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            let mut chunk = [0u8; 4096];
            let n = conn.read(&mut chunk).await.unwrap();
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf).to_string();
            if let Some(end) = text.find("\r\n\r\n") {
                let length: usize = text[..end]
                    .lines()
                    .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
                    .unwrap();
                if buf.len() >= end + 4 + length || n == 0 {
                    return (text[..end].to_string(), text[end + 4..].to_string());
                }
            }
            assert!(n > 0, "connection closed without a response");
        }
    })
    .await
    .expect("no answer to a stalled body");
    let (head, body) = response;
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    assert!(head.to_ascii_lowercase().contains("content-type: application/problem+json"), "{head}");
    let body: Value = serde_json::from_str(&body).unwrap();
    check_response(EXPLAIN, "post", 408, "application/problem+json", &body);
    assert!(body["detail"].as_str().unwrap().contains("300 ms"), "{body}");

    let r = s.client.get(s.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    s.stop().await.unwrap();
}

/// A client that opens a connection and never finishes its headers (slowloris) is cut off after
/// `server.header_timeout_ms`; others are served meanwhile.
#[tokio::test]
async fn unfinished_headers_are_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut config = demo_config();
    config.server.header_timeout_ms = 300;
    let mut s = Server::start(config).await;
    let mut conn = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    conn.write_all(b"POST /v1/models/demo/explain HTTP/1.1\r\nHost: camserve\r\nX-Slow: ").await.unwrap();
    let r = s.client.post(s.url("/v1/models/demo/predict")).header("content-type", "image/jpeg").body(image_bytes("006.jpg")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the connection with unfinished headers was kept open");
    // A new client: the shared one's pooled connection has been idle past the same limit, and the server closes
    // idle keep-alive connections too (reusing one would race that close).
    let r = reqwest::Client::new().get(s.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    s.stop().await.unwrap();
}

#[tokio::test]
async fn api_keys_and_cors() {
    let mut config = demo_config();
    config.server.api_keys = vec!["s3cret-key".to_string()].into();
    config.server.open_endpoints = vec!["healthz".into(), "readyz".into()];
    config.server.cors_origins = vec!["https://app.example.com".into()];
    let mut s = Server::start(config).await;
    let url = s.url("/v1/models");
    let (st, _) = json_of(s.client.get(&url).send().await.unwrap(), "/v1/models", "get").await;
    assert_eq!(st, 401);
    let (st, _) = json_of(s.client.get(&url).bearer_auth("wrong").send().await.unwrap(), "/v1/models", "get").await;
    assert_eq!(st, 401);
    let (st, _) = json_of(s.client.get(&url).bearer_auth("s3cret-key").send().await.unwrap(), "/v1/models", "get").await;
    assert_eq!(st, 200);
    let (st, _) = json_of(s.client.get(&url).header("x-api-key", "s3cret-key").send().await.unwrap(), "/v1/models", "get").await;
    assert_eq!(st, 200);
    assert_eq!(s.client.get(s.url("/healthz")).send().await.unwrap().status(), 200, "health stays open");
    assert_eq!(s.client.get(s.url("/metrics")).send().await.unwrap().status(), 401, "metrics protected when not listed as open");
    assert_eq!(s.client.get(s.url("/metrics")).header("x-api-key", "s3cret-key").send().await.unwrap().status(), 200);
    // CORS preflight from the allowed origin, and none for another
    let pre = s.client.request(reqwest::Method::OPTIONS, s.url("/v1/models/demo/explain"))
        .header("origin", "https://app.example.com").header("access-control-request-method", "POST")
        .header("access-control-request-headers", "content-type,authorization").send().await.unwrap();
    assert!(pre.status().is_success());
    assert_eq!(pre.headers()["access-control-allow-origin"], "https://app.example.com");
    let other = s.client.request(reqwest::Method::OPTIONS, s.url("/v1/models/demo/explain"))
        .header("origin", "https://evil.example.com").header("access-control-request-method", "POST").send().await.unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());
    s.stop().await.unwrap();
}

#[tokio::test]
async fn explain_cli_writes_json_and_pngs() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_camserve"))
        .args(["explain", "--method", "gradcam", "--method", "guided_backprop", "--outputs", "heatmap,mask,raw"])
        .arg("--model").arg(root().join("models/demo.onnx"))
        .arg("--labels").arg(root().join("models/demo.labels.txt"))
        .arg("--image").arg(root().join("tests/data/shapes/007.jpg"))
        .arg("--out").arg(dir.path())
        .output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("explanation.json")).unwrap()).unwrap();
    check_response(EXPLAIN, "post", 200, "application/json", &json);
    let target = json["explanations"][0]["target"]["index"].as_u64().unwrap();
    for f in [format!("gradcam_{target}_heatmap.png"), format!("gradcam_{target}_mask.png"), format!("guided_backprop_{target}_heatmap.png")] {
        let img = image::open(dir.path().join(&f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert_eq!((img.width(), img.height()), (64, 64));
    }
}

#[tokio::test]
async fn contract_models_are_served_as_they_are() {
    use camserve::onnx::{io, rewrite::{ExplainPlan, PrepareOptions}, rules::ReluRule};
    let dir = tempfile::tempdir().unwrap();
    let ex = camserve::backend::probe::analyse(io::load_model(&root().join("models/demo.onnx")).unwrap(), &PrepareOptions::default()).unwrap();
    let layer = ex.default_layer.clone().unwrap();
    let path = dir.path().join("demo-explain.onnx");
    io::save_model(&ex.build(&ExplainPlan::new(layer.clone(), [ReluRule::Guided])).unwrap(), &path).unwrap();
    let mut config = demo_config();
    let mut contract = config.models[0].clone();
    contract.name = "contract".into();
    contract.path = path;
    config.models.push(contract);
    let mut s = Server::start(config).await;
    let (_, m) = json_of(s.client.get(s.url("/v1/models/contract")).send().await.unwrap(), "/v1/models/{model}", "get").await;
    assert_eq!(m["kind"], "contract");
    assert_eq!(m["default_layer"], json!(layer));
    // No plain input gradient (so no saliency, integrated gradients, SmoothGrad) and one graph (no head for CAM
    // or Ablation-CAM); Score-CAM and RISE run their masked inputs through that graph, Finer-CAM its seed.
    assert_eq!(
        m["methods"],
        json!(["gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "eigencam", "guided_backprop", "guided_gradcam", "scorecam", "finercam", "rise"])
    );
    assert!(m["unavailable"]["saliency"].as_str().unwrap().contains("needs the `plain` input gradient"), "{m}");
    assert!(m["unavailable"]["cam"].as_str().unwrap().contains("no separate head"), "{m}");
    let img = image_bytes("008.jpg");
    for query in ["methods=gradcam,guided_gradcam&outputs=raw&top_k=2", "methods=gradcam&outputs=raw&target=3"] {
        let mut bodies = vec![];
        for model in ["demo", "contract"] {
            let r = s.client.post(s.url(&format!("/v1/models/{model}/explain?{query}"))).header("content-type", "image/jpeg").body(img.clone()).send().await.unwrap();
            let (st, b) = json_of(r, EXPLAIN, "post").await;
            assert_eq!(st, 200, "{model}: {b}");
            bodies.push(b);
        }
        assert_eq!(bodies[0]["predictions"], bodies[1]["predictions"]);
        let (a, b) = (bodies[0]["explanations"].as_array().unwrap(), bodies[1]["explanations"].as_array().unwrap());
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert_eq!(x["target"], y["target"], "{query}");
            assert_eq!(x["peak"], y["peak"], "{query}");
        }
    }
    let r = s.client.post(s.url("/v1/models/contract/explain?methods=deconvnet")).header("content-type", "image/jpeg").body(img).send().await.unwrap();
    let (st, body) = json_of(r, EXPLAIN, "post").await;
    assert_eq!(st, 422);
    assert!(body["detail"].as_str().unwrap().contains("deconvnet"));
    s.stop().await.unwrap();
}

/// A vision transformer served as it is: token layers listed with their grid, the default layer is the last
/// block's norm1, the layer can be named by module path, and Grad-CAM comes back on the 4x4 patch grid.
#[tokio::test]
async fn vision_transformer_without_reshape_transform() {
    let mut s = Server::start(demo_and_vit_config()).await;
    let (st, m) = json_of(s.client.get(s.url("/v1/models/vit")).send().await.unwrap(), "/v1/models/{model}", "get").await;
    assert_eq!(st, 200);
    let norm1 = "/blocks/blocks.1/norm1/LayerNormalization_output_0";
    assert_eq!(m["default_layer"], norm1);
    assert_eq!(m["scores"], "logits");
    assert_eq!(m["input_layout"], "nchw");
    let layer = m["layers"].as_array().unwrap().iter().find(|l| l["name"] == norm1).unwrap().clone();
    assert_eq!(layer["layout"], "tokens");
    assert_eq!(layer["prefix_tokens"], 1);
    assert_eq!(layer["module"], "blocks.1.norm1");
    assert_eq!(layer["shape"][1], 4);
    let img = image_bytes("008.jpg");
    let mut raws = vec![];
    for layer in ["", "&layer=blocks.1.norm1"] {
        let url = s.url(&format!("/v1/models/vit/explain?methods=gradcam&outputs=raw,heatmap&target=3{layer}"));
        let r = s.client.post(url).header("content-type", "image/jpeg").body(img.clone()).send().await.unwrap();
        let (st, b) = json_of(r, EXPLAIN, "post").await;
        assert_eq!(st, 200, "{b}");
        let e = &b["explanations"][0];
        assert_eq!(e["layer"], norm1, "a module path resolves to its tensor");
        assert_eq!(e["raw"]["shape"], json!([4, 4]));
        raws.push(e["raw"]["data"].clone());
    }
    assert_eq!(raws[0], raws[1]);
    let r = s.client.post(s.url("/v1/models/vit/explain?layer=blocks.9")).header("content-type", "image/jpeg").body(img.clone()).send().await.unwrap();
    let (st, b) = json_of(r, EXPLAIN, "post").await;
    assert_eq!(st, 422, "{b}");
    // Every method the model offers (the attention ones included) in one request, within the default limit;
    // `gradcam++` unencoded in the query string (its '+' signs decode to spaces) is still Grad-CAM++.
    let all: Vec<&str> = m["methods"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert!(all.contains(&"attention_rollout") && all.contains(&"gradient_rollout"), "{all:?}");
    assert_eq!(camserve::config::Config::default().server.max_methods, camserve::methods::Method::ALL.len(), "the default limit is every method once");
    // Not plain CAM, Ablation-CAM nor ReciproCAM: a token layer has no pooling + linear head of its own, nor a head
    // that runs on it alone; not D-RISE, a detector's. ReciproCAM's transformer form is offered.
    assert_eq!(all.len(), camserve::methods::Method::ALL.len() - 4, "{all:?}");
    assert!(all.contains(&"vit_reciprocam"), "{all:?}");
    // RISE's default 4,000 masks alone would take the whole forward budget: 50 here.
    let url = s.url(&format!("/v1/models/vit/explain?methods={}&outputs=raw&rise_masks=50", all.join(",")));
    let r = s.client.post(url).header("content-type", "image/jpeg").body(img).send().await.unwrap();
    let (st, b) = json_of(r, EXPLAIN, "post").await;
    assert_eq!(st, 200, "{b}");
    let got: Vec<&str> = b["explanations"].as_array().unwrap().iter().map(|e| e["method"].as_str().unwrap()).collect();
    assert_eq!(got, all);
    s.stop().await.unwrap();
}

/// A panic inside a batch (injected through the batcher's test hook, inside the worker's protection that also
/// covers stacking the batch) answers 500 problem+json, and the same model serves the next request.
#[tokio::test]
async fn a_panic_in_a_batch_is_a_500_and_the_model_keeps_serving() {
    let mut config = demo_config();
    config.models[0].name = "panicky".into(); // the hook is per model: no other test's batches are touched
    let mut s = Server::start(config).await;
    let url = s.url("/v1/models/panicky/explain?methods=gradcam&outputs=raw");
    let img = image_bytes("010.jpg");
    camserve::backend::batcher::test_hooks::panic_next_batch("panicky");
    let r = s.client.post(&url).header("content-type", "image/jpeg").body(img.clone()).send().await.unwrap();
    let (st, body) = json_of(r, EXPLAIN, "post").await;
    assert_eq!(st, 500, "{body}");
    assert_eq!(body["type"], "urn:camserve:problem:internal", "{body}");
    assert!(!body["detail"].as_str().unwrap().contains("test hook"), "a panic message is logged, not sent: {body}");
    for _ in 0..2 {
        let r = s.client.post(&url).header("content-type", "image/jpeg").body(img.clone()).send().await.unwrap();
        let (st, body) = json_of(r, EXPLAIN, "post").await;
        assert_eq!(st, 200, "{body}");
    }
    assert_eq!(s.client.get(s.url("/readyz")).send().await.unwrap().status(), 200);
    s.stop().await.unwrap();
}

/// openapi.yaml's `Method` enum is the method registry (`Method::ALL`, `Method::as_str`), in order; so are the
/// names `GET /v1/models` lists for a model that offers every method but the rollouts.
#[test]
fn openapi_method_enum_is_the_registry() {
    use camserve::methods::Method;
    let registry: Vec<&str> = Method::ALL.iter().map(|m| m.as_str()).collect();
    let doc = openapi();
    let enumerated: Vec<&str> = doc["components"]["schemas"]["Method"]["enum"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(enumerated, registry);
    let kinds: Vec<&str> = Method::ALL.iter().map(|m| m.kind.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "cam", "cam", "cam", "cam", "cam", "cam", "gradient", "gradient", "gradient", "gradient", "attention", "attention", "cam", "cam",
            "cam", "cam", "gradient", "gradient", "cam", "cam", "cam", "cam"
        ]
    );
    for m in Method::ALL {
        assert_eq!(serde_json::to_value(m).unwrap(), json!(m.as_str()));
        assert_eq!(Method::parse(m.as_str()), Some(m));
    }
    // The README's options table and docs/METHODS.md name every method of the registry.
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let row = readme.lines().find(|l| l.starts_with("| `methods` |")).expect("README's methods row");
    let methods_md = std::fs::read_to_string(root().join("docs/METHODS.md")).unwrap();
    for m in Method::ALL {
        let quoted = format!("`{}`", m.as_str());
        assert!(row.contains(&quoted), "README's methods row lacks {quoted}");
        assert!(methods_md.contains(&format!("| {quoted} |")), "docs/METHODS.md's table lacks {quoted}");
    }
}

/// Every parameter a method declares (`methods::params`) is an openapi.yaml query parameter of the predict and
/// explain routes with the declared type and range, and docs/METHODS.md names it.
#[test]
fn openapi_and_methods_md_follow_the_declared_parameters() {
    use camserve::methods::params::{self, ParamKind};
    let doc = openapi();
    let query = doc["paths"]["/v1/models/{model}/explain"]["post"]["parameters"].as_array().expect("explain's parameters");
    let methods_md = std::fs::read_to_string(root().join("docs/METHODS.md")).unwrap();
    let declared = params::all();
    assert_eq!(declared.iter().map(|p| p.name).collect::<Vec<_>>(), ["channels", "steps", "samples", "noise", "seed", "masks", "mask_grid", "rise_masks", "rise_grid", "rise_p"]);
    for p in declared {
        let q = query.iter().find(|q| q["name"] == p.name).unwrap_or_else(|| panic!("openapi.yaml has no query parameter `{}`", p.name));
        let schema = &q["schema"];
        match p.kind {
            ParamKind::Count { max, .. } => {
                assert_eq!((schema["type"].as_str(), schema["minimum"].as_u64(), schema["maximum"].as_u64()), (Some("integer"), Some(1), Some(max as u64)), "{}", p.name)
            }
            ParamKind::Number { min, max, .. } => {
                assert_eq!((schema["type"].as_str(), schema["minimum"].as_f64(), schema["maximum"].as_f64()), (Some("number"), Some(min), Some(max)), "{}", p.name)
            }
            ParamKind::Seed => assert_eq!((schema["type"].as_str(), schema["minimum"].as_u64()), (Some("integer"), Some(0)), "{}", p.name),
            ParamKind::Cap => assert_eq!((schema["type"].as_str(), schema["minimum"].as_u64()), (Some("integer"), Some(1)), "{}", p.name),
        }
        if let Some(d) = p.default_text() {
            assert!(q["description"].as_str().unwrap_or("").contains(&format!("default {d}")), "openapi.yaml's `{}` does not give its default {d}", p.name);
        }
        assert!(methods_md.contains(&format!("`{}`", p.name)), "docs/METHODS.md does not name `{}`", p.name);
    }
}

fn raw_f32(e: &Value) -> (Vec<usize>, Vec<f32>) {
    let shape = e["raw"]["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
    let bytes = base64::engine::general_purpose::STANDARD.decode(e["raw"]["data"].as_str().unwrap()).unwrap();
    (shape, bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect())
}

/// The multi-pass methods and the metrics through the API: every form of request, the cost each model lists,
/// the budget's 422, SmoothGrad's seed, and the forward-pass counter. Their values against the references are
/// tests/methods.rs.
#[tokio::test]
async fn multipass_methods_and_metrics_through_the_api() {
    let mut s = Server::start(demo_and_vit_config()).await;
    let img = image_bytes("003.jpg");
    let (_, m) = json_of(s.client.get(s.url("/v1/models/demo")).send().await.unwrap(), "/v1/models/{model}", "get").await;
    let channels = m["layers"].as_array().unwrap().iter().find(|l| l["name"] == m["default_layer"]).unwrap()["shape"][0].as_u64().unwrap();
    // One explain pass with one gradient chain (3), plus each method's batches.
    assert_eq!(m["costs"]["gradcam"], 3);
    assert_eq!(m["costs"]["guided_gradcam"], 3);
    assert_eq!(m["costs"]["scorecam"], 3 + channels);
    assert_eq!(m["costs"]["ablationcam"], 3 + channels);
    assert_eq!(m["costs"]["integrated_gradients"], 3 + 3 * 50);
    assert_eq!(m["costs"]["smoothgrad"], 3 + 3 * 25);
    assert_eq!(m["costs"]["finercam"], 6);
    // 64x64: 19 pixels per step, 216 steps, 217 states.
    assert_eq!(m["metric_costs"], json!({"deletion": 217, "insertion": 217, "confidence_change": 1}));

    // JSON body: every new method with every metric and its curves, SmoothGrad seeded.
    let methods = ["cam", "scorecam", "ablationcam", "finercam", "integrated_gradients", "smoothgrad"];
    let body = json!({"image": b64(&img), "methods": methods, "metrics": "all", "outputs": ["raw", "curves", "heatmap"], "seed": 7, "samples": 4, "steps": 8});
    let (st, b) = json_of(s.client.post(s.url("/v1/models/demo/explain")).json(&body).send().await.unwrap(), EXPLAIN, "post").await;
    assert_eq!(st, 200, "{b}");
    let ex = b["explanations"].as_array().unwrap();
    assert_eq!(ex.iter().map(|e| e["method"].as_str().unwrap()).collect::<Vec<_>>(), methods);
    for e in ex {
        let name = e["method"].as_str().unwrap();
        let (shape, data) = raw_f32(e);
        if ["integrated_gradients", "smoothgrad"].contains(&name) {
            assert_eq!(shape, [3, 64, 64], "{name}");
        } else {
            assert_eq!(shape.len(), 2, "{name}: a map on the layer's grid");
            assert!(data.iter().all(|&v| v >= 0.0) && data.iter().any(|&v| v > 0.0), "{name}: a rectified, non-zero map");
        }
        let (del, ins, conf) = (e["metrics"]["deletion"].as_f64().unwrap(), e["metrics"]["insertion"].as_f64().unwrap(), e["metrics"]["confidence_change"].as_f64().unwrap());
        assert!((0.0..=1.0).contains(&del) && (0.0..=1.0).contains(&ins) && (-1.0..=1.0).contains(&conf), "{name}: {}", e["metrics"]);
        for curve in ["deletion", "insertion"] {
            let c = e["curves"][curve].as_array().unwrap();
            assert_eq!(c.len(), 217, "{name} {curve}");
        }
        // The deletion curve starts at the target's score on the image; insertion ends there.
        let score = e["target"]["score"].as_f64().unwrap();
        assert!((e["curves"]["deletion"][0].as_f64().unwrap() - score).abs() < 1e-5, "{name}");
        assert!((e["curves"]["insertion"][216].as_f64().unwrap() - score).abs() < 1e-5, "{name}");
    }
    assert_eq!(ex[5]["seed"], 7, "SmoothGrad returns its seed");
    assert!(b["timings_ms"]["metrics"].as_f64().unwrap() > 0.0);

    // Query string: the seed reproduces SmoothGrad; without noise it is saliency, bit for bit.
    let post = |q: &str| s.client.post(s.url(&format!("/v1/models/demo/explain?{q}"))).header("content-type", "image/jpeg").body(img.clone());
    let (_, a) = json_of(post("methods=smoothgrad&outputs=raw&seed=7&samples=4").send().await.unwrap(), EXPLAIN, "post").await;
    assert_eq!(a["explanations"][0]["raw"], ex[5]["raw"], "the same seed gives the same map");
    let (_, c) = json_of(post("methods=smoothgrad&outputs=raw&seed=8&samples=4").send().await.unwrap(), EXPLAIN, "post").await;
    assert_ne!(c["explanations"][0]["raw"], ex[5]["raw"], "another seed another map");
    let (_, z) = json_of(post("methods=saliency,smoothgrad&outputs=raw&noise=0&samples=3").send().await.unwrap(), EXPLAIN, "post").await;
    assert_eq!(z["explanations"][0]["raw"], z["explanations"][1]["raw"], "smoothgrad with noise=0 is saliency");
    let (_, r) = json_of(post("methods=smoothgrad&outputs=raw&samples=2").send().await.unwrap(), EXPLAIN, "post").await;
    assert!(r["explanations"][0]["seed"].is_u64(), "a random seed is returned");
    // Score-CAM capped: fewer channels, and it says how many.
    let (st, cap) = json_of(post("methods=scorecam&outputs=raw&channels=3").send().await.unwrap(), EXPLAIN, "post").await;
    assert_eq!((st, &cap["explanations"][0]["channels"]), (200, &json!(3)), "{cap}");

    // Multipart, options in the `options` part.
    let form = Form::new().part("image", Part::bytes(img.clone()).file_name("x.jpg").mime_str("image/jpeg").unwrap()).text("options", r#"{"methods": "cam", "metrics": ["confidence_change"]}"#);
    let (st, mp) = json_of(s.client.post(s.url("/v1/models/demo/explain")).multipart(form).send().await.unwrap(), EXPLAIN, "post").await;
    assert_eq!(st, 200, "{mp}");
    assert_eq!(mp["explanations"][0]["metrics"].as_object().unwrap().keys().collect::<Vec<_>>(), ["confidence_change"]);

    // Refusals name their reason.
    for (q, model, want) in [
        ("methods=cam", "vit", "not available for layer"),
        ("methods=ablationcam", "vit", "not available for layer"),
        ("methods=vit_reciprocam", "demo", "not a transformer's token layer"),
        ("methods=gradcam&metrics=beauty", "demo", "unknown metric `beauty`"),
        ("methods=gradcam&outputs=curves", "demo", "curves needs metrics"),
        ("methods=integrated_gradients&steps=0", "demo", "steps must be between 1 and 1000"),
        ("methods=smoothgrad&noise=-1", "demo", "noise must be between 0 and 10"),
        ("methods=scorecam&channels=0", "demo", "channels must be at least 1"),
    ] {
        let r = s.client.post(s.url(&format!("/v1/models/{model}/explain?{q}"))).header("content-type", "image/jpeg").body(img.clone()).send().await.unwrap();
        let (st, p) = json_of(r, EXPLAIN, "post").await;
        assert_eq!(st, 422, "{q}: {p}");
        assert!(p["detail"].as_str().unwrap().contains(want), "{q}: {}", p["detail"]);
    }

    let metrics = s.client.get(s.url("/metrics")).send().await.unwrap().text().await.unwrap();
    for method in ["scorecam", "ablationcam", "smoothgrad", "metric:deletion", "explain"] {
        let line = metrics.lines().find(|l| l.starts_with("camserve_forward_passes_total") && l.contains(&format!("method=\"{method}\"")) && l.contains("model=\"demo\""));
        assert!(line.is_some(), "no forward-pass count for {method}");
    }
    s.stop().await.unwrap();
}

/// A request over `server.max_forward_passes` is a 422 that gives its cost and the limit, before any work.
#[tokio::test]
async fn the_forward_pass_budget_refuses_with_the_cost() {
    let mut config = demo_config();
    config.server.max_forward_passes = 100;
    let mut s = Server::start(config).await;
    let img = image_bytes("003.jpg");
    let post = |q: &str| s.client.post(s.url(&format!("/v1/models/demo/explain?{q}"))).header("content-type", "image/jpeg").body(img.clone());
    let (st, _) = json_of(post("methods=integrated_gradients&steps=32").send().await.unwrap(), EXPLAIN, "post").await;
    assert_eq!(st, 200, "3 + 96 = 99 forward passes fit in 100");
    let (st, p) = json_of(post("methods=integrated_gradients&steps=33").send().await.unwrap(), EXPLAIN, "post").await;
    assert_eq!(st, 422);
    assert!(p["detail"].as_str().unwrap().contains("costs 102 forward passes") && p["detail"].as_str().unwrap().contains("limit of 100"), "{p}");
    // Targets multiply the cost; metrics add theirs per explanation.
    let (st, p) = json_of(post("methods=integrated_gradients&steps=16&top_k=2").send().await.unwrap(), EXPLAIN, "post").await;
    assert_eq!(st, 422, "2 x (3 + 48) = 102: {p}");
    let (st, p) = json_of(post("methods=gradcam&metrics=deletion").send().await.unwrap(), EXPLAIN, "post").await;
    assert_eq!(st, 422, "3 + 217: {p}");
    assert!(p["detail"].as_str().unwrap().contains("costs 220 forward passes"), "{p}");
    s.stop().await.unwrap();
}

/// Jobs through the real server, with API keys: the 202, the job and its answer match openapi.yaml; another key's
/// job is a 404 (not 403: ids cannot be probed), no key a 401; the answer equals the synchronous request's.
#[tokio::test]
async fn jobs_belong_to_their_key_and_answer_as_the_request_would() {
    let mut config = demo_config();
    config.server.api_keys = vec!["key-one".to_string(), "key-two".to_string()].into();
    let mut s = Server::start(config).await;
    let query = "methods=scorecam,gradcam&outputs=raw";
    let post = |q: String, key: &'static str| s.client.post(s.url(&format!("/v1/models/demo/explain?{q}"))).bearer_auth(key).header("content-type", "image/jpeg").body(image_bytes("006.jpg")).send();
    let r = post(format!("{query}&async=true"), "key-one").await.unwrap();
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let (st, job) = json_of(r, EXPLAIN, "post").await;
    assert_eq!(st, 202, "{job}");
    let get = |key: Option<&'static str>| {
        let mut r = s.client.get(s.url(&location));
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        r.send()
    };
    let (st, other) = json_of(get(Some("key-two")).await.unwrap(), "/v1/jobs/{id}", "get").await;
    assert_eq!(st, 404, "{other}");
    assert_eq!(get(None).await.unwrap().status(), 401);
    let mut last = Value::Null;
    for _ in 0..300 {
        let (st, j) = json_of(get(Some("key-one")).await.unwrap(), "/v1/jobs/{id}", "get").await;
        assert_eq!(st, 200, "{j}");
        last = j;
        if last["state"] == "done" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(last["state"], "done", "{last}");
    let (st, sync) = json_of(post(query.to_string(), "key-one").await.unwrap(), EXPLAIN, "post").await;
    assert_eq!(st, 200);
    for i in 0..2 {
        assert_eq!(last["result"]["explanations"][i]["raw"], sync["explanations"][i]["raw"], "explanation {i}");
    }
    let r = s.client.delete(s.url(&location)).bearer_auth("key-two").send().await.unwrap();
    assert_eq!(r.status(), 404, "another key cannot cancel it either");
    let (st, _) = json_of(s.client.delete(s.url(&location)).bearer_auth("key-one").send().await.unwrap(), "/v1/jobs/{id}", "delete").await;
    assert_eq!(st, 409, "finished");
    let r = s.client.post(s.url("/v1/models/demo/predict?async=true")).bearer_auth("key-one").header("content-type", "image/jpeg").body(image_bytes("006.jpg")).send().await.unwrap();
    assert_eq!(r.status(), 400, "predict has no jobs");
    s.stop().await.unwrap();
}
