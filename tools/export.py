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

What the caller does before the graph (the tool prints it for the config), as detectron2's
DefaultPredictor does:
  1. channel order: the image in cfg.INPUT.FORMAT (detectron2's default BGR; OpenCV's imread gives
     BGR, PIL gives RGB), float 0-255, laid out (3, H, W);
  2. resize: shortest edge to INPUT.MIN_SIZE_TEST, longest at most INPUT.MAX_SIZE_TEST
     (ResizeShortestEdge, bilinear) -> (h, w);
  3. normalise with MODEL.PIXEL_MEAN / MODEL.PIXEL_STD (same channel order) and pad bottom/right with
     zeros to the backbone's size divisibility -> `image`; `image_size` = [h, w].
Box rescaling: by default `boxes` are in the pixels of the *resized* (h, w) image; for the original
(H, W) image multiply x by W / w and y by H / h, clip to it and drop empty boxes, as detectron2's
detector_postprocess does.
`--original-size` puts that post-process in the graph: a third input `original_size` (2,) int64
[H, W] (the image before step 2), `boxes` in its pixels, clipped, and a fourth output `keep` (K,) bool,
False for the boxes detectron2 drops (empty): `boxes[keep]`, `scores[keep]`, `labels[keep]` are the
model's detectron2 output for inputs {"image", "height": H, "width": W}.
ONNX: opset 18, our op as GridSample (the pure-PyTorch reference path), runs in onnxruntime with no
custom library. torch_export: an ExportedProgram (.pt2, `torch.export.load`) with our op as
`torch.ops.hybrid_detr.ms_deform_attn` (import hybrid_detr before loading it).
`--check N` runs the exported file on the first N images of the config's test set and prints the
largest difference from the PyTorch model. The work is done by `hybrid_detr.analysis.export`.
"""
import argparse
import sys

try:
    from hybrid_detr.analysis.export import EXPORTERS, export_model, input_preparation
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
    parser.add_argument("--original-size", action="store_true",
                        help="boxes in the original image's pixels: the graph takes original_size [H, W] as a third "
                             "input and returns keep (K,) bool, False for boxes detectron2 drops (empty)")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="config overrides, KEY VALUE ...")
    args = parser.parse_args(argv)
    cfg = load_config(args.config_file, args.opts)
    cfg.freeze()
    model = build_trained_model(cfg)
    result = export_model(cfg, model, args.format, args.output, args.check, original_size=args.original_size)
    print(f"[export] {cfg.MODEL.HYBRID_DETR.DECODER_MODE} -> {args.format}: {args.output}")
    print(f"[export] before the graph: {input_preparation(cfg, model)}")
    frame = "the original image's (input original_size; keep: detectron2's kept boxes)" if args.original_size \
        else "the resized input image's (h, w): rescale to the original image yourself, or export with --original-size"
    print(f"[export] boxes: xyxy in {frame} pixels")
    if result is not None:
        keep = f", keep equal: {result['keep_equal']}" if "keep_equal" in result else ""
        print(f"[export] on {args.check} test images, max |difference| from PyTorch: scores {result['scores']:.2e}, "
              f"boxes {result['boxes']:.2e} px, labels equal: {result['labels_equal']}{keep}")
    return result


if __name__ == "__main__":
    main()
