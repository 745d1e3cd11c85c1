#!/usr/bin/env python
"""Inference cost of a HybridDETR config: parameters, GFLOPs per image (fvcore, our op and SDPA
counted) and images/s, on the images of its first test set (the role of detectron2's
tools/analyze_model.py).

    python tools/analyze_model.py --config-file configs/quickstart/deformable_detr_r18_synthetic.yaml \\
        [--num-images 20] [--flop-images 3] [--output result.json] [MODEL.WEIGHTS model.pth ...]
"""
import argparse
import json
import os
import sys

# Run from a checkout without installing: the package lives in projects/HybridDETR.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "projects", "HybridDETR"))

from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.data import build_detection_test_loader  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

from hybrid_detr.config import load_config  # noqa: E402
from hybrid_detr.data import DetrDatasetMapper, ensure_synthetic_dataset  # noqa: E402
from hybrid_detr.engine import benchmark_model, format_benchmark  # noqa: E402


def analyze(cfg, num_images=20, flop_images=3):
    dataset = cfg.DATASETS.TEST[0]
    ensure_synthetic_dataset(dataset)
    model = build_model(cfg)
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    loader = build_detection_test_loader(cfg, dataset, mapper=DetrDatasetMapper(cfg, is_train=False))
    result = benchmark_model(model, loader, max_images=num_images, flop_images=flop_images)
    result["parameters"] = sum(p.numel() for p in model.parameters())
    result["dataset"] = dataset
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--num-images", type=int, default=20, help="images timed (after 5 warm-up)")
    parser.add_argument("--flop-images", type=int, default=3, help="images whose FLOPs are counted")
    parser.add_argument("--output", default=None, help="also write the result as JSON here")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE ...")
    args = parser.parse_args(argv)
    cfg = load_config(args.config_file, args.opts)
    cfg.freeze()
    result = analyze(cfg, args.num_images, args.flop_images)
    print(f"Parameters: {result['parameters'] / 1e6:.2f} M")
    print(format_benchmark(result, result["dataset"]))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
