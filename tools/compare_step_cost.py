"""Training cost of several decoder modes side by side, in one run.

    python3 tools/compare_step_cost.py --config-file CONFIG --modes deformable dac smca co_detr \
        [--iters 20] [--warmup 3] [--device cpu|cuda] [--output result.json] [KEY VALUE ...]

A mode may carry its own config overrides after "@", as KEY=VALUE pairs joined by "@", so that
variants of one mode run side by side:
    --modes deformable co_detr@MODEL.HYBRID_DETR.CO_DETR.NUM_AUX_HEADS=1 co_detr@MODEL.HYBRID_DETR.CO_DETR.NUM_AUX_HEADS=2

Every mode takes full training steps as the trainer does (SOLVER.AMP included) on the same batches of the
trainer's own training loader, from the same weights where their parameters coincide, in turns; printed
per mode and as a ratio to the first: step time, memory saved for backward, and on CUDA the peak memory.
How each is measured: `hybrid_detr.analysis.step_cost`.
"""
import argparse
import json
import sys

try:
    import hybrid_detr  # noqa: F401
except ImportError as error:
    sys.exit(f"cannot import hybrid_detr ({error}): run `bash tools/bootstrap.sh`")

from detectron2.utils.logger import setup_logger  # noqa: E402

from hybrid_detr.analysis.step_cost import compare_step_cost, format_step_cost  # noqa: E402
from hybrid_detr.config import load_config  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--modes", nargs="+", required=True, help="DECODER_MODE values, each optionally with @KEY=VALUE overrides; the first is the reference")
    parser.add_argument("--iters", type=int, default=20, help="counted iterations (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="uncounted first iterations (default 3)")
    parser.add_argument("--device", default=None, help="MODEL.DEVICE override (cpu, cuda)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="also write the results as JSON here")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE ...")
    args = parser.parse_args(argv)
    setup_logger(name="hybrid_detr", abbrev_name="hdetr")
    opts = list(args.opts)
    if args.device:
        opts += ["MODEL.DEVICE", args.device]
    cfg = load_config(args.config_file, opts)
    cfg.freeze()
    result = compare_step_cost(cfg, args.modes, iters=args.iters, warmup=args.warmup, seed=args.seed)
    result["config_file"] = args.config_file
    print(format_step_cost(result))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
