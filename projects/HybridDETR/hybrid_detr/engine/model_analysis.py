"""Inference speed and GFLOPs of a detectron2 model on images of a test set.

Speed is timed around `model(inputs)` alone (data loading excluded), after a few warm-up images,
over every image of the set up to a cap, and over at least 20 timed images (a small set is run
through again), with `torch.cuda.synchronize()` around each call on a GPU. FLOPs are counted by
fvcore's tracer through detectron2's `FlopCountAnalysis`, with our `hybrid_detr::ms_deform_attn` op
counted by the handles `hybrid_detr.layers.flop_count_handles()` provides (with
`scaled_dot_product_attention`, which the decoder self-attention and SMCA trace to). "GFLOPs" follow
fvcore and detectron2 (and every fvcore-based figure in the DETR literature): one flop is one
multiply-add, not two.
"""
import itertools
import logging
import time
from collections import Counter

import torch

from ..analysis.measurement import synchronize

logger = logging.getLogger(__name__)

__all__ = ["measure_inference_speed", "count_flops", "benchmark_model", "format_benchmark"]


def _model_device(model):
    return next(model.parameters()).device


class _EvalMode:
    """Puts a model in eval mode under no_grad for the duration, and restores its mode after."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.no_grad = torch.no_grad()
        self.no_grad.__enter__()
        self.model.eval()
        return self.model

    def __exit__(self, *exc):
        self.model.train(self.was_training)
        self.no_grad.__exit__(*exc)
        return False


def _cycled_batches(data_loader):
    """The loader's batches, again and again (a fresh pass each time), with the pass number."""
    for epoch in itertools.count():
        empty = True
        for inputs in data_loader:
            empty = False
            yield epoch, inputs
        if empty:
            return


def measure_inference_speed(model, data_loader, num_warmup=5, max_images=50, min_images=20):
    """Times `model` on the batches of `data_loader` (batches of one image, as detectron2's test
    loader gives): `num_warmup` batches are run untimed, then every image of the loader is timed once,
    at most `max_images`; a loader of fewer than `min_images` images is run through again until
    `min(min_images, max_images)` have been timed, so that the figure is not the time of one image.

    Returns a dict: images_per_s, s_per_image, num_images (timed runs), num_distinct_images (how many
    different images they were), num_warmup, device.
    """
    try:
        target = min(max_images, max(min_images, len(data_loader)))
    except TypeError:  # a loader without len()
        target = max_images
    device = _model_device(model)
    elapsed, images, warmed, first_pass_images, last_pass = 0.0, 0, 0, 0, 0
    with _EvalMode(model):
        for last_pass, inputs in _cycled_batches(data_loader):
            if images >= target:
                break
            if last_pass == 0:
                first_pass_images += len(inputs)
            synchronize(device)
            start = time.perf_counter()
            model(inputs)
            synchronize(device)
            if warmed < num_warmup:
                warmed += 1
                continue
            elapsed += time.perf_counter() - start
            images += len(inputs)
    if images == 0:
        raise ValueError("measure_inference_speed: the data loader gave no image to time")
    return {
        "images_per_s": images / elapsed,
        "s_per_image": elapsed / images,
        "num_images": images,
        "num_distinct_images": images if last_pass == 0 else min(images, first_pass_images),
        "num_warmup": warmed,
        "device": str(device),
    }


def count_flops(model, data_loader, num_images=3):
    """Mean GFLOPs per image of `model` in inference over the first `num_images` batches of
    `data_loader` (batches of one image, as detectron2's test loader gives).

    Returns a dict: gflops, by_operator (operator -> GFLOPs per image, names as fvcore's handles
    give them, e.g. "conv", "linear", "ms_deform_attn"), num_images, mean_input_hw (mean (h, w) of the resized input images), and
    unsupported_ops (op name -> count over all traced images; ops fvcore cannot count, i.e. zero
    FLOPs in the total).
    """
    from detectron2.utils.analysis import FlopCountAnalysis

    from hybrid_detr.layers import flop_count_handles

    handles = flop_count_handles()
    totals, by_operator, sizes, unsupported = [], Counter(), [], Counter()
    with _EvalMode(model):
        for inputs in itertools.islice(data_loader, num_images):
            analysis = FlopCountAnalysis(model, inputs).set_op_handle(**handles)
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            totals.append(analysis.total() / len(inputs))
            by_operator.update({op: flops / len(inputs) for op, flops in analysis.by_operator().items()})
            unsupported.update(analysis.unsupported_ops())
            sizes.extend(tuple(x["image"].shape[-2:]) for x in inputs)
    if not totals:
        raise ValueError("count_flops: the data loader gave no image")
    if unsupported:
        logger.info(f"FLOP count: ops not counted: {dict(unsupported)}")
    return {
        "gflops": sum(totals) / len(totals) / 1e9,
        "by_operator": {op: flops / len(totals) / 1e9 for op, flops in by_operator.most_common()},
        "num_images": len(totals),
        "mean_input_hw": tuple(round(sum(s[i] for s in sizes) / len(sizes)) for i in range(2)),
        "unsupported_ops": dict(unsupported),
    }


def benchmark_model(model, data_loader, num_warmup=5, max_images=50, flop_images=3, min_images=20):
    """Both measurements on `data_loader`: {"speed": ..., "flops": ...}."""
    return {
        "speed": measure_inference_speed(
            model, data_loader, num_warmup=num_warmup, max_images=max_images, min_images=min_images
        ),
        "flops": count_flops(model, data_loader, num_images=flop_images),
    }


def format_benchmark(result, dataset_name=""):
    speed, flops = result["speed"], result["flops"]
    where = f" on {dataset_name}" if dataset_name else ""
    h, w = flops["mean_input_hw"]
    repeated = speed.get("num_distinct_images", speed["num_images"])
    distinct = f" ({repeated} distinct, the set run through again)" if repeated < speed["num_images"] else ""
    return (
        f"Inference speed{where}: {speed['images_per_s']:.2f} images/s "
        f"({speed['s_per_image'] * 1000:.1f} ms/image over {speed['num_images']} timed images{distinct} after "
        f"{speed['num_warmup']} warm-up, batch size 1, {speed['device']})\n"
        f"Model GFLOPs{where}: {flops['gflops']:.2f} per image (mean over {flops['num_images']} images, "
        f"mean input {h}x{w}; fvcore count, 1 flop = 1 multiply-add)"
    )
