"""Training cost of several decoder modes side by side, in one run.

    python3 tools/compare_step_cost.py --config-file CONFIG --modes deformable dac smca co_detr \
        [--iters 20] [--warmup 3] [--device cpu|cuda] [--output result.json] [KEY VALUE ...]

A mode may carry its own config overrides after "@", as KEY=VALUE pairs joined by "@", so that
variants of one mode run side by side:
    --modes deformable co_detr@MODEL.HYBRID_DETR.CO_DETR.NUM_AUX_HEADS=1 co_detr@MODEL.HYBRID_DETR.CO_DETR.NUM_AUX_HEADS=2

Every mode's model is built from the same config (only DECODER_MODE and a mode's own overrides differ), from
the same seed, then given the first mode's weights wherever a parameter has the same name and shape
(so shared parts start identical). The same training batches (the config's training set through
DETR's mapper) go through every model, one full training step each (forward, losses, backward,
optimizer step with the config's gradient clipping); the modes take turns within each iteration, in
a rotating order, so that a slow-down of the machine hits every mode alike. The first `--warmup`
iterations are not counted.

Reported per mode, and as a ratio to the first mode:
- step time: median (and mean) over the counted iterations;
- saved for backward: the largest amount of tensor memory a step's autograd graph holds for
  backward (activations), unique storages, parameters excluded. Measured the same way on every
  device, through autograd's saved-tensor hooks;
- peak memory (CUDA only): the allocator's peak during a step above what was allocated before it,
  plus the model's parameters and optimizer state: the memory the step would need alone.
A mode with SOLVER.AMP.ENABLED runs its forward under the trainer's autocast (bfloat16 on the CPU;
on CUDA float16 without the trainer's loss scaler, which changes nothing of the step's cost).
"""
import argparse
import json
import logging
import os
import statistics
import sys
import time
from typing import Dict, List

# Run from a checkout without installing: the package lives in projects/HybridDETR.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "projects", "HybridDETR"))

import torch  # noqa: E402
from detectron2.data import build_detection_train_loader  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

from hybrid_detr.config import load_config, merge_overrides, mode_spec_overrides  # noqa: E402
from hybrid_detr.data import DetrDatasetMapper, ensure_synthetic_dataset  # noqa: E402
from hybrid_detr.engine import build_optimizer  # noqa: E402
from hybrid_detr.engine.mixed_precision import autocast_context  # noqa: E402

logger = logging.getLogger(__name__)

__all__ = ["SavedTensorMeter", "build_mode_models", "compare_step_cost", "format_step_cost", "main"]

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
    """The config of one `--modes` entry: "MODE" or "MODE@KEY=VALUE@KEY=VALUE"."""
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


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_batches(cfg, count: int):
    """`count` batches of the config's training set through DETR's training mapper."""
    for name in cfg.DATASETS.TRAIN:
        ensure_synthetic_dataset(name)
    loader = build_detection_train_loader(cfg, mapper=DetrDatasetMapper(cfg, is_train=True))
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == count:
            break
    return batches


def compare_step_cost(cfg, modes: List[str], iters: int = 20, warmup: int = 3, seed: int = 0, batches=None):
    """Interleaved training steps of every mode on the same batches; a dict of per-mode results
    (see the module docstring), the first mode being the reference of the ratios."""
    if len(set(modes)) != len(modes) or not modes:
        raise ValueError(f"--modes must name distinct modes, got {modes}")
    if iters < 1 or warmup < 0:
        raise ValueError("iters must be >= 1 and warmup >= 0")
    models, shared = build_mode_models(cfg, modes, seed)
    device = next(iter(models.values()))[1].device
    optimizers = {mode: build_optimizer(mode_cfg, model) for mode, (mode_cfg, model) in models.items()}
    meters = {mode: SavedTensorMeter(model.parameters()) for mode, (_, model) in models.items()}
    if batches is None:
        batches = training_batches(cfg, warmup + iters)
    if len(batches) < warmup + iters:
        raise ValueError(f"need {warmup + iters} batches, got {len(batches)}")
    times = {mode: [] for mode in modes}
    saved = {mode: 0 for mode in modes}
    peak = {mode: 0 for mode in modes}
    losses = {mode: [] for mode in modes}
    for it in range(warmup + iters):
        order = modes[it % len(modes):] + modes[: it % len(modes)]
        for mode in order:
            model, optimizer = models[mode][1], optimizers[mode]
            optimizer.zero_grad(set_to_none=True)
            _synchronize(device)
            if device.type == "cuda":
                before = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            with meters[mode], autocast_context(models[mode][0]):
                loss_dict = model(batches[it])
            loss = sum(loss_dict.values())
            loss.backward()
            optimizer.step()
            _synchronize(device)
            elapsed = time.perf_counter() - start
            if not torch.isfinite(loss):
                raise FloatingPointError(f"mode {mode!r}: loss is {loss.item()} at iteration {it}")
            if it >= warmup:
                times[mode].append(elapsed)
                losses[mode].append(loss.item())
                saved[mode] = max(saved[mode], meters[mode].nbytes)
                if device.type == "cuda":
                    step_peak = torch.cuda.max_memory_allocated(device) - before
                    peak[mode] = max(peak[mode], step_peak + _state_bytes(model, optimizer))
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
        if device.type == "cuda":
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--modes", nargs="+", required=True, help="DECODER_MODE values, each optionally with @KEY=VALUE overrides; the first is the reference")
    parser.add_argument("--iters", type=int, default=20, help="counted iterations (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="uncounted first iterations (default 3)")
    parser.add_argument("--device", default=None, help="MODEL.DEVICE override (cpu, cuda)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="also write the results as JSON here")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE ...")
    args = parser.parse_args(argv)
    setup_logger(name="hybrid_detr", abbrev_name="hdetr")
    opts = list(args.opts)
    if args.device:
        opts += ["MODEL.DEVICE", args.device]
    cfg = load_config(args.config_file, opts)
    cfg.freeze()
    result = compare_step_cost(cfg, args.modes, iters=args.iters, warmup=args.warmup, seed=args.seed)
    result["config_file"] = args.config_file
    print(format_step_cost(result))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
