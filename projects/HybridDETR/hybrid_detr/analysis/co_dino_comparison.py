"""HybridDETR's Co-DINO query head against the official Co-DINO R-50 (Sense-X/Co-DETR) on the CPU.

The official model is built as `official_comparison.build_official_co_detr` builds Co-Deformable-DETR
(a Co-DETR checkout given by path: its `mmdet/` and `projects/`, nothing of it copied here; mmcv 1.x's
Python package importable, its compiled ops stubbed, mmcv's own pure-PyTorch core for the deformable
attention on the CPU), from `projects/configs/co_dino/co_dino_5scale_r50_1x_coco.py`. Every parameter and
buffer of the whole detector (auxiliary heads included) is drawn at random (seeded,
`official_comparison.randomize_`), the state dict converted by the `co_dino` converter (auxiliary heads
dropped) and loaded strictly into ours (`configs/coco/co_dino_r50_12ep_query_head.yaml`), and both run in
float32, in eval mode (no denoising queries), on the same inputs (`official_comparison.input_sets`):

- `single`: two images of different sizes, one at a time;
- `batch`: the same two images as one padded batch (zero padding at the bottom / right after the
  normalisation, as mmdet's collate; the official top-k ranks padding tokens with the rest, zeroed memory
  and box (1, 1, 1, 1), and so does ours with TWO_STAGE_MASK_INVALID False);
- `coco`: one image of a COCO-like size (800 x 1066 by default).

Compared: the query head's last decoder layer (`all_cls_scores[-1]` / `all_bbox_preds[-1]`, what
`simple_test_query_head` decodes; 80 classes on both sides) against our `raw_predictions`, free-running and
with our top-k ranked by the official encoder scores (`pinned_*`: the same order of proposals, everything
else computed by ours); the encoder's class logits of every token (the official `cls_branches[6]` on the
output memory, transformer.py:656); the top-k positions whose proposal differs (`swaps`) and the largest
gap of official scores (best class, transformer.py:663) between the proposals swapped there (`swap_gap`).
Unlike DINO's, the official encoder head has exactly our 80 classes, so no slot needs silencing.
"""
from typing import Dict, List

import torch
from detectron2.modeling import build_model

from ..config import load_config
from ..converters import CONVERTERS
from ..model_zoo import get_config_file
from .dino_comparison import _capture_scores
from .official_comparison import (
    _inputs,
    _run_official_co_detr,
    aggregate_figures,
    build_official_co_detr,
    comparison_figures,
    input_sets,
    mixed_selection_verdict,
    randomize_,
)

__all__ = ["CO_DINO_CONFIG", "build_official_co_dino", "compare_co_dino", "co_dino_verdict"]

CO_DINO_CONFIG = "projects/configs/co_dino/co_dino_5scale_r50_1x_coco.py"


def build_official_co_dino(src: str):
    """The official Co-DINO R-50 (5 scales, 1x) from the Co-DETR checkout `src`, in eval mode."""
    return build_official_co_detr(src, CO_DINO_CONFIG)


def _build_pair(src: str, seed: int):
    torch.manual_seed(seed)
    official = build_official_co_dino(src)
    randomize_(official, seed)
    conversion = CONVERTERS["co_dino"](official.state_dict())
    cfg = load_config(get_config_file(conversion.config_name), ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    ours = build_model(cfg).eval()
    ours.load_state_dict(conversion.state_dict, strict=True)
    return official, ours, conversion


def _compare_inputs(official, ours, images: List[torch.Tensor]) -> Dict[str, float]:
    captured = {}
    # cls_branches[6] runs once per forward, on every token of the output memory (transformer.py:656-657).
    hook = official.query_head.cls_branches[-1].register_forward_hook(
        lambda module, args, output: captured.setdefault("logits", output)
    )
    try:
        with torch.no_grad():
            theirs = _run_official_co_detr(official, images)
            hook.remove()
            with _capture_scores(ours) as mine_encoder:
                mine = ours.raw_predictions(_inputs(images))
            their_scores = captured["logits"].max(-1).values
            with _capture_scores(ours, pinned=their_scores):
                pinned = ours.raw_predictions(_inputs(images))
    finally:
        hook.remove()
    encoder_difference = (mine_encoder["logits"] - captured["logits"]).abs().max().item()
    return comparison_figures(mine, pinned, theirs, encoder_difference, their_scores, mine_encoder["scores"], ours.query_source.num_queries)


def compare_co_dino(src: str, seed: int = 0, inputs=("single", "batch", "coco"), coco_size=(800, 1066)):
    """{input name: figures (see the module docstring)} plus "config", "model" and "seed"."""
    official, ours, conversion = _build_pair(src, seed)
    result = {"config": conversion.config_name, "model": "co_dino", "seed": seed}
    for name, batches in input_sets(seed, inputs, coco_size).items():
        result[name] = aggregate_figures([_compare_inputs(official, ours, images) for images in batches])
    return result


def co_dino_verdict(result, tolerance=1e-4):
    """One line per input and whether all pass (`official_comparison.mixed_selection_verdict`: with the official
    top-k order, logits, boxes and the encoder logits within `tolerance`; free-running too, unless every swapped
    top-k position is a tie of the official scores within the encoder's float32 noise)."""
    return mixed_selection_verdict(result, tolerance)
