#!/usr/bin/env python
"""Convert an official checkpoint into a detectron2 checkpoint of HybridDETR.

    python tools/convert_official.py deformable_detr r50_deformable_detr_plus_iterative_bbox_refinement_plus_plus_two_stage-checkpoint.pth \\
        output/deformable_detr_r50_two_stage.pth
    python projects/HybridDETR/train_net.py --config-file <the config it names> --eval-only MODEL.WEIGHTS output/...pth

One subcommand per model (`hybrid_detr.converters.CONVERTERS`). The input is loaded with
torch.load(weights_only=True); the output is written only when the conversion succeeded.
"""
import argparse
import os
import sys

# Run from a checkout without installing: the package lives in projects/HybridDETR.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "projects", "HybridDETR"))

from hybrid_detr.converters import CONVERTERS, ConversionError, convert_file  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="model", required=True, metavar="MODEL")
    for name, fn in sorted(CONVERTERS.items()):
        p = sub.add_parser(name, help=(fn.__doc__ or name).strip().split("\n")[0])
        p.add_argument("input", help="the official checkpoint (.pth)")
        p.add_argument("output", help="where to write the detectron2 checkpoint (.pth)")
    args = parser.parse_args(argv)
    try:
        conversion = convert_file(args.model, args.input, args.output)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}: {conversion.description}, {len(conversion.state_dict)} tensors")
    for note in conversion.notes:
        print(f"  - {note}")
    print(
        f"evaluate with: python projects/HybridDETR/train_net.py --config-file configs/{conversion.config_name} "
        f"--eval-only MODEL.WEIGHTS {args.output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
