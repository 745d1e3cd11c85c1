"""Where a training step's time goes, part by part (behind tools/profile_step.py).

`profile_steps(cfg, batches)` runs training steps (`TrainingStep`: the trainer's optimizer, autocast and
GradScaler) of the config's model and returns, per part, the mean wall time per step: data loading,
backbone, neck, encoder, query selection, decoder passes (the one-to-one pass, and the passes each
training branch makes), each training branch (inclusive of its decoder pass), matchers, losses, backward,
optimizer step. "Data loading" is the time to fetch each batch with nothing else running, counted in the
step (in training the loader's worker prepares batches while the model runs).
Parts are timed by forward hooks on the model's modules (`PartTimer`), so nothing of the model changes;
nested parts (a branch's decoder pass) are counted in both. From torch.profiler over the same steps: the
share of our MSDeformAttn op (forward + backward), of the convolutions (forward + backward: every
convolution of the model, nearly all of them the backbone's) and of the matrix multiplies (the linear
layers: aten's mm, addmm, bmm, baddbmm). The convolutions' forward rate is the backbone's convolution
FLOPs (the neck's 1x1 projections are not counted, so the rate errs low) per second of their profiled
forward time, set against a square float32 matmul timed after every step on the same threads (a practical
ceiling). FLOPs follow detectron2 and fvcore (and tools/analyze_model.py): one FLOP is one multiply-add,
for the convolutions and the matmul alike (an n x n matmul is n^3 FLOPs); hardware peak figures that
count a multiply-add as 2 FLOPs are twice these. Also: the process's peak resident memory, and the share of the
backbone's input pixels that are padding (a batch is padded to its largest image).
"""
import collections
import time

import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from .measurement import peak_rss_bytes
from .training_step import TrainingStep

__all__ = ["PartTimer", "watch_model", "matmul_flops_per_s", "backbone_conv_flops", "profile_steps", "format_profile"]

MATMUL_SIZE = 1024
# The CPU's convolution kernels as the profiler names them (oneDNN forward, ATen's backward).
CONV_FORWARD, CONV_BACKWARD = "aten::mkldnn_convolution", "aten::convolution_backward"
# The dense matrix multiplies (linear layers, forward and backward) as the profiler names them.
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


class PartTimer:
    """Accumulates the wall time of named module calls through forward pre/post hooks."""

    def __init__(self):
        self.seconds = collections.defaultdict(float)
        self.calls = collections.defaultdict(int)
        self._start = {}
        self._handles = []

    def watch(self, module, name):
        def before(_module, _args):
            self._start.setdefault(name, []).append(time.perf_counter())

        def after(_module, _args, _out):
            self.seconds[name] += time.perf_counter() - self._start[name].pop()
            self.calls[name] += 1

        self._handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]

    def add(self, name, seconds):
        self.seconds[name] += seconds
        self.calls[name] += 1

    def remove(self):
        for handle in self._handles:
            handle.remove()


def watch_model(timer, model):
    """Times the parts of a HybridDETR model with `timer`."""
    timer.watch(model.backbone, "backbone")
    timer.watch(model.neck, "neck")
    timer.watch(model.encoder, "encoder")
    timer.watch(model.query_source, "query selection")
    timer.watch(model.decoder, "decoder passes")
    timer.watch(model.matcher, "one-to-one matcher")
    timer.watch(model.criterion, "losses")
    for name, branch in model.branches.items():
        timer.watch(branch, f"branch {name} (incl. its decoder pass)")
        matcher = getattr(branch, "matcher", None)
        if isinstance(matcher, torch.nn.Module):
            timer.watch(matcher, f"branch {name} matcher")


def matmul_flops_per_s(size=MATMUL_SIZE, repeats=3):
    """The best of `repeats` timings of one size x size float32 matmul, in FLOP/s (one FLOP = one
    multiply-add, detectron2's convention: size^3 per matmul)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return size**3 / best


def backbone_conv_flops(backbone, image_shape):
    """FLOPs of the convolutions of one backbone forward on a batch of `image_shape`: fvcore's count, one
    FLOP per multiply-add (detectron2's convention)."""
    from fvcore.nn import FlopCountAnalysis

    with torch.no_grad():
        count = FlopCountAnalysis(backbone, torch.zeros(image_shape))
        count.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        return float(count.by_operator().get("conv", 0))


def profile_steps(cfg, batches, warmup=1):
    """Time the parts over len(batches) - warmup training steps; `batches` holds (batch, load seconds)
    pairs (`training_batches`). Returns a dict."""
    torch.manual_seed(cfg.SEED if cfg.SEED >= 0 else 0)
    model = build_model(cfg).train()
    step = TrainingStep(cfg, model)
    timer = PartTimer()
    watch_model(timer, model)
    image_shapes = []  # the backbone's input per forward, its FLOPs counted after the timed steps
    image_pixels, padded_pixels = 0, 0
    shape_hook = model.backbone.register_forward_pre_hook(lambda _m, args: image_shapes.append(tuple(args[0].shape)))
    matmul_rates = []
    steps = len(batches) - warmup
    if steps < 1:
        raise ValueError("need more batches than warm-up steps")
    op_seconds, conv_forward_seconds, conv_seconds, matmul_seconds, total = 0.0, 0.0, 0.0, 0.0, 0.0
    with EventStorage():
        for i, (batch, load_seconds) in enumerate(batches):
            if i == warmup:
                timer.seconds.clear()
                timer.calls.clear()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                start = time.perf_counter()
                _, loss = step.forward(batch)
                t0 = time.perf_counter()
                step.backward(loss)
                t1 = time.perf_counter()
                step.optimizer_step()
                t2 = time.perf_counter()
            if i >= warmup:
                matmul_rates.append(matmul_flops_per_s())
                timer.add("backward", t1 - t0)
                timer.add("optimizer step", t2 - t1)
                timer.add("data loading", load_seconds)
                total += t2 - start + load_seconds
                averages = prof.key_averages()
                op_seconds += sum(
                    e.cpu_time_total for e in averages if "ms_deform_attn" in e.key and "::" in e.key
                ) / 1e6
                events = {e.key: e.self_cpu_time_total / 1e6 for e in averages}
                conv_forward_seconds += events.get(CONV_FORWARD, 0.0)
                conv_seconds += events.get(CONV_FORWARD, 0.0) + events.get(CONV_BACKWARD, 0.0)
                matmul_seconds += sum(events.get(name, 0.0) for name in MATMULS)
                n, _, padded_h, padded_w = image_shapes[-1]
                image_pixels += sum(x["image"].shape[-2] * x["image"].shape[-1] for x in batch)
                padded_pixels += n * padded_h * padded_w
    timer.remove()
    shape_hook.remove()
    # Batches of one image size share a count: trace each size once.
    shape_counts = collections.Counter(image_shapes[-steps:])
    conv_flops = sum(n * backbone_conv_flops(model.backbone, shape) for shape, n in shape_counts.items())
    return {
        "steps": steps,
        "step_s": total / steps,
        "parts_s": {name: seconds / steps for name, seconds in timer.seconds.items()},
        "op_s": op_seconds / steps,
        "conv_s": conv_seconds / steps,
        "conv_forward_s": conv_forward_seconds / steps,
        "conv_forward_flops": conv_flops / steps,
        "matmul_s": matmul_seconds / steps,
        "padding_share": 1.0 - image_pixels / padded_pixels,
        "matmul_flops_per_s": sorted(matmul_rates)[len(matmul_rates) // 2],
        "peak_rss_mib": peak_rss_bytes() / 2**20,
        "threads": torch.get_num_threads(),
    }


def format_profile(result, title=""):
    step = result["step_s"]
    lines = [
        f"{title}Training step: {step * 1e3:.0f} ms mean over {result['steps']} steps, {result['threads']} threads; "
        f"peak resident memory {result['peak_rss_mib']:.0f} MiB",
        f"{'part':<42}{'ms/step':>10}{'share':>9}",
    ]
    for name, seconds in sorted(result["parts_s"].items(), key=lambda kv: -kv[1]):
        lines.append(f"{name:<42}{seconds * 1e3:>10.1f}{seconds / step:>9.1%}")
    lines.append(f"{'our MSDeformAttn op (fwd + bwd, profiler)':<42}{result['op_s'] * 1e3:>10.1f}{result['op_s'] / step:>9.1%}")
    lines.append(f"{'convolutions (fwd + bwd, profiler)':<42}{result['conv_s'] * 1e3:>10.1f}{result['conv_s'] / step:>9.1%}")
    if result["conv_forward_s"] > 0 and result["conv_forward_flops"] > 0:
        rate, ceiling = result["conv_forward_flops"] / result["conv_forward_s"], result["matmul_flops_per_s"]
        lines.append(
            f"convolution forward: {result['conv_forward_flops'] / 1e9:.2f} GFLOP per step at {rate / 1e9:.1f} GFLOP/s, "
            f"{rate / ceiling:.0%} of a {MATMUL_SIZE}x{MATMUL_SIZE} float32 matmul on the same threads "
            f"({ceiling / 1e9:.1f} GFLOP/s, median over the steps); 1 FLOP = 1 multiply-add (detectron2/fvcore)"
        )
    lines.append(f"{'matrix multiplies (fwd + bwd, profiler)':<42}{result['matmul_s'] * 1e3:>10.1f}{result['matmul_s'] / step:>9.1%}")
    dense = (result["conv_s"] + result["matmul_s"]) / step
    lines.append(
        f"convolutions + matrix multiplies: {dense:.0%} of the step; with every other part free, a step would be at "
        f"most {1 / dense:.2f}x faster at these rates"
    )
    lines.append(f"padding: {result['padding_share']:.1%} of the backbone's input pixels (each batch padded to its largest image)")
    return "\n".join(lines)
