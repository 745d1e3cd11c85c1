"""Config checks that need more than one key (or the number of workers), run before training.

Unknown keys and wrong types are refused by `hybrid_detr.config.load_config` (yacs); mode
options (SMCA.LEVELS, CO_DETR.NUM_AUX_HEADS, ...) by the model when it is built, which also
happens before the first step.
"""
from ..modeling.modes import parse_decoder_mode

__all__ = ["check_config"]

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
    late = [s for s in solver.STEPS if not 0 < s < solver.MAX_ITER]
    if late:
        raise ValueError(
            f"SOLVER.STEPS {tuple(solver.STEPS)} must lie in (0, SOLVER.MAX_ITER = {solver.MAX_ITER}); {late} do not"
        )
    if solver.CHECKPOINT_PERIOD <= 0:
        raise ValueError(f"SOLVER.CHECKPOINT_PERIOD must be > 0, got {solver.CHECKPOINT_PERIOD}")
    if solver.BASE_LR < 0:
        raise ValueError(f"SOLVER.BASE_LR must be >= 0, got {solver.BASE_LR}")
    if cfg.DATALOADER.SAMPLER_TRAIN not in _SUPPORTED_SAMPLERS:
        raise ValueError(
            f"DATALOADER.SAMPLER_TRAIN {cfg.DATALOADER.SAMPLER_TRAIN!r} is not supported: HybridDETR's resumable "
            f"loader samples like {_SUPPORTED_SAMPLERS[0]} (a new permutation every epoch)"
        )
    if cfg.DATALOADER.NUM_WORKERS < 0:
        raise ValueError(f"DATALOADER.NUM_WORKERS must be >= 0, got {cfg.DATALOADER.NUM_WORKERS}")
    if not cfg.DATASETS.TRAIN:
        raise ValueError("DATASETS.TRAIN is empty: name at least one registered dataset")
    m = cfg.MODEL.HYBRID_DETR
    if m.NUM_FEATURE_LEVELS < len(m.IN_FEATURES):
        raise ValueError(
            f"MODEL.HYBRID_DETR.NUM_FEATURE_LEVELS ({m.NUM_FEATURE_LEVELS}) is smaller than the number of "
            f"MODEL.HYBRID_DETR.IN_FEATURES ({list(m.IN_FEATURES)})"
        )
    if m.HIDDEN_DIM % m.NHEADS:
        raise ValueError(
            f"MODEL.HYBRID_DETR.HIDDEN_DIM ({m.HIDDEN_DIM}) must be divisible by MODEL.HYBRID_DETR.NHEADS ({m.NHEADS})"
        )
