//! What the reference-fixture tests (segmentation, multilabel, detr, detr_sigmoid, torchvision, rtdetr) share: reading a fixture folder's
//! npz and json files, an Open Inference Protocol request with one image's input tensor, and its outputs.

use ndarray::ArrayD;
use ndarray_npy::NpzReader;
use serde_json::Value;

/// A fixture folder under tests/fixtures.
pub struct Fixture(pub std::path::PathBuf);

impl Fixture {
    pub fn new(name: &str) -> Fixture {
        Fixture(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name))
    }

    pub fn path(&self, file: &str) -> std::path::PathBuf {
        self.0.join(file)
    }

    pub fn npz(&self, file: &str) -> NpzReader<std::fs::File> {
        NpzReader::new(std::fs::File::open(self.path(file)).unwrap_or_else(|e| panic!("{file}: {e}"))).unwrap()
    }

    pub fn json(&self, file: &str) -> Value {
        serde_json::from_slice(&std::fs::read(self.path(file)).unwrap_or_else(|e| panic!("{file}: {e}"))).unwrap()
    }
}

/// An OIP infer request with array `key` of `inputs` (one image's tensor `[C, H, W]`, or `[1, C, H, W]`) as the
/// model's input `input`, the request's `parameters`, and the named outputs (none: the protocol's defaults).
pub fn tensor_request(inputs: &mut NpzReader<std::fs::File>, key: &str, input: &str, parameters: Value, outputs: &[&str]) -> Value {
    let x: ArrayD<f32> = inputs.by_name(&format!("{key}.npy")).unwrap();
    let mut shape = vec![1];
    shape.extend(x.shape().iter().skip(x.ndim().saturating_sub(3)));
    let mut req = serde_json::json!({
        "inputs": [{ "name": input, "datatype": "FP32", "shape": shape, "data": x.iter().copied().collect::<Vec<f32>>() }],
        "parameters": parameters,
    });
    if !outputs.is_empty() {
        req["outputs"] = outputs.iter().map(|o| serde_json::json!({ "name": o })).collect();
    }
    req
}

/// An OIP answer's output by name.
pub fn oip_output<'a>(res: &'a Value, name: &str) -> &'a Value {
    res["outputs"].as_array().unwrap_or_else(|| panic!("{res}")).iter().find(|o| o["name"] == name).unwrap_or_else(|| panic!("no {name} in {res}"))
}

/// An OIP output's data as numbers.
pub fn floats(v: &Value) -> Vec<f64> {
    v["data"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}
