#!/usr/bin/env python
"""Export HybridDETR's inference model (backbone to boxes, batch 1, any image size) to ONNX or
with `torch.export`.

    python tools/export.py --config-file configs/quickstart/deformable_detr_r18_synthetic.yaml \\
        --format onnx --output model.onnx [--check 3] [--opts MODEL.WEIGHTS model_final.pth ...]
    python tools/export.py --config-file CONFIG --format torch_export --output model.pt2 [--opts ...]

Inputs of the exported graph: `image` (1, 3, H, W) float32, normalised (pixel mean/std) and padded
as `HybridDETR.preprocess_image` does, H and W dynamic; `image_size` (2,) int64, the unpadded
(h, w). Outputs: `scores` (K,), `labels` (K,) int64, `boxes` (K, 4) xyxy in pixels of the input image
(K = TEST.DETECTIONS_PER_IMAGE), the top (query, class) pairs of the one-to-one decoder.
ONNX: opset 18, our op as GridSample (the pure-PyTorch reference path), runs in onnxruntime with no
custom library. torch_export: an ExportedProgram (.pt2, `torch.export.load`) with our op as
`torch.ops.hybrid_detr.ms_deform_attn` (import hybrid_detr before loading it).
`--check N` runs the exported file on the first N images of the config's test set and prints the
largest difference from the PyTorch model.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "projects", "HybridDETR"))

import torch  # noqa: E402
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

import hybrid_detr  # noqa: E402,F401
from hybrid_detr.analysis.export import (  # noqa: E402
    InferenceGraph, export_onnx, export_torch, preprocess_for_export,
)
from hybrid_detr.analysis.inputs import dataset_record, load_input  # noqa: E402
from hybrid_detr.config import load_config  # noqa: E402


def build(cfg):
    model = build_model(cfg)
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    return model.eval()


def example_images(cfg, count):
    """The first `count` images of the config's first test set, as the model sees them."""
    name = cfg.DATASETS.TEST[0]
    return [load_input(cfg, record=dataset_record(name, i))["image"] for i in range(count)]


def run_exported(fmt, path, inputs):
    """The exported file's outputs (scores, labels, boxes) as torch tensors."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        outputs = session.run(None, {"image": inputs[0].numpy(), "image_size": inputs[1].numpy()})
        return [torch.as_tensor(o) for o in outputs]
    program = torch.export.load(path)
    with torch.no_grad():
        return list(program.module()(*inputs))


def check(model, fmt, path, images):
    """Largest |difference| of scores and boxes (and label agreement) between the exported file and
    the PyTorch model, over `images`."""
    graph = InferenceGraph(model).eval()
    worst = {"scores": 0.0, "boxes": 0.0, "labels_equal": True}
    for image in images:
        inputs = preprocess_for_export(model, image)
        with torch.no_grad():
            expected = graph(*inputs)
        got = run_exported(fmt, path, inputs)
        worst["scores"] = max(worst["scores"], (got[0] - expected[0]).abs().max().item())
        worst["boxes"] = max(worst["boxes"], (got[2] - expected[2]).abs().max().item())
        worst["labels_equal"] &= bool(torch.equal(got[1].long(), expected[1]))
    return worst


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--format", choices=("onnx", "torch_export"), default="onnx")
    parser.add_argument("--output", required=True, help="the file to write (.onnx or .pt2)")
    parser.add_argument("--check", type=int, default=0, metavar="N",
                        help="compare the exported file with PyTorch on the first N test images")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="config overrides, KEY VALUE ...")
    args = parser.parse_args(argv)
    cfg = load_config(args.config_file, args.opts)
    cfg.freeze()
    model = build(cfg)
    example = example_images(cfg, 1)[0]
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    if args.format == "onnx":
        export_onnx(model, example, args.output)
    else:
        export_torch(model, example, args.output)
    print(f"[export] {cfg.MODEL.HYBRID_DETR.DECODER_MODE} -> {args.format}: {args.output}")
    result = None
    if args.check:
        result = check(model, args.format, args.output, example_images(cfg, args.check))
        print(f"[export] on {args.check} test images, max |difference| from PyTorch: scores {result['scores']:.2e}, "
              f"boxes {result['boxes']:.2e} px, labels equal: {result['labels_equal']}")
    return result


if __name__ == "__main__":
    main()
