#!/usr/bin/env python
"""Train several decoder modes side by side, several seeds each, and compare their AP over training.

    python tools/compare_modes.py --config-file configs/quickstart/deformable_detr_r18_synthetic.yaml \\
        --modes deformable dac dense smca co_detr@MODEL.HYBRID_DETR.CO_DETR.NUM_AUX_HEADS=1 \\
        --seeds 0 1 2 3 4 --eval-period 200 --parallel 2 --threads 1 --output output/compare_modes [KEY VALUE ...]

Each (mode, seed) is one `train_net.py` run in its own process and output folder (`OUTPUT_DIR/<mode>/seed<s>`),
with `OMP_NUM_THREADS=--threads`, at most `--parallel` at a time, evaluating COCO AP on the config's test
set every `--eval-period` iterations and at the end. A mode may carry config overrides after "@"
(KEY=VALUE pairs joined by "@"), as in tools/compare_step_cost.py. A run already finished (its
`metrics.json` has the final evaluation) is not run again, so an interrupted comparison resumes.

A paired protocol: for a seed, every mode sees the same data stream and starts from the baseline's initial
weights for the parts it shares with it (`--baseline`, default the first mode; checked and reported). The report
gives each mode's mean AP and its mean paired difference to the baseline with a 95% CI ("reproduced" only when
the CI excludes 0), the evaluation noise next to the seed noise, and the time each mode needs to reach the
baseline's final AP (its step time measured interleaved with the others').

Written to OUTPUT_DIR: `compare_modes.json`, `compare_modes.md` (the tables) and `compare_modes.png` (AP
against iteration and training time); `--report-only` writes them for the runs so far without training, e.g.
while a comparison is still running. The details: `hybrid_detr.analysis.mode_comparison`. The comparison
pairs the papers make: deformable vs dac, deformable vs co_detr (K = 1, 2), dense vs smca, deformable vs smca
with SMCA.DEFORMABLE, dn vs deformable, dn+dac and dn+co_detr vs dn.
"""
import argparse
import sys

try:
    import hybrid_detr  # noqa: F401
except ImportError as error:
    sys.exit(f"cannot import hybrid_detr ({error}): run `bash tools/bootstrap.sh`")

from hybrid_detr.analysis.mode_comparison import compare_modes  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--modes", nargs="+", required=True, help="DECODER_MODE values, optionally with @KEY=VALUE")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--labels", nargs="+",
                        help="a display name per --modes entry, same order (tables, plot); run folders keep the spec")
    parser.add_argument("--baseline", help="the mode the others are paired against (default: the first of --modes)")
    parser.add_argument("--no-shared-init", action="store_true",
                        help="do not start every mode of a seed from the baseline's initial weights")
    parser.add_argument("--step-cost-iters", type=int, default=10,
                        help="interleaved training steps per mode measured for the time to accuracy (0: skip)")
    parser.add_argument("--eval-folds", type=int, default=5, help="folds of the test images for the evaluation noise")
    parser.add_argument("--eval-period", type=int, default=200)
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per run (default 1)")
    parser.add_argument("--output", default="output/compare_modes")
    parser.add_argument("--report-only", action="store_true", help="train nothing: write the table and PNG of the runs so far")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides for every run, KEY VALUE ...")
    args = parser.parse_args(argv)
    return compare_modes(args.config_file, args.modes, args.seeds, args.eval_period, args.parallel, args.threads,
                         args.output, args.report_only, args.opts, baseline=args.baseline,
                         shared_init=not args.no_shared_init, step_cost_iters=args.step_cost_iters,
                         eval_folds=args.eval_folds, labels=args.labels)


if __name__ == "__main__":
    main()
