"""mode_benchmark's per-mode config overrides ("MODE@KEY=VALUE")."""
import pytest

from hybrid_detr.engine.mode_benchmark import benchmark_modes, format_mode_benchmark, mode_config
from model_helpers import synthetic_batch, tiny_cfg


def test_mode_config_applies_the_mode_and_its_overrides():
    cfg = tiny_cfg()
    cfg.freeze()
    k1 = mode_config(cfg, "co_detr@MODEL.HYBRID_DETR.CO_DETR.NUM_AUX_HEADS=1@MODEL.HYBRID_DETR.CO_DETR.LAMBDA2=3.0")
    assert k1.MODEL.HYBRID_DETR.DECODER_MODE == "co_detr"
    assert k1.MODEL.HYBRID_DETR.CO_DETR.NUM_AUX_HEADS == 1 and k1.MODEL.HYBRID_DETR.CO_DETR.LAMBDA2 == 3.0
    assert cfg.MODEL.HYBRID_DETR.DECODER_MODE == "deformable"  # the shared config is untouched
    with pytest.raises(ValueError, match="KEY=VALUE"):
        mode_config(cfg, "co_detr@MODEL.HYBRID_DETR.CO_DETR.NUM_AUX_HEADS")
    with pytest.raises(AssertionError, match="Non-existent key: MODEL.HYBRID_DETR.CO_DETR.NUM_AUX_HEAD"):
        mode_config(cfg, "co_detr@MODEL.HYBRID_DETR.CO_DETR.NUM_AUX_HEAD=1")


def test_variants_of_one_mode_run_side_by_side():
    cfg = tiny_cfg()
    cfg.freeze()
    modes = ["deformable", "deformable@MODEL.HYBRID_DETR.DEC_LAYERS=1"]
    result = benchmark_modes(cfg, modes, iters=1, warmup=0, batches=[synthetic_batch()])
    full, shallow = (result["modes"][m] for m in modes)
    assert shallow["parameters"] < full["parameters"]
    assert shallow["saved_for_backward_mib"] < full["saved_for_backward_mib"]
    assert modes[1] in format_mode_benchmark(result)
