"""Writes a ResNet-50 ONNX model (torchvision's topology, random weights) without PyTorch.

The soak test (scripts/soak-test.sh) needs a full-size model to serve, and PyTorch is not a test dependency.
This builds torchvision's ResNet-50 v1.5 graph with the `onnx` package alone: 7x7/2 stem, 3x3/2 max pool, the
bottleneck stages [3, 4, 6, 3] with the stride on the 3x3 conv, global average pool, a 1000-way Gemm. Batch
norms are folded into the convolutions (as an inference export with constant folding does), so each conv has a
bias. Weights are He-normal from a fixed seed; the last conv of each residual branch is scaled by 0.2 so that the
activations stay in a sane range through 16 blocks without batch norm. The batch axis is dynamic.

Usage: python3 scripts/make_resnet50.py OUT.onnx   (needs `pip install onnx numpy`)
"""

import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

rng = np.random.default_rng(50)
nodes, inits = [], []


def conv(x, name, cin, cout, k, stride=1, gain=1.0, relu=True):
    w = (rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k)) * gain).astype(np.float32)
    b = (rng.standard_normal(cout) * 0.01).astype(np.float32)
    inits.append(numpy_helper.from_array(w, f"{name}.weight"))
    inits.append(numpy_helper.from_array(b, f"{name}.bias"))
    p = k // 2
    y = f"/{name}/Conv_output_0"
    nodes.append(helper.make_node("Conv", [x, f"{name}.weight", f"{name}.bias"], [y], name=f"/{name}/Conv",
                                  kernel_shape=[k, k], strides=[stride, stride], pads=[p, p, p, p]))
    if not relu:
        return y
    r = f"/{name}/Relu_output_0"
    nodes.append(helper.make_node("Relu", [y], [r], name=f"/{name}/Relu"))
    return r


def bottleneck(x, name, cin, width, stride):
    cout = width * 4
    h = conv(x, f"{name}/conv1", cin, width, 1)
    h = conv(h, f"{name}/conv2", width, width, 3, stride)
    h = conv(h, f"{name}/conv3", width, cout, 1, gain=0.2, relu=False)
    skip = x
    if stride != 1 or cin != cout:
        skip = conv(x, f"{name}/downsample", cin, cout, 1, stride, relu=False)
    s = f"/{name}/Add_output_0"
    nodes.append(helper.make_node("Add", [h, skip], [s], name=f"/{name}/Add"))
    r = f"/{name}/Relu_output_0"
    nodes.append(helper.make_node("Relu", [s], [r], name=f"/{name}/Relu"))
    return r


def main(out):
    x = conv("input", "conv1", 3, 64, 7, 2)
    nodes.append(helper.make_node("MaxPool", [x], ["/maxpool/MaxPool_output_0"], name="/maxpool/MaxPool",
                                  kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]))
    x, cin = "/maxpool/MaxPool_output_0", 64
    for stage, (blocks, width) in enumerate(zip([3, 4, 6, 3], [64, 128, 256, 512]), start=1):
        for i in range(blocks):
            stride = 2 if i == 0 and stage > 1 else 1
            x = bottleneck(x, f"layer{stage}/layer{stage}.{i}", cin, width, stride)
            cin = width * 4
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["/avgpool/GlobalAveragePool_output_0"],
                                  name="/avgpool/GlobalAveragePool"))
    nodes.append(helper.make_node("Flatten", ["/avgpool/GlobalAveragePool_output_0"], ["/Flatten_output_0"],
                                  name="/Flatten", axis=1))
    w = (rng.standard_normal((1000, 2048)) * np.sqrt(1.0 / 2048)).astype(np.float32)
    inits.append(numpy_helper.from_array(w, "fc.weight"))
    inits.append(numpy_helper.from_array(np.zeros(1000, np.float32), "fc.bias"))
    nodes.append(helper.make_node("Gemm", ["/Flatten_output_0", "fc.weight", "fc.bias"], ["logits"], name="/fc/Gemm",
                                  transB=1))
    graph = helper.make_graph(
        nodes, "resnet50", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1000])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="make_resnet50.py")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, out)
    params = sum(int(np.prod(t.dims)) for t in inits)
    print(f"wrote {out}: ResNet-50 topology, {len(nodes)} nodes, {params / 1e6:.1f} M parameters")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
