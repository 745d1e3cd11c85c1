#!/usr/bin/env python
"""Inference cost of a HybridDETR config: parameters, GFLOPs per image (fvcore, our op and SDPA
counted) and images/s, on the images of its first test set (the role of detectron2's
tools/analyze_model.py).

    python tools/analyze_model.py --config-file configs/quickstart/deformable_detr_r18_synthetic.yaml \\
        [--num-images 20] [--flop-images 3] [--output result.json] [MODEL.WEIGHTS model.pth ...]
"""
import argparse
import json
import sys

try:
    import hybrid_detr  # noqa: F401
except ImportError as error:
    sys.exit(f"cannot import hybrid_detr ({error}): run `bash tools/bootstrap.sh`")

from hybrid_detr.analysis.inference_cost import analyze  # noqa: E402
from hybrid_detr.config import load_config  # noqa: E402
from hybrid_detr.engine import format_benchmark  # noqa: E402


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
