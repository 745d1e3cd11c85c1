"""Training cost of several decoder modes side by side, in one run (behind tools/compare_step_cost.py).

A mode is given as "MODE" or "MODE@KEY=VALUE@KEY=VALUE" (its own config overrides), so that variants of
one mode run side by side. Every mode's model is built from the same config (only DECODER_MODE and a
mode's own overrides differ), from the same seed, then given the first mode's weights wherever a
parameter has the same name and shape (so shared parts start identical). The same training batches (the
trainer's own training loader, `training_batches`) go through every model, one full training step each
as the trainer takes it (`TrainingStep`: forward, losses, backward, optimizer step with the config's
gradient clipping; with SOLVER.AMP.ENABLED the trainer's autocast, and on CUDA its GradScaler); the
modes take turns within each iteration, in a rotating order, so that a slow-down of the machine hits
every mode alike. The first `warmup` iterations are not counted.

Reported per mode, and as a ratio to the first mode:
- step time: median (and mean) over the counted iterations;
- saved for backward: the largest amount of tensor memory a step's autograd graph holds for
  backward (activations), unique storages, parameters excluded. Measured the same way on every
  device, through autograd's saved-tensor hooks (`SavedTensorMeter`);
- peak memory (CUDA only): the allocator's peak during a step above what was allocated before it,
  plus the model's parameters and optimizer state: the memory the step would need alone.
"""
import contextlib
import statistics
import time
from typing import Dict, List

import torch
from detectron2.modeling import build_model

from ..config import merge_overrides, mode_spec_overrides
from .measurement import PeakMemory, synchronize
from .training_step import TrainingStep, training_batches

__all__ = ["SavedTensorMeter", "mode_config", "build_mode_models", "compare_step_cost", "format_step_cost"]

MIB = 1024.0**2


class SavedTensorMeter:
    """Bytes of the distinct tensor storages autograd saves for backward while active, leaving out
    the storages of `exclude` (the parameters, resident anyway)."""

    def __init__(self, exclude=()):
        self.exclude = {p.untyped_storage().data_ptr() for p in exclude}
        self.storages: Dict[int, int] = {}

    def _pack(self, tensor):
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self.exclude:
            self.storages[ptr] = max(self.storages.get(ptr, 0), storage.nbytes())
        return tensor

    def __enter__(self):
        self.storages.clear()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        return False

    @property
    def nbytes(self):
        return sum(self.storages.values())


def _state_bytes(model, optimizer):
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for state in optimizer.state.values():
        total += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
    return total


def mode_config(cfg, spec: str):
    """The config of one mode entry: "MODE" or "MODE@KEY=VALUE@KEY=VALUE"."""
    mode_cfg = cfg.clone()
    mode_cfg.defrost()
    merge_overrides(mode_cfg, mode_spec_overrides(spec))
    mode_cfg.freeze()
    return mode_cfg


def build_mode_models(cfg, modes: List[str], seed: int = 0):
    """{mode: (cfg, model)} in training mode; later modes load the first one's weights wherever a
    parameter or buffer has the same name and shape. Also returns, per mode, how many parameter
    tensors came from the first model."""
    models, shared = {}, {}
    reference = None
    for mode in modes:
        mode_cfg = mode_config(cfg, mode)
        torch.manual_seed(seed)
        model = build_model(mode_cfg)
        model.train()
        if reference is None:
            reference = {k: v.detach().clone() for k, v in model.state_dict().items()}
            shared[mode] = len(list(model.parameters()))
        else:
            own = model.state_dict()
            common = {k: v for k, v in reference.items() if k in own and own[k].shape == v.shape}
            model.load_state_dict(common, strict=False)
            shared[mode] = sum(1 for name, _ in model.named_parameters() if name in common)
        models[mode] = (mode_cfg, model)
    return models, shared


def compare_step_cost(cfg, modes: List[str], iters: int = 20, warmup: int = 3, seed: int = 0, batches=None):
    """Interleaved training steps of every mode on the same batches (default: `warmup + iters` batches of
    the trainer's loader); a dict of per-mode results (see the module docstring), the first mode being the
    reference of the ratios."""
    if len(set(modes)) != len(modes) or not modes:
        raise ValueError(f"--modes must name distinct modes, got {modes}")
    if iters < 1 or warmup < 0:
        raise ValueError("iters must be >= 1 and warmup >= 0")
    models, shared = build_mode_models(cfg, modes, seed)
    device = next(iter(models.values()))[1].device
    steps = {mode: TrainingStep(mode_cfg, model) for mode, (mode_cfg, model) in models.items()}
    meters = {mode: SavedTensorMeter(model.parameters()) for mode, (_, model) in models.items()}
    if batches is None:
        batches = [batch for batch, _ in training_batches(cfg, warmup + iters)]
    if len(batches) < warmup + iters:
        raise ValueError(f"need {warmup + iters} batches, got {len(batches)}")
    cuda = device.type == "cuda"
    times = {mode: [] for mode in modes}
    saved = {mode: 0 for mode in modes}
    peak = {mode: 0 for mode in modes}
    losses = {mode: [] for mode in modes}
    for it in range(warmup + iters):
        order = modes[it % len(modes):] + modes[: it % len(modes)]
        for mode in order:
            step = steps[mode]
            memory = PeakMemory(device)
            with memory if cuda else contextlib.nullcontext():
                synchronize(device)
                start = time.perf_counter()
                with meters[mode]:
                    _, loss = step.forward(batches[it])
                step.backward(loss)
                step.optimizer_step()
                synchronize(device)
                elapsed = time.perf_counter() - start
            if not torch.isfinite(loss):
                raise FloatingPointError(f"mode {mode!r}: loss is {loss.item()} at iteration {it}")
            if it >= warmup:
                times[mode].append(elapsed)
                losses[mode].append(loss.item())
                saved[mode] = max(saved[mode], meters[mode].nbytes)
                if cuda:
                    peak[mode] = max(peak[mode], memory.bytes + _state_bytes(step.model, step.optimizer))
    first = modes[0]
    result = {
        "device": str(device),
        "iters": iters,
        "warmup": warmup,
        "images_per_batch": len(batches[0]),
        "reference_mode": first,
        "modes": {},
    }
    for mode in modes:
        median = statistics.median(times[mode])
        entry = {
            "step_time_s_median": median,
            "step_time_s_mean": statistics.fmean(times[mode]),
            "step_time_ratio": median / statistics.median(times[first]),
            "saved_for_backward_mib": saved[mode] / MIB,
            "saved_for_backward_ratio": saved[mode] / max(saved[first], 1),
            "parameters": sum(p.numel() for p in models[mode][1].parameters()),
            "parameter_tensors_from_reference": shared[mode],
            "loss_mean": statistics.fmean(losses[mode]),
            "step_times_s": times[mode],
        }
        if cuda:
            entry["peak_memory_mib"] = peak[mode] / MIB
            entry["peak_memory_ratio"] = peak[mode] / max(peak[first], 1)
        result["modes"][mode] = entry
    return result


def format_step_cost(result) -> str:
    cuda = result["device"].startswith("cuda")
    width = max(14, 2 + max(len(mode) for mode in result["modes"]))
    header = f"{'mode':<{width}}{'step ms (median)':>18}{'ratio':>8}{'mean ms':>10}{'saved-for-bwd MiB':>19}{'ratio':>8}"
    if cuda:
        header += f"{'peak MiB':>10}{'ratio':>8}"
    lines = [
        f"Training step per mode on {result['device']}: {result['iters']} iterations after {result['warmup']} "
        f"warm-up, {result['images_per_batch']} images per batch, ratios vs {result['reference_mode']!r}",
        header,
    ]
    for mode, e in result["modes"].items():
        line = (
            f"{mode:<{width}}{e['step_time_s_median'] * 1e3:>18.1f}{e['step_time_ratio']:>8.2f}"
            f"{e['step_time_s_mean'] * 1e3:>10.1f}{e['saved_for_backward_mib']:>19.1f}{e['saved_for_backward_ratio']:>8.2f}"
        )
        if cuda:
            line += f"{e['peak_memory_mib']:>10.1f}{e['peak_memory_ratio']:>8.2f}"
        lines.append(line)
    return "\n".join(lines)
