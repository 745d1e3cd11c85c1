"""Exponential moving average of the model's weights (MODEL_EMA.ENABLED, MODEL_EMA.DECAY).

`ModelEMA` keeps, after every optimizer step, ema = decay * ema + (1 - decay) * weight for every
floating-point parameter and buffer (integer buffers are copied). It is a checkpointable of the
trainer's checkpointer ("model_ema"), so it is saved with every checkpoint and restored by
`--resume`; evaluation during and after training, and `--eval-only` on a checkpoint that holds
it, use the EMA weights (`ModelEMA.applied_to`).
"""
import contextlib
from typing import Dict

import torch
from torch import nn

from detectron2.engine import HookBase

__all__ = ["ModelEMA", "EMAHook"]


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP (`.module`) and the non-finite-loss guard (`.model`)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "model", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


class ModelEMA:
    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"MODEL_EMA.DECAY must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.updates = 0
        self.state: Dict[str, torch.Tensor] = {k: v.detach().clone() for k, v in _unwrap(model).state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        for name, value in _unwrap(model).state_dict().items():
            average = self.state[name]
            if average.is_floating_point():
                average.mul_(self.decay).add_(value.detach().to(average.dtype), alpha=1.0 - self.decay)
            else:
                average.copy_(value)

    @contextlib.contextmanager
    def applied_to(self, model: nn.Module):
        """The model holds the EMA weights inside the block, its own weights again after it."""
        model = _unwrap(model)
        own = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.state)
        try:
            yield model
        finally:
            model.load_state_dict(own)

    # checkpointable (fvcore Checkpointer)
    def state_dict(self):
        return {"decay": self.decay, "updates": self.updates, "state": self.state}

    def load_state_dict(self, state):
        self.updates = int(state["updates"])
        missing = set(self.state) - set(state["state"])
        if missing:
            raise KeyError(f"model_ema in the checkpoint lacks {sorted(missing)[:3]}... of this model")
        for name, value in state["state"].items():
            if name in self.state:
                self.state[name].copy_(value)


class EMAHook(HookBase):
    """Updates the EMA after every training step."""

    def __init__(self, ema: ModelEMA, model: nn.Module):
        self.ema = ema
        self.model = model

    def after_step(self):
        self.ema.update(self.model)
