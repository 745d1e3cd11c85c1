"""Hooks and writers that make a resumed run look like one that was never interrupted.

- `FlushingPeriodicCheckpointer`: before each checkpoint, every writer writes and flushes, so the
  metrics of every iteration up to the checkpoint are on disk when the checkpoint exists.
- `truncate_metrics_json`: on resume, drops the records a killed run wrote after its last
  checkpoint (they are produced again), so metrics.json has each iteration once.
- `ResumableTensorboardWriter`: opens its event file with `purge_step=start_iter`, which tells
  TensorBoard to discard the previous run's events from that step on.
- `NonFiniteLossGuard`: stops training at the first NaN/Inf loss (or a matcher's non-finite
  prediction) on any worker, naming the iteration, the loss terms and the batch's image ids.
- `FiniteWeightsBeforeCheckpoint`: stops training on every worker, naming the non-finite weights,
  instead of saving a diverged model as the last checkpoint.
- `EarlyPeriodicWriter`: detectron2's PeriodicWriter that also writes during the first period
  whenever some seconds have passed, so a slow start (a CPU) shows losses and an ETA at once.
"""
import json
import logging
import os
import time
from functools import cached_property

import torch
from torch import nn

from detectron2.engine import hooks
from detectron2.utils import comm
from detectron2.utils.events import TensorboardXWriter

from ..checkpoint import non_finite_tensors
from .launch import all_ranks_any

__all__ = [
    "EarlyPeriodicWriter",
    "FiniteWeightsBeforeCheckpoint",
    "FlushingPeriodicCheckpointer",
    "NonFiniteLossGuard",
    "ResumableTensorboardWriter",
    "truncate_metrics_json",
]

logger = logging.getLogger(__name__)


class FlushingPeriodicCheckpointer(hooks.PeriodicCheckpointer):
    """detectron2's PeriodicCheckpointer that first writes and flushes `writers`."""

    def __init__(self, checkpointer, period, writers=(), **kwargs):
        super().__init__(checkpointer, period, **kwargs)
        self.writers = list(writers)

    def after_step(self):
        iteration = self.trainer.iter
        if (iteration + 1) % self.period == 0 or iteration >= self.max_iter - 1:
            for writer in self.writers:
                writer.write()
                flush = getattr(writer, "flush", None)
                if flush is not None:
                    flush()
        super().after_step()


def truncate_metrics_json(path: str, last_iteration: int) -> int:
    """Cut `path` (one JSON record a line) after the last record with iteration <= last_iteration.

    The file is truncated in place (a writer holding it open in append mode keeps working).
    Returns the number of records dropped.
    """
    if not os.path.isfile(path):
        return 0
    keep_bytes, dropped = 0, 0
    with open(path, "rb") as f:
        lines = f.readlines()
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except ValueError:  # a half-written last line from a killed run
            dropped = len(lines) - i
            break
        if record.get("iteration", -1) > last_iteration:
            dropped = len(lines) - i
            break
        keep_bytes += len(line)
    if dropped:
        with open(path, "r+b") as f:
            f.truncate(keep_bytes)
            f.flush()
            os.fsync(f.fileno())
        logger.info(f"Resume: dropped {dropped} records after iteration {last_iteration} from {path}")
    return dropped


class ResumableTensorboardWriter(TensorboardXWriter):
    """TensorboardXWriter whose event file purges the steps >= `start_iter()` of earlier files."""

    def __init__(self, log_dir, start_iter, window_size=20, **kwargs):
        super().__init__(log_dir, window_size, **kwargs)
        self._start_iter = start_iter

    @cached_property
    def _writer(self):
        from torch.utils.tensorboard import SummaryWriter

        args = dict(self._writer_args)
        start = self._start_iter()
        if start > 0:
            args["purge_step"] = start
        return SummaryWriter(**args)

    def flush(self):
        if "_writer" in self.__dict__:
            self._writer.flush()


def _batch_ids(batch):
    return [x.get("image_id", x.get("file_name", "?")) for x in batch]


class NonFiniteLossGuard(nn.Module):
    """Wraps the (DDP) model for training: every worker checks its losses, and all stop together
    with a FloatingPointError naming the iteration, the non-finite terms and the image ids."""

    def __init__(self, model: nn.Module, iteration):
        super().__init__()
        self.model = model
        self._iteration = iteration  # callable: the trainer's current iteration

    def forward(self, batch):
        if not self.training:
            return self.model(batch)
        error, loss_dict = None, {}
        try:
            loss_dict = self.model(batch)
        except FloatingPointError as e:  # e.g. a matcher given non-finite predictions
            error = str(e)
        # One device sync for all terms; the per-term report only when something is wrong.
        sums = torch.stack([v.detach().float().sum() for v in loss_dict.values()]) if loss_dict else None
        local_bad = error is not None or (sums is not None and not bool(torch.isfinite(sums).all()))
        if all_ranks_any(local_bad):
            bad = {k: float(v.detach().float().sum()) for k, v in loss_dict.items() if not torch.isfinite(v).all()}
            reports = comm.all_gather({"rank": comm.get_rank(), "error": error, "bad": bad, "ids": _batch_ids(batch)})
            lines = []
            for r in reports:
                if r["error"] or r["bad"]:
                    what = r["error"] or ", ".join(f"{k}={v}" for k, v in sorted(r["bad"].items()))
                    lines.append(f"  worker {r['rank']}, image ids {r['ids']}: {what}")
            raise FloatingPointError(
                f"Non-finite training values at iteration {self._iteration()}; training stopped, the last "
                f"checkpoint is kept:\n" + "\n".join(lines)
            )
        return loss_dict


class FiniteWeightsBeforeCheckpoint(hooks.HookBase):
    """Before each checkpoint (every `period` iterations and after the last), every worker checks
    that the model's weights are finite; if any worker's are not, all stop with the checkpointer's
    FloatingPointError (the weights named), so no worker waits for the others and the diverged
    model is never saved: `last_checkpoint` keeps naming the previous checkpoint. Place it before
    the checkpointer."""

    def __init__(self, checkpointer, period: int, file_prefix: str = "model"):
        self.checkpointer = checkpointer
        self.period = period
        self.file_prefix = file_prefix

    def after_step(self):
        iteration, last = self.trainer.iter, self.trainer.iter >= self.trainer.max_iter - 1
        if (iteration + 1) % self.period and not last:
            return
        local_bad = bool(non_finite_tensors(self.checkpointer.model.state_dict().items()))
        if all_ranks_any(local_bad):
            name = f"{self.file_prefix}_final.pth" if last else f"{self.file_prefix}_{iteration:07d}.pth"
            self.checkpointer.check_finite_before_save(name, iteration)
            raise FloatingPointError(
                f"Not saving {name}: another worker's weights are not finite after iteration {iteration}; "
                f"training stopped"
            )


class EarlyPeriodicWriter(hooks.PeriodicWriter):
    """detectron2's PeriodicWriter (every `period` iterations and after the last one) that, during the
    first `period` iterations of a run, also writes whenever `early_seconds` have passed since the
    start or its last write: with a period of 20 and a minute per iteration (a COCO model on a CPU)
    the first losses and ETA would otherwise appear after 20 minutes. Each write covers the
    iterations since the previous one, so metrics.json holds every written iteration once, in order."""

    def __init__(self, writers, period: int = 20, early_seconds: float = 10.0, clock=time.perf_counter):
        super().__init__(writers, period=period)
        self._early_seconds = early_seconds
        self._clock = clock
        self._last_write = None

    def before_train(self):
        self._last_write = self._clock()

    def after_step(self):
        iteration, now = self.trainer.iter, self._clock()
        regular = (iteration + 1) % self._period == 0 or iteration == self.trainer.max_iter - 1
        early = (iteration - self.trainer.start_iter < self._period
                 and now - self._last_write >= self._early_seconds)
        if regular or early:
            for writer in self._writers:
                writer.write()
            self._last_write = now
