"""tools/compare_step_cost.py (hybrid_detr.analysis.step_cost): per-mode config overrides ("MODE@KEY=VALUE") and
side-by-side steps."""
import statistics

import pytest
import torch

from hybrid_detr.analysis import step_cost as compare_step_cost
from model_helpers import synthetic_batch, tiny_cfg

mode_config = compare_step_cost.mode_config


def test_mode_config_applies_the_mode_and_its_overrides():
    cfg = tiny_cfg()
    cfg.freeze()
    k1 = mode_config(cfg, "co_detr@MODEL.HYBRID_DETR.CO_DETR.NUM_AUX_HEADS=1@MODEL.HYBRID_DETR.CO_DETR.LAMBDA2=3.0")
    assert k1.MODEL.HYBRID_DETR.DECODER_MODE == "co_detr"
    assert k1.MODEL.HYBRID_DETR.CO_DETR.NUM_AUX_HEADS == 1 and k1.MODEL.HYBRID_DETR.CO_DETR.LAMBDA2 == 3.0
    assert cfg.MODEL.HYBRID_DETR.DECODER_MODE == "deformable"  # the shared config is untouched
    with pytest.raises(ValueError, match="KEY=VALUE"):
        mode_config(cfg, "co_detr@MODEL.HYBRID_DETR.CO_DETR.NUM_AUX_HEADS")
    with pytest.raises(KeyError, match="MODEL.HYBRID_DETR.CO_DETR.NUM_AUX_HEAD .*did you mean MODEL.HYBRID_DETR.CO_DETR.NUM_AUX_HEADS"):
        mode_config(cfg, "co_detr@MODEL.HYBRID_DETR.CO_DETR.NUM_AUX_HEAD=1")


def test_variants_of_one_mode_run_side_by_side():
    cfg = tiny_cfg()
    cfg.freeze()
    modes = ["deformable", "deformable@MODEL.HYBRID_DETR.DEC_LAYERS=1"]
    result = compare_step_cost.compare_step_cost(cfg, modes, iters=1, warmup=0, batches=[synthetic_batch()])
    full, shallow = (result["modes"][m] for m in modes)
    assert shallow["parameters"] < full["parameters"]
    assert shallow["saved_for_backward_mib"] < full["saved_for_backward_mib"]
    assert modes[1] in compare_step_cost.format_step_cost(result)


def test_dac_and_baseline_run_on_the_same_weights():
    cfg = tiny_cfg()
    cfg.freeze()
    models, shared = compare_step_cost.build_mode_models(cfg, ["deformable", "dac", "co_detr"])
    base_state = models["deformable"][1].state_dict()
    # DAC adds no parameter: every one of its tensors is the baseline's, value for value.
    dac_params = dict(models["dac"][1].named_parameters())
    assert shared["dac"] == len(dac_params) == len(list(models["deformable"][1].parameters()))
    assert all(torch.equal(p, base_state[name]) for name, p in dac_params.items())
    # Co-DETR adds its heads (not from the baseline, drawn from the same seed); the shared parts are the baseline's.
    co_params = dict(models["co_detr"][1].named_parameters())
    assert 0 < shared["co_detr"] < len(co_params)
    assert shared["co_detr"] == sum(1 for name in co_params if name in base_state)
    assert all(torch.equal(p, base_state[name]) for name, p in co_params.items() if name in base_state)

    result = compare_step_cost.compare_step_cost(cfg, ["deformable", "dac"], iters=2, warmup=0,
                                                 batches=[synthetic_batch()] * 2)
    base, dac = result["modes"]["deformable"], result["modes"]["dac"]
    assert dac["parameters"] == base["parameters"]
    assert len(dac["step_times_s"]) == 2
    assert dac["step_time_ratio"] == statistics.median(dac["step_times_s"]) / statistics.median(base["step_times_s"])
    # Same start, same batches: DAC's loss adds its C-decoder's losses to the one-to-one losses (about doubling them).
    assert dac["loss_mean"] > base["loss_mean"] > 0
    # The C pass keeps its own activations for backward.
    assert dac["saved_for_backward_mib"] > base["saved_for_backward_mib"] > 0
    assert dac["saved_for_backward_ratio"] == pytest.approx(dac["saved_for_backward_mib"] / base["saved_for_backward_mib"])
    row = next(line for line in compare_step_cost.format_step_cost(result).splitlines() if line.startswith("dac "))
    assert f"{dac['step_time_s_median'] * 1e3:.1f}" in row and f"{dac['saved_for_backward_mib']:.1f}" in row


def test_amp_mode_runs_under_the_trainers_autocast():
    # Under autocast the step saves other tensors for backward (bfloat16 activations and weight copies).
    cfg = tiny_cfg()
    cfg.freeze()
    modes = ["deformable", "deformable@SOLVER.AMP.ENABLED=True"]
    result = compare_step_cost.compare_step_cost(cfg, modes, iters=1, warmup=0, batches=[synthetic_batch()])
    fp32, bf16 = (result["modes"][m] for m in modes)
    assert bf16["parameters"] == fp32["parameters"]
    assert abs(bf16["saved_for_backward_mib"] - fp32["saved_for_backward_mib"]) > 0.05 * fp32["saved_for_backward_mib"]
