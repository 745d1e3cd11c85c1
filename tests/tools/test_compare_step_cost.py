"""tools/compare_step_cost.py (hybrid_detr.analysis.step_cost): per-mode config overrides ("MODE@KEY=VALUE") and
side-by-side steps."""
import pytest

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
    result = compare_step_cost.compare_step_cost(cfg, ["deformable", "dac"], iters=1, warmup=0, batches=[synthetic_batch()])
    base, dac = result["modes"]["deformable"], result["modes"]["dac"]
    assert base["step_time_ratio"] == 1.0 and dac["step_time_ratio"] > 0
    assert dac["parameters"] == base["parameters"]
    assert dac["parameter_tensors_from_reference"] == base["parameter_tensors_from_reference"]
    # The C pass keeps its own activations for backward.
    assert dac["saved_for_backward_mib"] > base["saved_for_backward_mib"] > 0
    assert "dac" in compare_step_cost.format_step_cost(result)


def test_amp_mode_runs_under_the_trainers_autocast():
    # Under autocast the step saves other tensors for backward (bfloat16 activations and weight copies).
    cfg = tiny_cfg()
    cfg.freeze()
    modes = ["deformable", "deformable@SOLVER.AMP.ENABLED=True"]
    result = compare_step_cost.compare_step_cost(cfg, modes, iters=1, warmup=0, batches=[synthetic_batch()])
    fp32, bf16 = (result["modes"][m] for m in modes)
    assert bf16["parameters"] == fp32["parameters"]
    assert abs(bf16["saved_for_backward_mib"] - fp32["saved_for_backward_mib"]) > 0.05 * fp32["saved_for_backward_mib"]
