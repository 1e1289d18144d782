//! Compiles the vendored `proto/onnx.proto` with protox (pure Rust, no `protoc` binary needed).

fn main() {
    println!("cargo:rerun-if-changed=proto/onnx.proto");
    let fds = protox::compile(["onnx.proto"], ["proto"]).expect("proto/onnx.proto must compile. This is a bug.");
    prost_build::Config::new()
        // Tensor payloads become `bytes::Bytes` slices of the model buffer: no copy of the weights on load.
        .bytes(["."])
        .compile_fds(fds)
        .expect("prost code generation for onnx.proto failed. This is a bug.");
}
