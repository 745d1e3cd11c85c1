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
largest difference from the PyTorch model. The work is done by `hybrid_detr.analysis.export`.
"""
import argparse
import sys

try:
    from hybrid_detr.analysis.export import EXPORTERS, export_model
    from hybrid_detr.analysis.inputs import build_trained_model
    from hybrid_detr.config import load_config
except ImportError as error:
    sys.exit(f"cannot import hybrid_detr ({error}): run `bash tools/bootstrap.sh`")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--format", choices=tuple(EXPORTERS), default="onnx")
    parser.add_argument("--output", required=True, help="the file to write (.onnx or .pt2)")
    parser.add_argument("--check", type=int, default=0, metavar="N",
                        help="compare the exported file with PyTorch on the first N test images")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="config overrides, KEY VALUE ...")
    args = parser.parse_args(argv)
    cfg = load_config(args.config_file, args.opts)
    cfg.freeze()
    result = export_model(cfg, build_trained_model(cfg), args.format, args.output, args.check)
    print(f"[export] {cfg.MODEL.HYBRID_DETR.DECODER_MODE} -> {args.format}: {args.output}")
    if result is not None:
        print(f"[export] on {args.check} test images, max |difference| from PyTorch: scores {result['scores']:.2e}, "
              f"boxes {result['boxes']:.2e} px, labels equal: {result['labels_equal']}")
    return result


if __name__ == "__main__":
    main()
