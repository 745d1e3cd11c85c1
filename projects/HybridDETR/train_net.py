#!/usr/bin/env python
"""Train and evaluate HybridDETR with detectron2.

    python projects/HybridDETR/train_net.py --config-file configs/coco/deformable_detr_r50_50ep.yaml --num-gpus 8
    python projects/HybridDETR/train_net.py --config-file CONFIG --eval-only MODEL.WEIGHTS model_final.pth
    python projects/HybridDETR/train_net.py --config-file CONFIG --resume   # continue OUTPUT_DIR's last checkpoint
    python projects/HybridDETR/train_net.py --config-file CONFIG --num-gpus 2   # 2 processes (gloo on a CPU)
    # your own COCO-format data: register it by name, then name it in DATASETS.TRAIN / TEST
    python projects/HybridDETR/train_net.py --config-file configs/finetune/deformable_detr_r50_finetune.yaml \
        --dataset mine_train=train.json:images/ --dataset mine_val=val.json:images/ \
        DATASETS.TRAIN '("mine_train",)' DATASETS.TEST '("mine_val",)' MODEL.HYBRID_DETR.NUM_CLASSES 3 MODEL.WEIGHTS coco.pth

Training writes logs (with ETA), metrics.json, TensorBoard events and checkpoints to OUTPUT_DIR, and
evaluates cfg.DATASETS.TEST with the COCO evaluator every TEST.EVAL_PERIOD iterations and at the end.
`--eval-only` evaluates, then prints the inference speed and the GFLOPs of the model.
"""
import logging
import os
import sys

# Run from a checkout without installing: the package lives next to this file.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import detectron2.utils.comm as comm  # noqa: E402
from detectron2.engine import default_argument_parser, default_setup, launch  # noqa: E402
from detectron2.evaluation import verify_results  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

import hybrid_detr  # noqa: E402,F401  (registers the HybridDETR meta-architecture)
from hybrid_detr.checkpoint import CheckpointError, HybridCheckpointer, describe_non_finite, non_finite_tensors  # noqa: E402
from hybrid_detr.config import load_config  # noqa: E402
from hybrid_detr.data.custom import check_num_classes, register_dataset_specs  # noqa: E402
from hybrid_detr.engine.launch import shut_down_workers  # noqa: E402
from hybrid_detr.engine.trainer import Trainer  # noqa: E402,F401  (tests and users import it from here)

logger = logging.getLogger("detectron2")


def setup(args):
    """The config of `args.config_file` and `args.opts` (unknown keys: KeyError naming them),
    frozen; then detectron2's logging, config dump to OUTPUT_DIR and seeding."""
    cfg = load_config(args.config_file, args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    # Show the log records of our own modules (hybrid_detr.*) beside detectron2's.
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="hybrid_detr", abbrev_name="hdetr")
    return cfg


def main(args):
    register_dataset_specs(getattr(args, "dataset", ()))
    cfg = setup(args)
    check_num_classes(cfg, eval_only=args.eval_only)

    if args.eval_only:
        model = Trainer.build_model(cfg)
        checkpointer = HybridCheckpointer(model, save_dir=cfg.OUTPUT_DIR)
        # Weights are required, with every tensor used at inference (a wrong mode's or config's
        # checkpoint would evaluate random weights to AP ~ 0 and exit 0).
        checkpoint = checkpointer.load_for_inference(
            cfg.MODEL.WEIGHTS, resume=args.resume,
            config_hint=f"MODEL.HYBRID_DETR.DECODER_MODE {cfg.MODEL.HYBRID_DETR.DECODER_MODE!r}",
        )
        if cfg.MODEL_EMA.ENABLED and "model_ema" in checkpoint:
            ema_state = checkpoint["model_ema"]["state"]
            bad = non_finite_tensors(ema_state.items())
            if bad:
                raise CheckpointError(f"The EMA weights of the checkpoint are not finite: {describe_non_finite(bad)}")
            model.load_state_dict(ema_state)  # evaluate the EMA weights
            logger.info("Evaluating the EMA weights of the checkpoint (MODEL_EMA.ENABLED)")
        results = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, results)
            if cfg.DATASETS.TEST:
                results["benchmark"] = Trainer.benchmark(cfg, model)
        return results

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def worker_main(args):
    results = main(args)
    shut_down_workers()
    return results


def argument_parser():
    parser = default_argument_parser()
    parser.add_argument(
        "--dataset", action="append", default=[], metavar="NAME=JSON:IMAGE_DIR",
        help="register a COCO-format dataset under NAME (repeatable); its classes come from the JSON",
    )
    return parser


def invoke_main() -> None:
    parser = argument_parser()
    args = parser.parse_args()
    if args.num_machines == 1 and args.dist_url == parser.get_default("dist_url"):
        # detectron2's default port is fixed per user: two jobs on one machine would collide.
        args.dist_url = "auto"
    print("Command Line Args:", args)
    launch(
        worker_main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    invoke_main()  # pragma: no cover
