#!/usr/bin/env python
"""Where a training step's time goes, part by part.

    python tools/profile_step.py --config-file configs/quickstart/deformable_detr_r18_synthetic.yaml \\
        [--steps 4] [--warmup 1] [--threads 2] [KEY VALUE ...]

Runs a few training steps of the config's model (as the trainer runs them, SOLVER.AMP included) on
batches of the trainer's own training loader and prints, per part, the mean wall time per step and its
share of the step, with the shares of our MSDeformAttn op, the convolutions and the matrix multiplies,
the convolutions' rate against a float32 matmul (FLOPs as detectron2 counts them: one per multiply-add),
the padding share and the peak resident memory.
What each figure is: `hybrid_detr.analysis.step_profile`.
"""
import argparse
import sys

try:
    import hybrid_detr  # noqa: F401
except ImportError as error:
    sys.exit(f"cannot import hybrid_detr ({error}): run `bash tools/bootstrap.sh`")

import torch  # noqa: E402

from hybrid_detr.analysis.step_profile import format_profile, profile_steps  # noqa: E402
from hybrid_detr.analysis.training_step import training_batches  # noqa: E402
from hybrid_detr.config import load_config  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE ...")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config_file, args.opts)
    cfg.freeze()
    result = profile_steps(cfg, training_batches(cfg, args.steps + args.warmup), warmup=args.warmup)
    print(format_profile(result, f"{cfg.MODEL.HYBRID_DETR.DECODER_MODE}: "))
    return result


if __name__ == "__main__":
    main()
