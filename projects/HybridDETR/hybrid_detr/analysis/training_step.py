"""A training step as the trainer takes it, outside the trainer, for the tools that time or measure one.

`training_batches(cfg, count)`: batches of the trainer's own (resumable) training loader
(`Trainer.build_train_loader`: DETR's mapper, batches in stream order), each with its load time.
`TrainingStep(cfg, model)`: the trainer's step in three parts that can be timed apart (forward + losses,
backward, optimizer step), with the trainer's optimizer (`build_optimizer`: its parameter groups and
gradient clipping) and `SOLVER.AMP`: the forward under the trainer's autocast, and the GradScaler of
the trainer's step runner where it has one (CUDA float16 / bfloat16, detectron2's AMPTrainer), its
gradients unscaled before the optimizer clips them.
"""
import time

from ..data import ensure_synthetic_dataset
from ..engine import build_optimizer
from ..engine.mixed_precision import autocast_context, build_step_runner
from ..engine.trainer import Trainer

__all__ = ["training_batches", "TrainingStep"]


def training_batches(cfg, count):
    """`count` batches of the trainer's own training loader, each as (batch, seconds it took to load)."""
    for name in cfg.DATASETS.TRAIN:
        ensure_synthetic_dataset(name)
    loader = iter(Trainer.build_train_loader(cfg))
    batches = []
    for _ in range(count):
        start = time.perf_counter()
        batch = next(loader)
        batches.append((batch, time.perf_counter() - start))
    return batches


class TrainingStep:
    """The trainer's training step on `model` (in training mode): `step(batch)`, or its parts
    `forward(batch)` -> (loss dict, total loss), `backward(loss)` (gradients zeroed first), `optimizer_step()`.
    """

    def __init__(self, cfg, model, optimizer=None):
        self.cfg = cfg
        self.model = model
        self.optimizer = build_optimizer(cfg, model) if optimizer is None else optimizer
        # The trainer's own step runner decides on loss scaling: its GradScaler, when it has one, and
        # what it does after the backward (unscaling before the optimizer's full-model clipping).
        self._runner = build_step_runner(cfg, model, (), self.optimizer)
        self.grad_scaler = getattr(self._runner, "grad_scaler", None)

    def forward(self, batch):
        with autocast_context(self.cfg):
            loss_dict = self.model(batch)
        return loss_dict, sum(loss_dict.values())

    def backward(self, loss):
        self.optimizer.zero_grad(set_to_none=True)
        if self.grad_scaler is not None:
            loss = self.grad_scaler.scale(loss)
        loss.backward()
        self._runner.after_backward()

    def optimizer_step(self):
        if self.grad_scaler is None:
            self.optimizer.step()
        else:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()

    def __call__(self, batch):
        loss_dict, loss = self.forward(batch)
        self.backward(loss)
        self.optimizer_step()
        return loss_dict, loss
