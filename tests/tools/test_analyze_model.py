"""tools/analyze_model.py (hybrid_detr.analysis.inference_cost): parameters, GFLOPs and speed of a config, measured."""
from detectron2.modeling import build_model

from hybrid_detr.analysis.inference_cost import analyze
from model_helpers import tiny_cfg


def test_analyze_model_reports_measured_cost():
    cfg = tiny_cfg()
    cfg.DATASETS.TEST = ("hybrid_synthetic_val",)
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 64, 96
    cfg.freeze()
    result = analyze(cfg, num_images=2, flop_images=1)
    assert result["parameters"] == sum(p.numel() for p in build_model(cfg).parameters())
    assert result["speed"]["num_images"] == 2 and result["speed"]["images_per_s"] > 0
    assert result["flops"]["gflops"] > 0 and result["flops"]["by_operator"]["ms_deform_attn"] > 0
