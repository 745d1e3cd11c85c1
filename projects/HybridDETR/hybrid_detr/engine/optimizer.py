"""The Deformable-DETR optimizer: AdamW over three learning-rate groups, full-model gradient clipping.

Deformable DETR trains the backbone, and the deformable-attention projections that predict sampling
offsets and reference points, at lr x 0.1, and clips the norm of the gradient of the whole model
(not of each parameter, which is all detectron2's `CLIP_TYPE` "norm" / "value" offer) to 0.1.
"""
import logging
from typing import Any, Dict, List

import torch
from detectron2.solver.build import maybe_add_gradient_clipping

logger = logging.getLogger(__name__)

__all__ = ["build_optimizer", "get_param_groups", "maybe_add_full_model_gradient_clipping"]


def get_param_groups(
    model: torch.nn.Module,
    base_lr: float,
    weight_decay: float,
    backbone_multiplier: float,
    linear_proj_multiplier: float,
    linear_proj_names,
) -> List[Dict[str, Any]]:
    """Splits the trainable parameters of `model` into the groups "backbone", "linear_proj", "other".

    A parameter is a backbone parameter when its name starts with "backbone."; a linear-projection
    parameter when its name contains one of `linear_proj_names`. A parameter shared by several
    modules is listed once. Empty groups are left out.
    """
    rules = {
        "backbone": base_lr * backbone_multiplier,
        "linear_proj": base_lr * linear_proj_multiplier,
        "other": base_lr,
    }
    groups = {name: [] for name in rules}
    seen = set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        if name.startswith("backbone."):
            groups["backbone"].append(param)
        elif any(key in name for key in linear_proj_names):
            groups["linear_proj"].append(param)
        else:
            groups["other"].append(param)
    return [
        {"name": name, "params": params, "lr": rules[name], "weight_decay": weight_decay}
        for name, params in groups.items()
        if params
    ]


def maybe_add_full_model_gradient_clipping(cfg, optimizer_type):
    """Returns a subclass of `optimizer_type` whose `step` first clips the gradient norm of all its
    parameters together, when `SOLVER.CLIP_GRADIENTS` asks for CLIP_TYPE "full_model"; otherwise
    defers to detectron2's per-parameter clipping ("value", "norm").
    """
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if not clip.ENABLED:
        return optimizer_type
    if clip.CLIP_TYPE != "full_model":
        return maybe_add_gradient_clipping(cfg, optimizer_type)
    if clip.CLIP_VALUE <= 0:
        raise ValueError(
            f"SOLVER.CLIP_GRADIENTS.CLIP_VALUE must be > 0 for CLIP_TYPE 'full_model', got {clip.CLIP_VALUE}"
        )
    max_norm, norm_type = float(clip.CLIP_VALUE), float(clip.NORM_TYPE)

    class FullModelGradientClipping(optimizer_type):
        def step(self, closure=None):
            params = [p for group in self.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
            return super().step(closure=closure)

    FullModelGradientClipping.__name__ = optimizer_type.__name__ + "WithFullModelGradientClipping"
    return FullModelGradientClipping


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW (SOLVER.OPTIMIZER "ADAMW", the default) or SGD over `get_param_groups`; their fused
    kernels with SOLVER.FUSED_OPTIMIZER."""
    solver = cfg.SOLVER
    groups = get_param_groups(
        model,
        base_lr=solver.BASE_LR,
        weight_decay=solver.WEIGHT_DECAY,
        backbone_multiplier=solver.BACKBONE_MULTIPLIER,
        linear_proj_multiplier=solver.LINEAR_PROJ_MULTIPLIER,
        linear_proj_names=solver.LINEAR_PROJ_NAMES,
    )
    for group in groups:
        logger.info(f"Optimizer group {group['name']!r}: {len(group['params'])} tensors, "
                    f"{sum(p.numel() for p in group['params'])} parameters, lr {group['lr']:g}")
    name = solver.OPTIMIZER.upper()
    if name == "ADAMW":
        optimizer_type, kwargs = torch.optim.AdamW, {"betas": (0.9, 0.999)}
    elif name == "SGD":
        optimizer_type, kwargs = torch.optim.SGD, {"momentum": solver.MOMENTUM, "nesterov": solver.NESTEROV}
    else:
        raise ValueError(f"Unknown SOLVER.OPTIMIZER {solver.OPTIMIZER!r}: expected 'ADAMW' or 'SGD'")
    if solver.FUSED_OPTIMIZER:
        kwargs["fused"] = True
    optimizer_type = maybe_add_full_model_gradient_clipping(cfg, optimizer_type)
    return optimizer_type(groups, lr=solver.BASE_LR, weight_decay=solver.WEIGHT_DECAY, **kwargs)
