#!/usr/bin/env python
"""Training curves of a run as one PNG: total loss, the loss terms and AP over iterations, from
detectron2's OUTPUT_DIR/metrics.json.

    python tools/plot_metrics.py output/quickstart/deformable_detr_r18_synthetic [--output curves.png]

Writes OUTPUT_DIR/metrics.png unless --output is given, and prints its path.
"""
import argparse
import sys

try:
    import hybrid_detr  # noqa: F401
except ImportError as error:
    sys.exit(f"cannot import hybrid_detr ({error}): run `bash tools/bootstrap.sh`")

from hybrid_detr.analysis.metrics import plot_metrics  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", help="a training OUTPUT_DIR (or a metrics.json file)")
    parser.add_argument("--output", default=None, help="the PNG to write (default: OUTPUT_DIR/metrics.png)")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    png = plot_metrics(args.output_dir, args.output, args.title)
    print(png)
    return png


if __name__ == "__main__":
    main()
