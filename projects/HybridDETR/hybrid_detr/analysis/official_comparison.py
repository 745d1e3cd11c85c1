"""HybridDETR against an official model on the CPU (behind tools/compare_official.py, whose docstring
describes each model's setup): the official model built from its own source tree (a path, its directory
put on sys.path; nothing of it copied here) with import-time shims and stubs applied here, not in its files,
every parameter and buffer drawn at random (seeded, `randomize_`), its state dict converted with
`hybrid_detr.converters` and loaded strictly into ours, both run on the same images (`fixed_images`):
the max |difference| of the last decoder layer's logits (80 classes) and boxes (`compare_official`).
With mixed selection (DAC-DETR, Co-DETR) also our outputs with the official top-k order
(`compare_mixed_selection`, `pinned_ranking`), on images one at a time, a padded batch and a COCO-sized
image (`input_sets`). `verdict` is the tool's line(s) and pass / fail.
"""
import argparse
import logging
import os
import sys
import types
from contextlib import contextmanager

import torch
from detectron2.modeling import build_model

from ..config import load_config
from ..converters import CONVERTERS
from ..converters.common import COCO_THING_IDS
from ..model_zoo import get_config_file

__all__ = [
    "randomize_", "fixed_images", "input_sets", "comparison_figures", "aggregate_figures", "compare_official", "compare_mixed_selection",
    "pinned_ranking", "mixed_selection_verdict", "verdict",
]

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


def _import_official(src, dac_release=False):
    """The official `models.deformable_detr.build` of the source tree `src`, imported with the shims.
    `dac_release`: DAC-DETR's tree, whose backbone.py imports its Swin module (models/swin_transformer.py),
    which takes its layers from the installed timm and imports mmcv_custom's `load_checkpoint` and mmdet's
    `get_root_logger` for loading ImageNet weights only (`init_weights` with a path): those two are stubbed
    (calling them is an error; `build_official_dac_detr` passes no path), the Swin itself is the official one."""
    sys.path.insert(0, os.path.abspath(src))
    if dac_release:
        _stub_modules(["mmcv_custom", "mmdet", "mmdet.utils"])
    with _official_import_shims():
        import models.backbone as official_backbone
        from models.deformable_detr import build as official_build
    _route_to_pytorch_core()
    official_backbone.is_main_process = lambda: False  # pretrained=False: no download
    return official_build


def build_official_deformable_detr(src, variant):
    official_build = _import_official(src)
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


def _stub_modules(names):
    """Import-time stand-ins for modules the official code imports but the compared model never uses."""

    class Stubbed:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("stubbed out by hybrid_detr.analysis.official_comparison")

    def missing(attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return Stubbed

    for name in names:
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__getattr__ = missing
            module.__path__ = []
            sys.modules[name] = module


CO_DEFORMABLE_DETR_CONFIG = "projects/configs/co_deformable_detr/co_deformable_detr_r50_1x_coco.py"


def build_official_co_detr(src, config=CO_DEFORMABLE_DETR_CONFIG):
    """A Co-DETR release from its mmdet 2.x `config` (a path in the checkout `src`; default Co-Deformable-DETR
    R-50), built with the checkout's mmdet and mmcv 1.x's Python package."""
    sys.path.insert(0, os.path.abspath(src))
    ext = types.ModuleType("mmcv._ext")  # mmcv's compiled ops: not used on the CPU path

    def compiled_op(name):
        if name.startswith("__"):
            raise AttributeError(name)

        def op(*args, **kwargs):
            raise NotImplementedError(f"mmcv._ext.{name} is stubbed out by hybrid_detr.analysis.official_comparison")

        return op

    ext.__getattr__ = compiled_op
    sys.modules.setdefault("mmcv._ext", ext)
    _stub_modules(["fairscale", "fairscale.nn", "timm", "timm.models", "timm.models.layers", "einops", "mmcv_custom"])
    sys.modules["fairscale.nn.checkpoint"] = types.ModuleType("fairscale.nn.checkpoint")
    sys.modules["fairscale.nn.checkpoint"].checkpoint_wrapper = lambda module, *args, **kwargs: module
    try:
        from mmcv import Config
        from mmcv.utils import get_logger
        from mmdet.models import build_detector
    except ImportError as e:
        raise SystemExit(
            f"co_detr needs mmcv 1.x's Python package and Co-DETR's mmdet importable ({e}); "
            "see tools/compare_official.py's docstring"
        ) from None
    import projects.models  # noqa: F401  (registers CoDETR and its heads)

    get_logger("mmcv", log_level=logging.ERROR)  # its weight-init report, one line per parameter

    cfg = Config.fromfile(os.path.join(src, config))
    cfg.model.backbone.init_cfg = None  # no pretrained download
    model = build_detector(cfg.model, train_cfg=cfg.get("train_cfg"), test_cfg=cfg.get("test_cfg"))
    return model.eval()


def _run_official_co_detr(official, images):
    """The query head's last-layer logits and boxes of `images` (normalised, zero-padded at the bottom / right
    into one batch as mmdet's collate pads them): what `simple_test_query_head` decodes. `enc_logits`: the
    encoder's class logits of every token (Co-Deformable-DETR; Co-DINO returns those of its top-k only)."""
    normalised = [(im - PIXEL_MEAN) / PIXEL_STD for im in images]
    height, width = max(im.shape[1] for im in images), max(im.shape[2] for im in images)
    batch = normalised[0].new_zeros(len(images), 3, height, width)
    for b, im in zip(batch, normalised):
        b[:, : im.shape[1], : im.shape[2]].copy_(im)
    metas = [{"batch_input_shape": (height, width), "img_shape": (*im.shape[1:], 3)} for im in images]
    feats = official.extract_feat(batch, metas)
    classes, boxes, enc_classes = official.query_head(feats, metas)[:3]
    return {"pred_logits": classes[-1], "pred_boxes": boxes[-1], "enc_logits": enc_classes}


DAC_BACKBONES = {"resnet": "resnet50", "swin": "swin_large_window12"}  # our backbone -> the release's --backbone


def build_official_dac_detr(src, backbone="resnet"):
    """The DAC-DETR release's model (its main.py defaults + configs/r50_deformplus_cdn_ice_ep12.sh, or with
    `backbone` "swin" configs/swin_deformplus_cdn_ice_ep12.sh: `--backbone swin_large_window12`). The Swin is
    built without ImageNet weights (`pretrained_backbone_path` None: its own init), and its gradient
    checkpointing (use_checkpoint True, models/backbone.py:207) is switched off after the build: it
    recomputes activations in the backward pass and changes no output."""
    official_build = _import_official(src, dac_release=True)
    args = argparse.Namespace(
        dataset_file="coco", device="cpu", hidden_dim=256, position_embedding="sine", position_embedding_scale=2 * 3.141592653589793,
        lr_backbone=2e-5, masks=False, num_feature_levels=4, backbone=DAC_BACKBONES[backbone], dilation=False, nheads=8, enc_layers=6,
        dec_layers=6, dim_feedforward=2048, dropout=0.0, dec_n_points=4, enc_n_points=4, two_stage=True,
        with_box_refine=True, num_queries_one2one=900, num_queries_one2many=0, mixed_selection=True,
        look_forward_twice=True, use_checkpoint=False, aux_loss=True, frozen_weights=None, set_cost_class=2,
        set_cost_bbox=5, set_cost_giou=2, cls_loss_coef=1, bbox_loss_coef=5, giou_loss_coef=2, mask_loss_coef=1,
        dice_loss_coef=1, focal_alpha=0.25, pretrained_backbone_path=None, drop_path_rate=0.2, topk=300,
    )
    # Its backbone.py loads ImageNet weights from ./initmodel/resnet50-19c8e357.pth unconditionally: every
    # weight is drawn at random below anyway, so that one load returns nothing.
    load = torch.load

    def no_pretrained_weights(path, *a, **k):
        return {} if str(path).endswith("initmodel/resnet50-19c8e357.pth") else load(path, *a, **k)

    torch.load = no_pretrained_weights
    try:
        model, _, _ = official_build(args)
    finally:
        torch.load = load
    if backbone == "swin":
        for stage in model.backbone[0].body.layers:
            stage.use_checkpoint = False
    return model.eval()


def _run_official(official, images, targets_argument):
    from util.misc import nested_tensor_from_tensor_list

    samples = nested_tensor_from_tensor_list([(im - PIXEL_MEAN) / PIXEL_STD for im in images])
    return official(samples, None) if targets_argument else official(samples)


DAC_MODELS = {"dac_detr": "resnet", "dac_detr_swin_l": "swin"}  # converter -> backbone
MIXED_SELECTION_MODELS = (*DAC_MODELS, "co_detr")


def _build_pair(model, src, variant, seed):
    # randomize_ keeps the init of 1-d tensors (plus noise): seed it too, so that a run is reproducible.
    torch.manual_seed(seed)
    if model == "deformable_detr":
        official = build_official_deformable_detr(src, variant)
    elif model in DAC_MODELS:
        official = build_official_dac_detr(src, DAC_MODELS[model])
    elif model == "co_detr":
        official = build_official_co_detr(src)
    else:
        raise ValueError(f"no official comparison for {model!r}")
    randomize_(official, seed)
    conversion = CONVERTERS[model](official.state_dict())
    cfg = load_config(get_config_file(conversion.config_name), ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    ours = build_model(cfg).eval()
    ours.load_state_dict(conversion.state_dict, strict=True)
    return official, ours, conversion


def _differences(mine, theirs):
    their_logits = theirs["pred_logits"]
    if their_logits.shape[-1] == 91:  # COCO-id slots -> detectron2's 80 classes
        their_logits = their_logits[..., torch.as_tensor(COCO_THING_IDS)]
    return {
        "logits": (mine["pred_logits"] - their_logits).abs().max().item(),
        "boxes": (mine["pred_boxes"] - theirs["pred_boxes"]).abs().max().item(),
        "logit_scale": their_logits.abs().max().item(),
    }


def _inputs(images):
    return [{"image": im, "height": im.shape[1], "width": im.shape[2]} for im in images]


def compare_official(model, src, variant="plain", seed=0, inputs=("single",)):
    """Max |difference| of the last decoder layer's logits (80 classes) and boxes, ours vs official.
    `inputs`: for dac_detr, dac_detr_swin_l and co_detr, which of `input_sets` to run (the others: the two images as one batch)."""
    if model in MIXED_SELECTION_MODELS:
        return compare_mixed_selection(model, src, seed, inputs)
    official, ours, conversion = _build_pair(model, src, variant, seed)
    images = fixed_images(seed + 1)
    with torch.no_grad():
        theirs = _run_official(official, images, targets_argument=False)
        mine = ours.raw_predictions(_inputs(images))
    return {**_differences(mine, theirs), "config": conversion.config_name}


def compare_deformable_detr(src, variant, seed=0):
    return compare_official("deformable_detr", src, variant, seed)


@contextmanager
def pinned_ranking(ours, scores):
    """Our two-stage selection ranks proposals by `scores` (the official encoder's logit 0) instead
    of our own logit 0: same top-k order, everything else computed by our model."""
    heads, index = ours.query_source.heads, ours.query_source.encoder_head_index
    predict = heads.predict

    def pinned(i, hidden, reference):
        logits, boxes = predict(i, hidden, reference)
        if i == index:
            logits = torch.cat((scores[..., None].to(logits.dtype), logits[..., 1:]), -1)
        return logits, boxes

    heads.predict = pinned
    try:
        yield
    finally:
        del heads.predict


INPUT_SETS = ("single", "batch", "coco")


def input_sets(seed, inputs=INPUT_SETS, coco_size=(800, 1066)):
    """{name: list of batches (lists of images)} for the names in `inputs`: `single`, the two `fixed_images`
    one at a time; `batch`, the same two as one padded batch; `coco`, one image of a COCO-like size."""
    from .dino_comparison import coco_like_image

    images = fixed_images(seed + 1)
    runs = {"single": [[im] for im in images], "batch": [images], "coco": [[coco_like_image(seed + 2, coco_size)]]}
    unknown = sorted(set(inputs) - set(runs))
    if unknown:
        raise ValueError(f"unknown inputs {unknown}: choose from {INPUT_SETS}")
    return {name: runs[name] for name in inputs}


def _mixed_selection_figures(model, official, ours, images, captured):
    """The figures of `compare_mixed_selection` for one batch of images."""
    with torch.no_grad():
        if model in DAC_MODELS:
            theirs = _run_official(official, images, targets_argument=True)
            scores = captured["enc"][..., 0]
        else:
            theirs = _run_official_co_detr(official, images)
            scores = theirs["enc_logits"][..., 0]
        mine = ours.raw_predictions(_inputs(images))
        padded, padding_mask = ours.preprocess_image(_inputs(images))
        memory = ours.encode(padded.tensor, padding_mask)
        _, valid = ours.query_source.token_proposals(memory)
        our_scores = ours.query_source(memory)[1][0][..., 0]
        with pinned_ranking(ours, scores):
            pinned = ours.raw_predictions(_inputs(images))
    # Tokens that take part in the ranking: every token as the official code (TWO_STAGE_MASK_INVALID False),
    # else the valid ones only.
    ranked = valid if ours.query_source.mask_invalid else torch.ones_like(valid)
    return comparison_figures(
        mine, pinned, theirs, (our_scores - scores)[ranked].abs().max().item(), scores,
        our_scores.masked_fill(~ranked, float("-inf")), ours.query_source.num_queries,
    )


def comparison_figures(mine, pinned, theirs, encoder_difference, their_scores, our_scores, k):
    """The figures of one compared batch: max |difference| of the last layer's logits and boxes, free-running
    (`mine`) and with the official top-k order (`pinned`), the encoder's (`encoder_difference`), and where the
    two top-k rankings (scores (N, S), k best) differ: `swaps` positions, at most `swap_gap` apart in the
    official scores."""
    free, fixed = _differences(mine, theirs), _differences(pinned, theirs)
    their_top, our_top = their_scores.topk(k, dim=1).indices, our_scores.topk(k, dim=1).indices
    swapped = their_top != our_top
    gap = 0.0
    if swapped.any():
        gap = (their_scores.gather(1, their_top) - their_scores.gather(1, our_top)).abs()[swapped].max().item()
    return {
        "logits": free["logits"], "boxes": free["boxes"], "pinned_logits": fixed["logits"], "pinned_boxes": fixed["boxes"],
        "encoder_logits": encoder_difference, "logit_scale": free["logit_scale"], "swaps": int(swapped.sum()), "swap_gap": gap,
    }


def compare_mixed_selection(model, src, seed=0, inputs=("single",)):
    """DAC-DETR's release (R-50 or Swin-L) or Co-DETR's Co-Deformable-DETR vs ours on the `input_sets` named in `inputs`
    (one image at a time, a padded batch, a COCO-sized image). Their configs rank the two-stage proposals
    as the official code (TWO_STAGE_MASK_INVALID False: padding tokens and border proposals too), so a
    padded batch and a COCO-sized image (which has border proposals) select the same proposals.

    With mixed selection the order of the top-k proposals matters (content query i goes with the
    i-th proposal), so two proposals whose encoder scores are tied within float32 noise can swap
    places in either implementation and change every output. Measured three ways, per input set:
    `encoder_logits`: max |diff| of the encoder's proposal scores (logit 0, every ranked token);
    `logits` / `boxes`: free-running outputs; `pinned_*`: our outputs with our top-k ranked by the
    official scores (same order; all else ours); `swaps`: top-k positions whose proposal differs,
    and `swap_gap`: the largest official score gap between the proposals swapped there."""
    official, ours, conversion = _build_pair(model, src, "", seed)
    captured = {}
    if model in DAC_MODELS:
        official.transformer.register_forward_hook(lambda module, args, outputs: captured.update(enc=outputs[3]))
    result = {"config": conversion.config_name, "model": model, "seed": seed}
    for name, batches in input_sets(seed, inputs).items():
        result[name] = aggregate_figures([_mixed_selection_figures(model, official, ours, images, captured) for images in batches])
    return result


def aggregate_figures(figures):
    """One input set's figures over its batches: the largest difference, the swaps summed."""
    return {key: (sum if key == "swaps" else max)(f[key] for f in figures) for key in figures[0]}


def mixed_selection_verdict(result, tolerance):
    """One line per input set of a mixed-selection comparison (`compare_mixed_selection`, or Co-DINO's) and
    whether all pass: the encoder logits and the outputs with the official top-k order within `tolerance`,
    and the free-running outputs too unless every place where the orders differ is a tie of the official
    scores within the encoder's float32 noise."""
    lines, ok_all = [], True
    for name in INPUT_SETS:
        if name not in result:
            continue
        r = result[name]
        ties_only = r["swap_gap"] <= max(2 * r["encoder_logits"], 1e-6)
        ok = max(r["pinned_logits"], r["pinned_boxes"], r["encoder_logits"]) <= tolerance and (
            max(r["logits"], r["boxes"]) <= tolerance or ties_only
        )
        ok_all &= ok
        lines.append(
            f"{result['model']} ({result['config']}) seed {result['seed']} {name}: encoder logits max |diff| "
            f"{r['encoder_logits']:.3g}; with the official top-k order: logits {r['pinned_logits']:.3g} (logits up to "
            f"{r['logit_scale']:.3g}), boxes {r['pinned_boxes']:.3g}; free-running: logits {r['logits']:.3g}, boxes "
            f"{r['boxes']:.3g} ({r['swaps']} top-k positions swapped, official score gap at most {r['swap_gap']:.3g}: "
            f"{'near-ties only' if ties_only else 'NOT ties'}); tolerance {tolerance:g}: {'OK' if ok else 'FAIL'}"
        )
    return lines, ok_all


def verdict(model, variant, result, tolerance):
    """The comparison's line(s) and whether it passes: every difference within `tolerance`; with mixed
    selection, one line per input set (`mixed_selection_verdict`)."""
    if model in MIXED_SELECTION_MODELS:
        lines, ok = mixed_selection_verdict(result, tolerance)
        return "\n".join(lines), ok
    ok = max(result["logits"], result["boxes"]) <= tolerance
    line = (
        f"{model} {variant}: max |diff| logits {result['logits']:.3g} (logits up to {result['logit_scale']:.3g}), "
        f"boxes {result['boxes']:.3g}; tolerance {tolerance:g}: {'OK' if ok else 'FAIL'}"
    )
    return line, ok
