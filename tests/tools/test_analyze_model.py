"""tools/analyze_model.py (hybrid_detr.analysis.inference_cost): parameters, GFLOPs and speed of a config, measured."""
import functools

import torch
from detectron2.data import build_detection_test_loader
from detectron2.modeling import build_model

from hybrid_detr.analysis.inference_cost import analyze
from hybrid_detr.data import DetrDatasetMapper
from hybrid_detr.layers import MSDeformAttn
from model_helpers import tiny_cfg


def _counted_by_hand(cfg, inputs):
    """Multiply-adds of the convolutions and of our op in one inference of the model on `inputs`,
    from the shapes each module sees (forward hooks), independently of fvcore's tracer."""
    model = build_model(cfg).eval()
    counts = {"conv": 0, "ms_deform_attn": 0}

    def conv_hook(module, args, out):
        kh, kw = module.kernel_size
        counts["conv"] += out.numel() * (module.in_channels // module.groups) * kh * kw

    def counted_sample(value, spatial_shapes, level_start_index, locations, weights, _module):
        n, lq, m, levels, points, _ = locations.shape
        # per sampling point and channel: 4 multiply-adds (bilinear) + 1 (attention weight)
        counts["ms_deform_attn"] += n * lq * m * levels * points * value.shape[-1] * 5
        return type(_module).sample(_module, value, spatial_shapes, level_start_index, locations, weights)

    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(conv_hook)
        elif isinstance(module, MSDeformAttn):
            module.sample = functools.partial(counted_sample, _module=module)
    with torch.no_grad():
        model(inputs)
    return counts


def test_analyze_model_reports_measured_cost():
    cfg = tiny_cfg()
    cfg.DATASETS.TEST = ("hybrid_synthetic_val",)
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 64, 96
    cfg.freeze()
    result = analyze(cfg, num_images=2, flop_images=1)
    assert result["parameters"] == sum(p.numel() for p in build_model(cfg).parameters())
    speed, flops = result["speed"], result["flops"]
    assert speed["num_images"] == 2 and abs(speed["images_per_s"] * speed["s_per_image"] - 1) < 1e-9

    # The FLOPs of the image counted (the test set's first, as the loader gives it), one per multiply-add
    # (detectron2's convention): the convolutions and our op counted by hand from the shapes they saw.
    loader = build_detection_test_loader(cfg, "hybrid_synthetic_val", mapper=DetrDatasetMapper(cfg, is_train=False))
    inputs = next(iter(loader))
    assert flops["mean_input_hw"] == tuple(inputs[0]["image"].shape[-2:])
    by_hand = _counted_by_hand(cfg, inputs)
    assert abs(flops["by_operator"]["conv"] * 1e9 - by_hand["conv"]) <= 1e-6 * by_hand["conv"]
    assert abs(flops["by_operator"]["ms_deform_attn"] * 1e9 - by_hand["ms_deform_attn"]) <= 1
    # the total is the sum over operators (nothing counted twice or left out of it)
    assert abs(flops["gflops"] - sum(flops["by_operator"].values())) < 1e-9
