"""tools/profile_step.py (hybrid_detr.analysis.step_profile): every part of a training step is timed, the op's
share measured; the step is the trainer's (hybrid_detr.analysis.training_step)."""
import copy
import time

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from hybrid_detr.analysis import step_profile as profile_step
from hybrid_detr.analysis.training_step import TrainingStep
from hybrid_detr.engine import build_optimizer
from hybrid_detr.engine.mixed_precision import build_step_runner
from model_helpers import synthetic_batch, tiny_cfg


class _Sleeps(torch.nn.Module):
    def __init__(self, seconds, inner=None):
        super().__init__()
        self.seconds, self.inner = seconds, inner

    def forward(self, x):
        time.sleep(self.seconds)
        return self.inner(x) if self.inner is not None else x


def test_part_timer_times_each_call_and_nested_parts_in_both():
    inner = _Sleeps(0.03)
    outer = _Sleeps(0.02, inner)
    timer = profile_step.PartTimer()
    timer.watch(outer, "outer")
    timer.watch(inner, "inner")
    for _ in range(2):
        outer(torch.zeros(1))
    timer.remove()
    outer(torch.zeros(1))  # no longer timed
    assert timer.calls == {"outer": 2, "inner": 2}
    assert 0.06 <= timer.seconds["inner"] < 0.06 + 0.05
    assert 0.10 <= timer.seconds["outer"] < 0.10 + 0.05  # its own sleep and the inner part's


def test_parts_of_a_dac_step_are_timed():
    cfg = tiny_cfg(DECODER_MODE="dac")
    result = profile_step.profile_steps(cfg, [(synthetic_batch(), 0.25)] * 2, warmup=1)
    parts = result["parts_s"]
    for name in ["backbone", "neck", "encoder", "query selection", "decoder passes", "one-to-one matcher",
                 "losses", "backward", "optimizer step", "branch dac (incl. its decoder pass)", "branch dac matcher"]:
        assert parts[name] > 0, name
    assert parts["data loading"] == 0.25  # the batch's load time, counted in the step
    # Parts that do not contain one another fit in the step; the branch contains its decoder pass.
    disjoint = ["data loading", "backbone", "neck", "encoder", "query selection", "decoder passes",
                "one-to-one matcher", "branch dac matcher", "backward", "optimizer step"]
    assert sum(parts[k] for k in disjoint) <= result["step_s"]
    assert parts["branch dac (incl. its decoder pass)"] > parts["branch dac matcher"]
    assert 0 < result["op_s"] < parts["encoder"] + parts["decoder passes"] + parts["backward"]
    text = profile_step.format_profile(result)
    assert f"{result['op_s'] * 1e3:>10.1f}{result['op_s'] / result['step_s']:>9.1%}" in text
    assert f"{'data loading':<42}{250.0:>10.1f}" in text


def test_conv_flops_follow_detectron2s_convention():
    conv = torch.nn.Conv2d(3, 8, kernel_size=3, padding=1, bias=False)
    # 8 outputs x 3 inputs x 3 x 3 taps per pixel, 2 images of 5 x 7 pixels: one FLOP per multiply-add.
    assert profile_step.backbone_conv_flops(conv, (2, 3, 5, 7)) == (8 * 3 * 9) * (2 * 5 * 7)
    # the same count as detectron2's own FlopCountAnalysis (what tools/analyze_model.py reports)
    from detectron2.utils.analysis import FlopCountAnalysis

    counted = FlopCountAnalysis(conv, torch.zeros(2, 3, 5, 7)).by_operator()["conv"]
    assert profile_step.backbone_conv_flops(conv, (2, 3, 5, 7)) == counted


def test_matmul_rate_counts_one_flop_per_multiply_add(monkeypatch):
    # a matmul that takes exactly 1 s: n^3 multiply-adds per second
    clock = iter([0.0, 1.0] * 3)
    monkeypatch.setattr(profile_step.time, "perf_counter", lambda: next(clock))
    assert profile_step.matmul_flops_per_s(size=64, repeats=3) == 64**3


def test_the_convolutions_are_timed_and_set_against_a_matmul():
    cfg = tiny_cfg()
    result = profile_step.profile_steps(cfg, [(synthetic_batch(), 0.0)] * 2, warmup=1)
    assert result["conv_forward_flops"] > 0 and result["matmul_flops_per_s"] > 0
    assert 0 < result["conv_forward_s"] < result["conv_s"] < result["step_s"]
    assert "GFLOP/s" in profile_step.format_profile(result)


def test_matmuls_padding_and_the_dense_bound_are_reported():
    cfg = tiny_cfg()
    batch = synthetic_batch()  # 96 x 128 and 80 x 100 pixels: the second is padded to 96 x 128
    result = profile_step.profile_steps(cfg, [(batch, 0.0)] * 2, warmup=1)
    assert 0 < result["matmul_s"] < result["step_s"]
    assert 0 < result["conv_s"] + result["matmul_s"] < result["step_s"]
    assert abs(result["padding_share"] - (1 - (96 * 128 + 80 * 100) / (2 * 96 * 128))) < 1e-9
    text = profile_step.format_profile(result)
    assert "matrix multiplies" in text and "at most" in text and "padding: 17.4%" in text


def _the_trainers_step_and_ours(cfg, steps=2):
    """The weights after `steps` steps of the trainer's own step runner, and after as many of TrainingStep,
    from the same model on the same batches."""
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True  # the trainer's full-model clipping (unscaled first under AMP)
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE, cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = "full_model", 0.1
    cfg.freeze()
    torch.manual_seed(0)
    theirs = build_model(cfg).train()
    ours = copy.deepcopy(theirs)
    batches = [synthetic_batch() for _ in range(steps)]
    runner = build_step_runner(cfg, theirs, batches, build_optimizer(cfg, theirs))
    step = TrainingStep(cfg, ours)
    with EventStorage():
        for batch in batches:
            runner.run_step()
            step(batch)
    return theirs, ours, runner, step


@pytest.mark.parametrize("amp", [False, True])
def test_the_step_is_the_trainers_step(amp):
    # On the CPU, SOLVER.AMP is the trainer's bfloat16 autocast without a GradScaler.
    cfg = tiny_cfg()
    cfg.SOLVER.AMP.ENABLED = amp
    theirs, ours, _, step = _the_trainers_step_and_ours(cfg)
    assert step.grad_scaler is None
    for (name, a), b in zip(theirs.state_dict().items(), ours.state_dict().values()):
        assert torch.equal(a, b), name


def test_amp_is_honoured():
    cfg = tiny_cfg()
    cfg.SOLVER.AMP.ENABLED = True
    cfg.freeze()
    torch.manual_seed(0)
    model = build_model(cfg).train()
    dtypes = []
    model.neck.register_forward_hook(lambda _m, _args, out: dtypes.append(out[0][0].dtype))  # the first level's map
    with EventStorage():
        _, loss = TrainingStep(cfg, model).forward(synthetic_batch())
    assert dtypes == [torch.bfloat16] and loss.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_the_step_is_the_trainers_step_with_its_grad_scaler_on_cuda():
    cfg = tiny_cfg()
    cfg.MODEL.DEVICE = "cuda"
    cfg.SOLVER.AMP.ENABLED = True
    theirs, ours, runner, step = _the_trainers_step_and_ours(cfg)
    assert step.grad_scaler is not None and step.grad_scaler.get_scale() == runner.grad_scaler.get_scale()
    for (name, a), b in zip(theirs.state_dict().items(), ours.state_dict().values()):  # the op's backward adds atomically
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), name
