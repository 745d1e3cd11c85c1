#!/usr/bin/env python
"""Compare HybridDETR with an official model on the CPU: same (seeded, random) weights through our
converter, same images, max |difference| of the last decoder layer's logits and boxes.

    python tools/compare_official.py --official-src /path/to/Deformable-DETR deformable_detr --variant two_stage

The official model is built from its own source tree (given by path, never copied here), with its
CUDA op replaced by its own pure-PyTorch `ms_deform_attn_core_pytorch`; small import-time shims
for a recent torch/torchvision are applied in this script, not in their files. Every parameter and
buffer of the official model is drawn at random (seeded), so that no zero-initialised path hides a
difference; its state dict is converted with `hybrid_detr.converters` and loaded strictly into our
model built from the shipped config. Logits are compared after mapping the 91 COCO-id slots to
detectron2's 80 classes. Prints one line per compared tensor and exits 1 above --tolerance.
"""
import argparse
import os
import sys
import types
from contextlib import contextmanager

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "projects", "HybridDETR"))

from detectron2.modeling import build_model  # noqa: E402

from hybrid_detr.config import load_config  # noqa: E402
from hybrid_detr.converters import CONVERTERS  # noqa: E402
from hybrid_detr.converters.common import COCO_THING_IDS  # noqa: E402
from hybrid_detr.model_zoo import get_config_file  # noqa: E402

PIXEL_MEAN = torch.tensor([123.675, 116.280, 103.530]).view(3, 1, 1)
PIXEL_STD = torch.tensor([58.395, 57.120, 57.375]).view(3, 1, 1)


@contextmanager
def _official_import_shims():
    """Import-time shims for the official Deformable DETR code on a recent torch/torchvision:
    - util/misc.py reads float(torchvision.__version__[:3]) ("0.2" for 0.29) and then imports
      helpers of torchvision < 0.7: present a version string that takes the modern path;
    - models/ops imports the compiled `MultiScaleDeformableAttention` extension: a stub module
      (the forward is then routed to their pure-PyTorch reference, see `_route_to_pytorch_core`)."""
    import torchvision

    version = torchvision.__version__
    torchvision.__version__ = "1.0"
    stub = "MultiScaleDeformableAttention" not in sys.modules
    if stub:
        sys.modules["MultiScaleDeformableAttention"] = types.ModuleType("MultiScaleDeformableAttention")
    try:
        yield
    finally:
        torchvision.__version__ = version


def _route_to_pytorch_core():
    from models.ops.functions import ms_deform_attn_func

    core = ms_deform_attn_func.ms_deform_attn_core_pytorch

    def apply(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step):
        return core(value, spatial_shapes, sampling_locations, attention_weights)

    ms_deform_attn_func.MSDeformAttnFunction.apply = staticmethod(apply)


def build_official_deformable_detr(src, variant):
    sys.path.insert(0, os.path.abspath(src))
    with _official_import_shims():
        import models.backbone as official_backbone
        from models.deformable_detr import build as official_build
    _route_to_pytorch_core()
    official_backbone.is_main_process = lambda: False  # pretrained=False: no download
    args = argparse.Namespace(
        dataset_file="coco", device="cpu", hidden_dim=256, position_embedding="sine", lr_backbone=2e-5,
        masks=False, num_feature_levels=4, backbone="resnet50", dilation=False, nheads=8, enc_layers=6,
        dec_layers=6, dim_feedforward=1024, dropout=0.1, dec_n_points=4, enc_n_points=4,
        two_stage=variant == "two_stage", with_box_refine=variant in ("refine", "two_stage"), num_queries=300,
        aux_loss=True, frozen_weights=None, set_cost_class=2, set_cost_bbox=5, set_cost_giou=2,
        cls_loss_coef=2, bbox_loss_coef=5, giou_loss_coef=2, mask_loss_coef=1, dice_loss_coef=1, focal_alpha=0.25,
    )
    model, _, _ = official_build(args)
    return model.eval()


@torch.no_grad()
def randomize_(model, seed):
    """Every parameter and buffer drawn at random around its init (seeded): weights get noise of
    their own scale, norms stay near 1, BN variances positive. Tensors shared between modules
    (the official heads' aliases) are drawn once."""
    g = torch.Generator().manual_seed(seed)
    seen = set()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if id(t) in seen or not t.is_floating_point():
            continue
        seen.add(id(t))
        noise = torch.randn(t.shape, generator=g)
        if name.endswith("running_var"):
            t.copy_(0.5 + torch.rand(t.shape, generator=g))
        elif t.dim() <= 1:  # biases, norm scales, level offsets: their init + noise
            t.add_(0.1 * noise)
        else:
            fan_in = t[0].numel()
            t.copy_(noise / fan_in**0.5)


def fixed_images(seed):
    """Two RGB images in [0, 255] of different sizes (so padding and valid ratios are exercised)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g) * 255 for h, w in ((256, 320), (224, 288))]


def compare_deformable_detr(src, variant, seed=0):
    torch.manual_seed(seed)  # the official init, which randomize_ perturbs, is then the same on every run
    official = build_official_deformable_detr(src, variant)
    randomize_(official, seed)
    conversion = CONVERTERS["deformable_detr"](official.state_dict())
    cfg = load_config(get_config_file(conversion.config_name), ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    ours = build_model(cfg).eval()
    ours.load_state_dict(conversion.state_dict, strict=True)

    images = fixed_images(seed + 1)
    from util.misc import nested_tensor_from_tensor_list

    encoder_outputs = []
    hook = ours.query_source.register_forward_hook(lambda m, args, out: encoder_outputs.append(out[1]))
    with torch.no_grad():
        theirs = official(nested_tensor_from_tensor_list([(im - PIXEL_MEAN) / PIXEL_STD for im in images]))
        mine = ours.raw_predictions([{"image": im, "height": im.shape[1], "width": im.shape[2]} for im in images])
    hook.remove()
    their_logits = theirs["pred_logits"][..., torch.as_tensor(COCO_THING_IDS)]
    logits, boxes = mine["pred_logits"], mine["pred_boxes"]
    result = {}
    if variant == "two_stage":
        logits, boxes, result = _align_two_stage_queries(logits, boxes, encoder_outputs[0][0], theirs["enc_outputs"]["pred_logits"])
    result.update(
        logits=(logits - their_logits).abs().max().item(),
        boxes=(boxes - theirs["pred_boxes"]).abs().max().item(),
        logit_scale=their_logits.abs().max().item(),
    )
    return result


def _align_two_stage_queries(logits, boxes, our_encoder_logits, their_encoder_logits):
    """Two-stage queries are the top-k proposals in score order; two proposals whose logit-0 scores
    tie to within float rounding (different summation order) may come out swapped. The decoder is
    permutation-equivariant over queries, so our outputs are put in the official proposal order
    before comparing. A different *set* of proposals is not aligned (that would be a real difference)."""
    k = logits.shape[1]
    ours = our_encoder_logits[..., 0].topk(k, dim=1).indices
    theirs = their_encoder_logits[..., 0].topk(k, dim=1).indices
    order, reordered, same_sets = [], 0, True
    for mine, official in zip(ours.tolist(), theirs.tolist()):
        position = {token: rank for rank, token in enumerate(mine)}
        if set(mine) != set(official):
            same_sets = False
            order.append(list(range(k)))
            continue
        order.append([position[token] for token in official])
        reordered += sum(a != b for a, b in zip(mine, official))
    index = torch.as_tensor(order)
    logits = logits.gather(1, index[..., None].expand_as(logits))
    boxes = boxes.gather(1, index[..., None].expand_as(boxes))
    return logits, boxes, {"same_proposal_sets": same_sets, "reordered_queries": reordered}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official-src", required=True, help="a checkout of the official repository")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("model", choices=["deformable_detr"])
    parser.add_argument("--variant", choices=["plain", "refine", "two_stage"], default="plain")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    result = compare_deformable_detr(args.official_src, args.variant, args.seed)
    worst = max(result["logits"], result["boxes"])
    if "reordered_queries" in result:
        print(
            f"two-stage proposals: same sets as the official model: {result['same_proposal_sets']}; "
            f"{result['reordered_queries']} queries in another order (score ties), aligned before comparing"
        )
    print(
        f"{args.model} {args.variant}: max |diff| logits {result['logits']:.3g} (logits up to {result['logit_scale']:.3g}), "
        f"boxes {result['boxes']:.3g}; tolerance {args.tolerance:g}: {'OK' if worst <= args.tolerance else 'FAIL'}"
    )
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
