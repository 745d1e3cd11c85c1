"""HybridDETR's DINO against the official DINO (IDEA-Research/DINO), R-50 or Swin-L, on the CPU.

The official model is built from its own source tree (`src`, put on sys.path; nothing of it copied
here) from its config files, read with runpy: `config/DINO/coco_transformer.py` + `DINO_{4,5}scale.py`
(R-50) or + `DINO_4scale_swin.py` (Swin-L; 5 scales: with DINO_5scale.py's `return_interm_indices` and
`num_feature_levels`, the repository having no 5-scale Swin config), and the released scripts' options
(scripts/DINO_train_dist.sh, DINO_train_submitit_swin.sh: `dn_scalar=100 embed_init_tgt=TRUE
dn_label_coef=1.0 dn_bbox_coef=1.0 use_ema=False dn_box_noise_scale=1.0`). Import-time stand-ins
applied here: timm stubbed for R-50 (imported by the Swin / ConvNeXt modules, not built then; the Swin
takes timm's DropPath, to_2tuple and trunc_normal_ from the installed timm), its compiled
`MultiScaleDeformableAttention` stubbed and the op routed to its own pure-PyTorch
`ms_deform_attn_core_pytorch`, `is_main_process` patched so that torchvision downloads no ImageNet
weights. The Swin is built with `use_checkpoint` False: gradient checkpointing recomputes activations
in the backward pass and changes no output. Every parameter and buffer is then drawn at random (seeded,
`official_comparison.randomize_`), the state dict converted by the `dino` / `dino_swin_l` converter and
loaded strictly into ours, and both run in float32 on the same inputs:

- `single`: two images of different sizes, one at a time;
- `batch`: the same two images as one padded batch (the official top-k ranks padding tokens with
  the rest, zeroed memory and box (1, 1, 1, 1); so does ours with TWO_STAGE_MASK_INVALID False);
- `coco`: one image of a COCO-like size (800 x 1066 by default).

Reported per input, for the last decoder layer: max |difference| of the logits (80 classes) and
boxes, free-running and with our top-k ranked by the official encoder scores (`pinned_*`: the same
order of proposals, everything else computed by ours); max |difference| of the encoder's class logits
(80 classes, every token); the top-k positions whose proposal differs (`swaps`) and the largest gap of
official scores between the proposals swapped there (`swap_gap`): with learned content queries the
i-th query goes with the i-th proposal, so two proposals whose scores tie within float32 noise may
swap places and change every output of those queries.

One change to the official weights, made before the conversion: the 11 slots of its 91-slot encoder
class head that are no COCO class (the converter drops them) get weight 0 and bias -100. The official
ranking takes the max over all 91 slots, ours over the 80 classes; in a trained model those slots are
never a positive target and stay far below the best class, which this reproduces, whereas random
weights would let them decide the ranking. The decoder's class head is left as drawn (its 11 extra
slots do not reach the compared outputs).

Until DECODER_MODE "dn" is registered (modeling/dn/), ours is built with "deformable" and the
converted `main_passes.dn.*` keys are set aside: the denoising queries are training-only and change
nothing here.
"""
import argparse
import os
import runpy
import sys
import types
from contextlib import contextmanager
from typing import Dict, List

import torch
from detectron2.modeling import build_model

from ..config import load_config
from ..converters import CONVERTERS
from ..converters.common import COCO_THING_IDS
from ..converters.dino import CONVERTER_BY_BACKBONE
from ..model_zoo import get_config_file
from ..modeling.modes import DECODER_MODES
from .official_comparison import PIXEL_MEAN, PIXEL_STD, fixed_images, randomize_

__all__ = ["build_official_dino", "compare_dino", "dino_verdict", "official_dino_args"]

# The released training script's options (scripts/DINO_train_dist.sh), applied over the config file.
SCRIPT_OPTIONS = dict(
    dn_scalar=100, embed_init_tgt=True, dn_label_coef=1.0, dn_bbox_coef=1.0, use_ema=False, dn_box_noise_scale=1.0
)
UNUSED_SLOT_BIAS = -100.0
BACKBONES = ("resnet", "swin")
# What makes a 4-scale DINO a 5-scale one (DINO_5scale.py vs DINO_4scale.py, the batch size aside).
_FIVE_SCALE_KEYS = ("return_interm_indices", "num_feature_levels")


def _config_values(src: str, name: str) -> Dict:
    return {k: v for k, v in runpy.run_path(os.path.join(src, "config", "DINO", name)).items() if not k.startswith("_")}


def official_dino_args(src: str, scales: int, backbone: str = "resnet") -> argparse.Namespace:
    """The official `args` of DINO R-50 (`backbone` "resnet") or Swin-L ("swin") with `scales` (4 or 5)
    feature levels: its config files (`_base_` first) plus the released scripts' options, on the CPU."""
    if scales not in (4, 5) or backbone not in BACKBONES:
        raise ValueError(f"DINO comes with backbone {BACKBONES} and 4 or 5 scales, not {backbone!r} / {scales}")
    values = _config_values(src, "coco_transformer.py")
    if backbone == "resnet":
        values.update(_config_values(src, f"DINO_{scales}scale.py"))
    else:
        values.update(_config_values(src, "DINO_4scale_swin.py"))
        if scales == 5:
            five = _config_values(src, "DINO_5scale.py")
            values.update({k: five[k] for k in _FIVE_SCALE_KEYS})
        values.update(use_checkpoint=False)  # backward-only recomputation (see the module docstring)
    values.update(SCRIPT_OPTIONS)
    values.update(device="cpu", dataset_file="coco")
    return argparse.Namespace(**values)


def _stub_timm():
    """timm is imported by DINO's Swin and ConvNeXt modules only (never built for R-50)."""
    for name in ("timm", "timm.models", "timm.models.layers"):
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__path__ = []

            def missing(attr):
                if attr.startswith("__"):
                    raise AttributeError(attr)
                return lambda *args, **kwargs: None

            module.__getattr__ = missing
            sys.modules[name] = module


def _import_official_dino(src: str, backbone: str = "resnet"):
    sys.path.insert(0, os.path.abspath(src))
    if backbone == "swin":
        import timm.models.layers  # noqa: F401  (the real one: the Swin is built from it; the stub then stays out)
    _stub_timm()
    sys.modules.setdefault("MultiScaleDeformableAttention", types.ModuleType("MultiScaleDeformableAttention"))
    import models.dino.backbone as official_backbone
    from models.dino.dino import build_dino
    from models.dino.ops.functions import ms_deform_attn_func

    core = ms_deform_attn_func.ms_deform_attn_core_pytorch

    def apply(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step):
        return core(value, spatial_shapes, sampling_locations, attention_weights)

    ms_deform_attn_func.MSDeformAttnFunction.apply = staticmethod(apply)
    official_backbone.is_main_process = lambda: False  # pretrained=False: no download
    return build_dino


def build_official_dino(src: str, scales: int, backbone: str = "resnet"):
    build_dino = _import_official_dino(src, backbone)
    model, _, _ = build_dino(official_dino_args(src, scales, backbone))
    return model.eval()


@torch.no_grad()
def silence_unused_slots_(official):
    """The 11 non-COCO slots of the official encoder class head never win its max (see the module docstring)."""
    unused = sorted(set(range(91)) - set(COCO_THING_IDS))
    head = official.transformer.enc_out_class_embed
    head.weight[unused] = 0.0
    head.bias[unused] = UNUSED_SLOT_BIAS


def _build_pair(src: str, scales: int, seed: int, backbone: str):
    torch.manual_seed(seed)
    official = build_official_dino(src, scales, backbone)
    randomize_(official, seed)
    silence_unused_slots_(official)
    conversion = CONVERTERS[CONVERTER_BY_BACKBONE[backbone]](official.state_dict())
    opts = ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""]
    state_dict = dict(conversion.state_dict)
    cfg = load_config(get_config_file(conversion.config_name), opts)
    stand_in = cfg.MODEL.HYBRID_DETR.DECODER_MODE == "dn" and "dn" not in DECODER_MODES
    if stand_in:
        cfg.defrost()
        cfg.MODEL.HYBRID_DETR.DECODER_MODE = "deformable"
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("main_passes.dn.")}
    ours = build_model(cfg).eval()
    ours.load_state_dict(state_dict, strict=True)
    return official, ours, conversion, stand_in


def _inputs(images):
    return [{"image": im, "height": im.shape[1], "width": im.shape[2]} for im in images]


def _run_official(official, images):
    from util.misc import nested_tensor_from_tensor_list

    return official(nested_tensor_from_tensor_list([(im - PIXEL_MEAN) / PIXEL_STD for im in images]))


@contextmanager
def _capture_scores(ours, pinned=None):
    """Records our proposal scores (N, S); with `pinned`, ranks by those scores instead."""
    source = ours.query_source
    captured = {}

    def scores(logits):
        captured["scores"] = source.__class__.proposal_scores(source, logits)
        captured["logits"] = logits
        return pinned.to(logits.dtype) if pinned is not None else captured["scores"]

    source.proposal_scores = scores
    try:
        yield captured
    finally:
        del source.proposal_scores


def _compare_inputs(official, ours, images) -> Dict[str, float]:
    ids = torch.as_tensor(COCO_THING_IDS)
    captured = {}
    # Its first call scores every token (deformable_transformer.py:339); the second, the selected ones (dino.py:299).
    hook = official.transformer.enc_out_class_embed.register_forward_hook(
        lambda module, inputs, output: captured.setdefault("logits", output)
    )
    try:
        with torch.no_grad():
            theirs = _run_official(official, images)
            hook.remove()
            with _capture_scores(ours) as mine_encoder:
                mine = ours.raw_predictions(_inputs(images))
            their_scores = captured["logits"].max(-1).values
            with _capture_scores(ours, pinned=their_scores):
                pinned = ours.raw_predictions(_inputs(images))
    finally:
        hook.remove()
    their_logits = theirs["pred_logits"][..., ids]
    k = ours.query_source.num_queries
    their_top = their_scores.topk(k, dim=1).indices
    our_top = mine_encoder["scores"].topk(k, dim=1).indices
    swapped = their_top != our_top
    gap = 0.0
    if swapped.any():
        gap = (their_scores.gather(1, their_top) - their_scores.gather(1, our_top)).abs()[swapped].max().item()
    return {
        "logits": (mine["pred_logits"] - their_logits).abs().max().item(),
        "boxes": (mine["pred_boxes"] - theirs["pred_boxes"]).abs().max().item(),
        "pinned_logits": (pinned["pred_logits"] - their_logits).abs().max().item(),
        "pinned_boxes": (pinned["pred_boxes"] - theirs["pred_boxes"]).abs().max().item(),
        "encoder_logits": (mine_encoder["logits"] - captured["logits"][..., ids]).abs().max().item(),
        "logit_scale": their_logits.abs().max().item(),
        "swaps": int(swapped.sum()),
        "swap_gap": gap,
    }


def coco_like_image(seed: int, size=(800, 1066)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, *size, generator=g) * 255


def compare_dino(
    src: str, scales: int = 4, seed: int = 0, inputs=("single", "batch", "coco"), coco_size=(800, 1066), backbone: str = "resnet"
):
    """{input name: figures (see the module docstring)} plus "config", "converter" and "stand_in" (whether
    ours ran with DECODER_MODE "deformable" for want of "dn")."""
    official, ours, conversion, stand_in = _build_pair(src, scales, seed, backbone)
    images = fixed_images(seed + 1)
    runs: Dict[str, List[List[torch.Tensor]]] = {
        "single": [[im] for im in images],
        "batch": [images],
        "coco": [[coco_like_image(seed + 2, coco_size)]],
    }
    result = {
        "config": conversion.config_name,
        "converter": CONVERTER_BY_BACKBONE[backbone],
        "stand_in": stand_in,
        "scales": scales,
        "seed": seed,
    }
    for name in inputs:
        figures = [_compare_inputs(official, ours, batch) for batch in runs[name]]
        result[name] = {
            key: (sum(f[key] for f in figures) if key == "swaps" else max(f[key] for f in figures)) for key in figures[0]
        }
    return result


def dino_verdict(result, tolerance=1e-4):
    """One line per input and whether all pass: with the official top-k order, logits and boxes within
    `tolerance` (and the encoder logits); free-running too, unless every swapped top-k position is a tie
    of the official scores within the encoder's float32 noise."""
    lines, ok_all = [], True
    for name in ("single", "batch", "coco"):
        if name not in result:
            continue
        r = result[name]
        ties_only = r["swap_gap"] <= max(2 * r["encoder_logits"], 1e-6)
        ok = max(r["pinned_logits"], r["pinned_boxes"], r["encoder_logits"]) <= tolerance and (
            max(r["logits"], r["boxes"]) <= tolerance or ties_only
        )
        ok_all &= ok
        lines.append(
            f"{result.get('converter', 'dino')} {result['scales']}-scale seed {result['seed']} {name}: logits {r['logits']:.3g} (up to {r['logit_scale']:.3g}), "
            f"boxes {r['boxes']:.3g}; official top-k order: logits {r['pinned_logits']:.3g}, boxes {r['pinned_boxes']:.3g}; "
            f"encoder logits {r['encoder_logits']:.3g}; {r['swaps']} top-k swaps (score gap <= {r['swap_gap']:.3g}); "
            f"{'OK' if ok else 'FAIL'}"
        )
    if result.get("stand_in"):
        lines.append("(ours built with DECODER_MODE 'deformable': 'dn' is not registered yet; inference is the same)")
    return lines, ok_all
