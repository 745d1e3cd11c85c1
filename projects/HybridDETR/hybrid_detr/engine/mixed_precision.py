"""Mixed-precision training (SOLVER.AMP.ENABLED, SOLVER.AMP.PRECISION).

- CPU: bfloat16 autocast (float16 autocast is refused: the CPU has no float16 fast path); no loss
  scaling is needed for bfloat16's float32-sized exponent.
- CUDA: float16 (default) with detectron2's AMPTrainer and its GradScaler, gradients unscaled before
  the optimizer's full-model clipping (which must see true gradients), or bfloat16.
The weights and the optimizer state stay float32. The matchers and the losses run in float32 (the
criterion and matchers cast their inputs). Our MSDeformAttn op samples the autocast-dtype value
natively (CPU: bfloat16 kernels; CUDA: float16 / bfloat16 kernels; accumulating in float32) while its
sampling locations and attention weights stay float32 (a bfloat16 location is off by up to a quarter
pixel on a 128-pixel level); see `MSDeformAttn.sample`.
"""
import torch
from torch import nn

from detectron2.engine import AMPTrainer, SimpleTrainer

import contextlib

__all__ = ["amp_dtype", "autocast_context", "AutocastModel", "build_step_runner"]

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def amp_dtype(cfg) -> torch.dtype:
    precision, device = cfg.SOLVER.AMP.PRECISION, torch.device(cfg.MODEL.DEVICE).type
    if precision == "auto":
        return torch.float16 if device == "cuda" else torch.bfloat16
    if precision not in _DTYPES:
        raise ValueError(f"SOLVER.AMP.PRECISION must be 'auto', 'float16' or 'bfloat16', got {precision!r}")
    if device == "cpu" and precision == "float16":
        raise ValueError("SOLVER.AMP.PRECISION 'float16' is not supported on the CPU: use 'bfloat16' (or 'auto')")
    return _DTYPES[precision]


def autocast_context(cfg):
    """The autocast a training step runs under with this config (a no-op context without AMP)."""
    if not cfg.SOLVER.AMP.ENABLED:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(cfg.MODEL.DEVICE).type, dtype=amp_dtype(cfg))


class AutocastModel(nn.Module):
    """Runs the wrapped training model under the config's autocast (`autocast_context`)."""

    def __init__(self, model: nn.Module, cfg):
        super().__init__()
        self.model = model
        self.cfg = cfg

    def forward(self, batch):
        with autocast_context(self.cfg):
            return self.model(batch)


class _UnscalingAMPTrainer(AMPTrainer):
    def after_backward(self):
        # The optimizer clips the full model's gradient norm inside step(): unscale first.
        self.grad_scaler.unscale_(self.optimizer)
        super().after_backward()


def build_step_runner(cfg, model, data_loader, optimizer):
    """detectron2's SimpleTrainer, or its mixed-precision counterpart with SOLVER.AMP.ENABLED."""
    if not cfg.SOLVER.AMP.ENABLED:
        return SimpleTrainer(model, data_loader, optimizer)
    dtype = amp_dtype(cfg)
    if torch.device(cfg.MODEL.DEVICE).type == "cuda":
        return _UnscalingAMPTrainer(model, data_loader, optimizer, precision=dtype)
    return SimpleTrainer(AutocastModel(model, cfg), data_loader, optimizer)
