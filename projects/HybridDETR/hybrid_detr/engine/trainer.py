"""HybridDETR's trainer: detectron2's DefaultTrainer with Deformable DETR's optimizer, DETR's data
augmentation, the COCO evaluator, and what distributed training and exact resume need.

Differences from DefaultTrainer, each for a reason:
- DDP on CPU (gloo) as well as GPU (`engine.launch.create_ddp_model`);
- a resumable data loader (`hybrid_detr.data.loader`): batch i and its augmentations are a
  function of (seed, i), and python/numpy/torch are reseeded from (seed, iteration, rank) before
  every step. The seed is saved in every checkpoint, so `--resume` continues exactly where an
  uninterrupted run would be (bit-identical weights on CPU with the same thread count);
- atomic checkpoints and clear errors on bad weights (`hybrid_detr.checkpoint`);
- metrics.json / TensorBoard without repeated iterations after a resume (`engine.hooks`);
- training stops at the first non-finite loss on any worker (`engine.hooks.NonFiniteLossGuard`), and
  a model whose weights are no longer finite is not checkpointed (`FiniteWeightsBeforeCheckpoint`);
- a resume whose checkpoint (weights or optimizer state) does not fit the model stops, naming the
  tensors (`HybridCheckpointer.resume_or_load`, `check_optimizer_state`);
- training and test datasets and the config are checked before the first step (`hybrid_detr.data.checked`,
  `engine.checks`), MODEL.DEVICE before the model is built;
- SOLVER.STEPS at or beyond MAX_ITER are ignored with a warning (detectron2 ignores those beyond it);
- during the first writer period, losses and ETA are also written every `EARLY_WRITE_SECONDS`.

No detectron2 object is patched after it is built: `build_hooks` builds DefaultTrainer's hooks with
our choices through their public constructors. Two of DefaultTrainer's own attributes are set as its
`__init__` / `build_hooks` set them, for its `run_step` / `train` to read: `self._trainer` (the step
runner) and `self._last_eval_results` (see `_evaluate_and_keep_results`).
"""
import itertools
import json
import logging
import os
import weakref

import torch

from detectron2.data import MetadataCatalog, build_detection_test_loader
from detectron2.engine import DefaultTrainer, TrainerBase, hooks
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm
from detectron2.utils.events import CommonMetricPrinter, JSONWriter
from detectron2.utils.logger import setup_logger
from fvcore.nn.precise_bn import get_bn_modules

from ..checkpoint import CheckpointError, HybridCheckpointer
from ..data import DetrDatasetMapper, ensure_synthetic_dataset
from ..data.loader import build_resumable_train_loader, sample_seed, seed_all
from ..data.checked import load_checked_dataset_dicts
from .model_analysis import benchmark_model, format_benchmark
from .checks import check_config, check_device, check_model_values
from .ema import EMAHook, ModelEMA
from .mixed_precision import build_step_runner
from .hooks import (
    EarlyPeriodicWriter,
    FiniteWeightsBeforeCheckpoint,
    FlushingPeriodicCheckpointer,
    NonFiniteLossGuard,
    ResumableTensorboardWriter,
    truncate_metrics_json,
)
from .launch import create_ddp_model
from .optimizer import build_optimizer

__all__ = ["Trainer", "check_optimizer_state", "resolve_seed"]

logger = logging.getLogger("detectron2")


def resolve_seed(cfg) -> int:
    """cfg.SEED, or (SEED < 0) one random seed shared by all workers."""
    return int(cfg.SEED) if cfg.SEED >= 0 else int(comm.shared_random_seed())


class Trainer(DefaultTrainer):
    # Iterations between two writes of metrics.json / TensorBoard / the console (detectron2: 20).
    WRITER_PERIOD = 20
    # During the first WRITER_PERIOD iterations, also write when this many seconds have passed.
    EARLY_WRITE_SECONDS = 10.0

    def __init__(self, cfg):
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        check_config(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        self.check_test_datasets(cfg)
        self.seed = data_loader.batch_sampler.seed
        ddp = create_ddp_model(model, broadcast_buffers=False)
        guarded = NonFiniteLossGuard(ddp, lambda: self.iter)
        self._trainer = build_step_runner(cfg, guarded, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = HybridCheckpointer(
            ddp, cfg.OUTPUT_DIR, divergence_hint=self._divergence_hint, trainer=weakref.proxy(self)
        )
        self.model_ema = ModelEMA(model, cfg.MODEL_EMA.DECAY) if cfg.MODEL_EMA.ENABLED else None
        if self.model_ema is not None:
            self.checkpointer.add_checkpointable("model_ema", self.model_ema)
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    # -- resume ---------------------------------------------------------------------------------
    def resume_or_load(self, resume=True):
        super().resume_or_load(resume=resume)
        self._trainer.data_loader.batch_sampler.start_iter = self.start_iter
        if self.start_iter > 0 and comm.is_main_process():
            truncate_metrics_json(os.path.join(self.cfg.OUTPUT_DIR, "metrics.json"), self.start_iter - 1)

    def state_dict(self):
        ret = super().state_dict()
        ret["seed"] = self.seed
        return ret

    def load_state_dict(self, state_dict):
        optimizer_state = state_dict.get("_trainer", {}).get("optimizer")
        if optimizer_state is not None:
            check_optimizer_state(self.optimizer, optimizer_state, self.model, self.checkpointer.get_checkpoint_file())
        super().load_state_dict(state_dict)
        if "seed" in state_dict and state_dict["seed"] != self.seed:
            logger.info(f"Resume: using the checkpoint's seed {state_dict['seed']} (config: {self.seed})")
            self.seed = int(state_dict["seed"])
            self._trainer.data_loader.batch_sampler.seed = self.seed
            self._trainer.data_loader.dataset.seed = self.seed

    def _divergence_hint(self) -> str:
        lrs = ", ".join(f"{g.get('name', i)} {g['lr']:.3g}" for i, g in enumerate(self.optimizer.param_groups))
        return (f"the learning rate is likely too high (SOLVER.BASE_LR {self.cfg.SOLVER.BASE_LR:g}; now per group: "
                f"{lrs}): lower SOLVER.BASE_LR, keep SOLVER.CLIP_GRADIENTS enabled, and resume from the last "
                f"checkpoint or start afresh")

    def run_step(self):
        # Model-side randomness (dropout, DAC's random cap, R-CNN sampling) is a function of the
        # iteration. (Creating the loader's iterator in the first step draws from the loader's own
        # generator, not from this seeded RNG: see `build_resumable_train_loader`.)
        seed_all(sample_seed(self.seed, 0x57E9, self.iter, comm.get_rank()))
        super().run_step()

    # -- hooks and writers ------------------------------------------------------------------------
    def build_hooks(self):
        """DefaultTrainer's hooks, in its order, built with our choices:

        - the EMA update (MODEL_EMA.ENABLED) right after the step, before anything that saves or
          evaluates the model;
        - evaluation (on the EMA weights when there are any) **before** the checkpoint of the same
          iteration, unlike DefaultTrainer: the checkpointer writes and flushes the file writers first,
          and a JSON writer never goes back to an iteration it has written, so an evaluation after it
          would be missing from metrics.json whenever TEST.EVAL_PERIOD and SOLVER.CHECKPOINT_PERIOD
          coincide. (DefaultTrainer evaluates after saving so that a failing evaluation leaves that
          checkpoint behind; here the test sets are checked before training instead.)
        - a finiteness check of the weights before each checkpoint, on every worker;
        - a checkpointer that first writes and flushes the file writers (not the console printer,
          whose ETA needs one write per iteration), so a checkpoint's metrics are on disk with it;
        - the writers every `WRITER_PERIOD` iterations (and every `EARLY_WRITE_SECONDS` before the first).
        """
        cfg = self.cfg.clone()
        cfg.defrost()
        cfg.DATALOADER.NUM_WORKERS = 0  # as detectron2: save memory and time for PreciseBN
        main = comm.is_main_process()
        writers = self.build_writers() if main else []
        ret = [hooks.IterationTimer(), hooks.LRScheduler()]
        if self.model_ema is not None:
            ret.append(EMAHook(self.model_ema, self.model))
        if cfg.TEST.PRECISE_BN.ENABLED and get_bn_modules(self.model):
            # Before the checkpointer, which saves the statistics it updates.
            ret.append(hooks.PreciseBN(
                cfg.TEST.EVAL_PERIOD, self.model, self.build_train_loader(cfg), cfg.TEST.PRECISE_BN.NUM_ITER
            ))
        evaluate = self._evaluate_and_keep_results
        if self.model_ema is not None:
            evaluate = self._with_ema(evaluate)
        ret.append(hooks.EvalHook(cfg.TEST.EVAL_PERIOD, evaluate))
        # Every worker, so that all stop together when the weights diverged.
        ret.append(FiniteWeightsBeforeCheckpoint(self.checkpointer, cfg.SOLVER.CHECKPOINT_PERIOD))
        if main:
            files = [w for w in writers if not isinstance(w, CommonMetricPrinter)]
            ret.append(FlushingPeriodicCheckpointer(self.checkpointer, cfg.SOLVER.CHECKPOINT_PERIOD, files))
        if main:
            # Last, so that the evaluation metrics are written too.
            ret.append(EarlyPeriodicWriter(writers, period=self.WRITER_PERIOD, early_seconds=self.EARLY_WRITE_SECONDS))
        return ret

    def _evaluate_and_keep_results(self):
        """DefaultTrainer's evaluation function: `test`, its results kept for `train()`.

        The adapter to detectron2's one private name here: DefaultTrainer.train() checks
        TEST.EXPECTED_RESULTS against `self._last_eval_results`, which only the evaluation function
        of DefaultTrainer.build_hooks sets and which detectron2 offers no public way to set.
        """
        self._last_eval_results = self.test(self.cfg, self.model)
        return self._last_eval_results

    def _with_ema(self, evaluate):
        def evaluate_ema():
            with self.model_ema.applied_to(self.model):
                return evaluate()

        return evaluate_ema

    def build_writers(self):
        os.makedirs(self.cfg.OUTPUT_DIR, exist_ok=True)
        return [
            CommonMetricPrinter(self.max_iter),
            JSONWriter(os.path.join(self.cfg.OUTPUT_DIR, "metrics.json")),
            ResumableTensorboardWriter(self.cfg.OUTPUT_DIR, lambda: self.start_iter),
        ]

    # -- building blocks ------------------------------------------------------------------------
    @classmethod
    def build_model(cls, cfg):
        """detectron2's model, after the model values and MODEL.DEVICE are checked (training and
        --eval-only alike)."""
        check_model_values(cfg)
        check_device(cfg)
        return super().build_model(cfg)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        """detectron2's scheduler; SOLVER.STEPS at or beyond MAX_ITER are dropped with a warning, as
        detectron2 drops (and warns about) those beyond it. (One at MAX_ITER would never act, and
        fvcore's scheduler refuses it.) A quick `SOLVER.MAX_ITER 5` try of a long config trains."""
        steps, max_iter = tuple(cfg.SOLVER.STEPS), cfg.SOLVER.MAX_ITER
        kept = tuple(s for s in steps if s < max_iter)
        if kept != steps:
            logger.warning(
                f"SOLVER.STEPS {steps}: {[s for s in steps if s >= max_iter]} not below SOLVER.MAX_ITER "
                f"({max_iter}), ignored (the learning rate never drops there), as detectron2 does"
            )
            cfg = cfg.clone()
            cfg.defrost()
            cfg.SOLVER.STEPS = kept
        return super().build_lr_scheduler(cfg, optimizer)

    @classmethod
    def load_train_dataset(cls, cfg):
        """The training dataset dicts, every dataset checked (files, JSON, images, boxes, classes)
        so that a broken dataset stops the run here with the dataset, file and problem named."""
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
            datasets.append(
                load_checked_dataset_dicts(name, num_classes, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
            )
        return list(itertools.chain.from_iterable(datasets))

    @classmethod
    def check_test_datasets(cls, cfg):
        """Every DATASETS.TEST set checked as the training sets are (JSON, records, image files) before
        the first step: a broken evaluation set would otherwise stop the run at its first evaluation,
        after the training time it took. Images without objects stay (they count in evaluation)."""
        for name in cfg.DATASETS.TEST:
            load_checked_dataset_dicts(
                name, cfg.MODEL.HYBRID_DETR.NUM_CLASSES, filter_empty=False, for_training=False
            )

    @classmethod
    def build_train_loader(cls, cfg):
        return build_resumable_train_loader(
            cls.load_train_dataset(cfg),
            DetrDatasetMapper(cfg, is_train=True),
            cfg.SOLVER.IMS_PER_BATCH,
            resolve_seed(cfg),
            num_workers=cfg.DATALOADER.NUM_WORKERS,
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


def check_optimizer_state(optimizer, saved_state, model, path) -> None:
    """CheckpointError naming the parameters when a saved optimizer state does not fit `optimizer`
    (other parameter groups, or moment tensors of another shape than their parameter): torch would
    load it anyway and fail at the first step, the fused kernels with an internal assert or a crash."""
    names = {id(p): n for n, p in model.named_parameters()}
    groups, saved_groups = optimizer.param_groups, saved_state.get("param_groups", [])
    fix = (f"The config changed since {path} was written (which parameters are trained, or the optimizer): "
           f"choose a new OUTPUT_DIR to start afresh, or pass MODEL.WEIGHTS {path} without --resume to "
           f"fine-tune from its weights")
    sizes, saved_sizes = [len(g["params"]) for g in groups], [len(g["params"]) for g in saved_groups]
    if sizes != saved_sizes:
        raise CheckpointError(
            f"--resume: the optimizer state in {path} has parameter groups of {saved_sizes} tensors, the "
            f"optimizer of this config {sizes} ({', '.join(str(g.get('name', i)) for i, g in enumerate(groups))}). "
            + fix
        )
    wrong = []
    for group, saved_group in zip(groups, saved_groups):
        for param, index in zip(group["params"], saved_group["params"]):
            for key, value in saved_state.get("state", {}).get(index, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() and value.shape != param.shape:
                    wrong.append(f"{names.get(id(param), '?')} {key}: {tuple(value.shape)} saved, "
                                 f"{tuple(param.shape)} in the model")
                    break
    if wrong:
        more = f"; ... ({len(wrong)} in all)" if len(wrong) > 5 else ""
        raise CheckpointError(
            f"--resume: the optimizer state in {path} does not fit the model's parameters: "
            + "; ".join(wrong[:5]) + more + ". " + fix
        )
