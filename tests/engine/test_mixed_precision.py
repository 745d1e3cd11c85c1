"""SOLVER.AMP on the CPU: bfloat16 autocast for the network, float32 losses, weights and gradients."""
import pytest
import torch
from detectron2.engine import SimpleTrainer
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from hybrid_detr.engine.mixed_precision import AutocastModel, amp_dtype, build_step_runner
from model_helpers import synthetic_batch, tiny_cfg


def test_precision_choice():
    cfg = tiny_cfg()
    assert amp_dtype(cfg) == torch.bfloat16  # auto on the CPU
    cfg.SOLVER.AMP.PRECISION = "float16"
    with pytest.raises(ValueError, match="'float16' is not supported on the CPU"):
        amp_dtype(cfg)
    cfg.SOLVER.AMP.PRECISION = "half"
    with pytest.raises(ValueError, match="SOLVER.AMP.PRECISION"):
        amp_dtype(cfg)


@pytest.mark.parametrize("mode", ["deformable", "dac", "co_detr"])
def test_cpu_bfloat16_step(mode):
    cfg = tiny_cfg(DECODER_MODE=mode)
    cfg.SOLVER.AMP.ENABLED = True
    torch.manual_seed(0)
    model = build_model(cfg).train()
    seen = {}
    model.neck.register_forward_hook(lambda m, args, out: seen.update(neck=out[0][0].dtype))
    runner = build_step_runner(cfg, model, iter([]), torch.optim.SGD(model.parameters(), lr=0.0))
    assert isinstance(runner, SimpleTrainer) and isinstance(runner.model, AutocastModel)
    with EventStorage():
        losses = runner.model(synthetic_batch())
    assert seen["neck"] == torch.bfloat16  # the convolutions ran in bfloat16
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 for g in grads)
