"""Config checks run before training: keys that must agree with each other (or with the number of
workers), and values that cannot work (`check_model_values`, `check_solver_values`; with
`check_device`, also run before any model is built, for --eval-only and the model zoo too).

Unknown keys and wrong types are refused by `hybrid_detr.config.load_config` (yacs); mode
options (SMCA.LEVELS, CO_DETR.NUM_AUX_HEADS, ...) by the model when it is built, which also
happens before the first step.
"""
import math

import torch

from ..modeling.modes import parse_decoder_mode

__all__ = ["check_config", "check_device", "check_model_values", "check_solver_values"]

_SUPPORTED_SAMPLERS = ("TrainingSampler",)


def check_config(cfg, world_size: int) -> None:
    """Raise ValueError naming the keys when the training config cannot work."""
    parse_decoder_mode(cfg.MODEL.HYBRID_DETR.DECODER_MODE)  # unknown / contradictory modes
    solver = cfg.SOLVER
    if solver.IMS_PER_BATCH <= 0 or solver.IMS_PER_BATCH % world_size:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH ({solver.IMS_PER_BATCH}) is the total batch over all workers and must be a "
            f"positive multiple of the number of workers ({world_size}): e.g. SOLVER.IMS_PER_BATCH "
            f"{max(world_size, solver.IMS_PER_BATCH // world_size * world_size or world_size)}"
        )
    if solver.MAX_ITER <= 0:
        raise ValueError(f"SOLVER.MAX_ITER must be > 0, got {solver.MAX_ITER}")
    check_solver_values(cfg)
    if solver.CHECKPOINT_PERIOD <= 0:
        raise ValueError(f"SOLVER.CHECKPOINT_PERIOD must be > 0, got {solver.CHECKPOINT_PERIOD}")
    if cfg.DATALOADER.SAMPLER_TRAIN not in _SUPPORTED_SAMPLERS:
        raise ValueError(
            f"DATALOADER.SAMPLER_TRAIN {cfg.DATALOADER.SAMPLER_TRAIN!r} is not supported: HybridDETR's resumable "
            f"loader samples like {_SUPPORTED_SAMPLERS[0]} (a new permutation every epoch)"
        )
    if cfg.DATALOADER.NUM_WORKERS < 0:
        raise ValueError(f"DATALOADER.NUM_WORKERS must be >= 0, got {cfg.DATALOADER.NUM_WORKERS}")
    if not cfg.DATASETS.TRAIN:
        raise ValueError("DATASETS.TRAIN is empty: name at least one registered dataset")
    check_model_values(cfg)


# ------------------------------------------------------------------------------------------------
# Numeric keys of the model and the solver, and the device (config values, not datasets)
# ------------------------------------------------------------------------------------------------
def _require(ok: bool, key: str, value, expected: str, fix: str = "") -> None:
    if not ok:
        raise ValueError(f"{key} must be {expected}, got {value!r}" + (f": {fix}" if fix else ""))


def check_device(cfg) -> None:
    """MODEL.DEVICE names a device this machine has; raised before the model is moved there (where
    PyTorch would fail deep inside `model.to()`)."""
    try:
        device = torch.device(cfg.MODEL.DEVICE)
    except RuntimeError as e:
        raise ValueError(f"MODEL.DEVICE {cfg.MODEL.DEVICE!r} is not a device ({e}): use 'cpu' or 'cuda'") from None
    if device.type != "cuda":
        return
    if not torch.cuda.is_available():
        why = "PyTorch was built without CUDA" if torch.version.cuda is None else "no NVIDIA GPU or driver is visible"
        raise RuntimeError(
            f"MODEL.DEVICE is {cfg.MODEL.DEVICE!r} but this machine cannot run CUDA ({why}; "
            f"torch.cuda.is_available() is False). To run on the CPU, add `MODEL.DEVICE cpu` to the command line"
        )
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise RuntimeError(
            f"MODEL.DEVICE {cfg.MODEL.DEVICE!r}: this machine has {torch.cuda.device_count()} CUDA device(s); "
            f"use MODEL.DEVICE cuda (the process's own GPU)"
        )


def check_model_values(cfg) -> None:
    """ValueError naming the key for model values that cannot build or run a model (counts that must
    be positive, ratios outside their range); run before the model is built, in training and
    evaluation alike."""
    m, prefix = cfg.MODEL.HYBRID_DETR, "MODEL.HYBRID_DETR."
    for name in ("NUM_CLASSES", "NUM_QUERIES", "HIDDEN_DIM", "NHEADS", "DEC_LAYERS", "DIM_FEEDFORWARD",
                 "ENC_N_POINTS", "DEC_N_POINTS", "NUM_FEATURE_LEVELS"):
        _require(m[name] > 0, prefix + name, m[name], "> 0")
    _require(m.ENC_LAYERS >= 0, prefix + "ENC_LAYERS", m.ENC_LAYERS, ">= 0")
    if m.NUM_FEATURE_LEVELS < len(m.IN_FEATURES):
        raise ValueError(
            f"MODEL.HYBRID_DETR.NUM_FEATURE_LEVELS ({m.NUM_FEATURE_LEVELS}) is smaller than the number of "
            f"MODEL.HYBRID_DETR.IN_FEATURES ({list(m.IN_FEATURES)})"
        )
    if m.HIDDEN_DIM % m.NHEADS:
        raise ValueError(
            f"MODEL.HYBRID_DETR.HIDDEN_DIM ({m.HIDDEN_DIM}) must be divisible by MODEL.HYBRID_DETR.NHEADS ({m.NHEADS})"
        )
    _require(0 <= m.DROPOUT < 1, prefix + "DROPOUT", m.DROPOUT, "in [0, 1)")
    for name in ("CLASS_WEIGHT", "L1_WEIGHT", "GIOU_WEIGHT", "COST_CLASS", "COST_BBOX", "COST_GIOU", "FOCAL_GAMMA"):
        _require(math.isfinite(m[name]) and m[name] >= 0, prefix + name, m[name], "finite and >= 0")
    _require(0 <= m.NMS_THRESH_TEST <= 1, prefix + "NMS_THRESH_TEST", m.NMS_THRESH_TEST, "in [0, 1] (0: no NMS)")
    _require(m.NMS_PRE_TOPK_TEST > 0, prefix + "NMS_PRE_TOPK_TEST", m.NMS_PRE_TOPK_TEST, "> 0")
    _require(cfg.TEST.DETECTIONS_PER_IMAGE > 0, "TEST.DETECTIONS_PER_IMAGE", cfg.TEST.DETECTIONS_PER_IMAGE, "> 0")
    _require(0 <= cfg.MODEL_EMA.DECAY <= 1, "MODEL_EMA.DECAY", cfg.MODEL_EMA.DECAY, "in [0, 1]")


# Larger than any learning rate AdamW or SGD trains a detector with (Deformable DETR: 2e-4).
_MAX_BASE_LR = 1.0


def check_solver_values(cfg) -> None:
    """ValueError naming the key for solver values training cannot work with: a non-finite or absurd
    learning rate (yacs reads 1e400 as inf), negative decay, STEPS that are not increasing
    iterations. STEPS at or beyond MAX_ITER are ignored with a warning, as detectron2 does
    (`Trainer.build_lr_scheduler`)."""
    solver = cfg.SOLVER
    if not (math.isfinite(solver.BASE_LR) and 0 <= solver.BASE_LR <= _MAX_BASE_LR):
        raise ValueError(
            f"SOLVER.BASE_LR must be a finite learning rate in [0, {_MAX_BASE_LR:g}], got {solver.BASE_LR!r}: "
            f"with it the weights diverge at once (Deformable DETR trains with 2e-4)"
        )
    for name in ("WEIGHT_DECAY", "BACKBONE_MULTIPLIER", "LINEAR_PROJ_MULTIPLIER", "GAMMA"):
        _require(math.isfinite(solver[name]) and solver[name] >= 0, "SOLVER." + name, solver[name], "finite and >= 0")
    _require(0 <= solver.MOMENTUM < 1, "SOLVER.MOMENTUM", solver.MOMENTUM, "in [0, 1)")
    steps = list(solver.STEPS)
    if any(s <= 0 for s in steps) or any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError(
            f"SOLVER.STEPS {tuple(steps)} must be increasing iterations > 0 (the learning rate is multiplied "
            f"by SOLVER.GAMMA at each)"
        )
    clip = solver.CLIP_GRADIENTS
    if clip.ENABLED:
        _require(math.isfinite(clip.CLIP_VALUE) and clip.CLIP_VALUE > 0, "SOLVER.CLIP_GRADIENTS.CLIP_VALUE",
                 clip.CLIP_VALUE, "finite and > 0", "or set SOLVER.CLIP_GRADIENTS.ENABLED False")
