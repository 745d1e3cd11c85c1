#!/usr/bin/env python
"""Train and evaluate HybridDETR with detectron2.

    python projects/HybridDETR/train_net.py --config-file configs/coco/deformable_detr_r50_50ep.yaml --num-gpus 8
    python projects/HybridDETR/train_net.py --config-file CONFIG --eval-only MODEL.WEIGHTS model_final.pth
    python projects/HybridDETR/train_net.py --config-file CONFIG --resume   # continue OUTPUT_DIR's last checkpoint

Training writes logs (with ETA), metrics.json, TensorBoard events and checkpoints to OUTPUT_DIR, and
evaluates cfg.DATASETS.TEST with the COCO evaluator every TEST.EVAL_PERIOD iterations and at the end.
`--eval-only` evaluates, then prints the inference speed and the GFLOPs of the model.
"""
import itertools
import json
import logging
import os
import sys

# Run from a checkout without installing: the package lives next to this file.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import detectron2.utils.comm as comm  # noqa: E402
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.data import (  # noqa: E402
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch  # noqa: E402
from detectron2.evaluation import COCOEvaluator, verify_results  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

import hybrid_detr  # noqa: E402,F401  (registers the HybridDETR meta-architecture)
from hybrid_detr.data import DetrDatasetMapper, ensure_synthetic_dataset, validate_dataset_dicts  # noqa: E402
from hybrid_detr.config import load_config  # noqa: E402
from hybrid_detr.engine import benchmark_model, build_optimizer, format_benchmark  # noqa: E402

logger = logging.getLogger("detectron2")


class Trainer(DefaultTrainer):
    """detectron2's DefaultTrainer with Deformable DETR's optimizer, DETR's data augmentation and
    the COCO evaluator. Everything else (hooks, checkpoints, writers, LR schedule) is detectron2's."""

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def load_train_dataset(cls, cfg):
        """The training dataset dicts, each dataset checked by `validate_dataset_dicts` so that a
        broken annotation stops the run here, with the dataset, file and problem named."""
        if cfg.MODEL.LOAD_PROPOSALS:
            raise ValueError("HybridDETR does not use precomputed proposals: set MODEL.LOAD_PROPOSALS False")
        num_classes = cfg.MODEL.HYBRID_DETR.NUM_CLASSES
        datasets = []
        for name in cfg.DATASETS.TRAIN:
            classes = MetadataCatalog.get(name).get("thing_classes")
            if classes is not None and len(classes) != num_classes:
                raise ValueError(
                    f"Dataset '{name}' has {len(classes)} classes but MODEL.HYBRID_DETR.NUM_CLASSES is "
                    f"{num_classes}: set MODEL.HYBRID_DETR.NUM_CLASSES {len(classes)}"
                )
            dicts = get_detection_dataset_dicts(name, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
            validate_dataset_dicts(dicts, num_classes, name)
            datasets.append(dicts)
        return list(itertools.chain.from_iterable(datasets))

    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(
            cfg, mapper=DetrDatasetMapper(cfg, is_train=True), dataset=cls.load_train_dataset(cfg)
        )

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name, mapper=DetrDatasetMapper(cfg, is_train=False))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        ensure_synthetic_dataset(dataset_name)  # COCOEvaluator opens metadata.json_file at once
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return COCOEvaluator(dataset_name, tasks=("bbox",), distributed=True, output_dir=output_folder)

    @classmethod
    def benchmark(cls, cfg, model, dataset_name=None):
        """Inference speed and GFLOPs on the images of `dataset_name` (default: the first test set),
        logged and written to OUTPUT_DIR/inference/benchmark.json."""
        dataset_name = dataset_name or cfg.DATASETS.TEST[0]
        result = benchmark_model(model, cls.build_test_loader(cfg, dataset_name))
        logger.info(format_benchmark(result, dataset_name))
        path = os.path.join(cfg.OUTPUT_DIR, "inference", "benchmark.json")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump({"dataset": dataset_name, **result}, f, indent=2)
        return result


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
    cfg = setup(args)

    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        results = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, results)
            if cfg.DATASETS.TEST:
                results["benchmark"] = Trainer.benchmark(cfg, model)
        return results

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def invoke_main() -> None:
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    invoke_main()  # pragma: no cover
