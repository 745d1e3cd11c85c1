#!/usr/bin/env python
"""Convert an official checkpoint into a detectron2 checkpoint of HybridDETR.

    python tools/convert_official.py deformable_detr r50_deformable_detr_plus_iterative_bbox_refinement_plus_plus_two_stage-checkpoint.pth \\
        output/deformable_detr_r50_two_stage.pth
    python projects/HybridDETR/train_net.py --config-file <the config it names> --eval-only MODEL.WEIGHTS output/...pth

One subcommand per model (`hybrid_detr.converters.CONVERTERS`). The input is loaded with
torch.load(weights_only=True); the output is written only when the conversion succeeded.
"""
import argparse
import sys

try:
    import hybrid_detr  # noqa: F401
except ImportError as error:
    sys.exit(f"cannot import hybrid_detr ({error}): run `bash tools/bootstrap.sh`")

from hybrid_detr.converters import CONVERTERS  # noqa: E402
from hybrid_detr.converters.report import convert_and_report, converter_summary  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="model", required=True, metavar="MODEL")
    for name in sorted(CONVERTERS):
        p = sub.add_parser(name, help=converter_summary(name))
        p.add_argument("input", help="the official checkpoint (.pth)")
        p.add_argument("output", help="where to write the detectron2 checkpoint (.pth)")
    args = parser.parse_args(argv)
    return convert_and_report(args.model, args.input, args.output)


if __name__ == "__main__":
    sys.exit(main())
