"""DAC-DETR's explain view (`tools/explain.py`, mode "dac"): its motivating picture for one object,
the queries near it after the O-decoder (with self-attention, the inference pass) and after the
C-decoder (the same decoder without self-attention, fed the branch's C queries), and how many
queries score at or above each matching-score threshold in each.

Everything comes from the branch: its C queries (`DACBranch.c_queries`) and its matcher's scores
(`DACMatcher.scores`, the score its one-to-many assignment thresholds).
"""
from typing import Dict, Optional

import numpy as np
import torch

from ..explain_support import (
    Captured,
    ExplainRequest,
    class_name,
    draw_box,
    image_axes,
    normalized_boxes,
    pixel_boxes,
    pyplot,
    save_figure,
    top_detections,
)

__all__ = ["explain_view", "plot_dac", "dac_comparison"]


@torch.no_grad()
def dac_comparison(model, captured: Captured, object_box: torch.Tensor, object_label: int,
                   thresholds=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)) -> Dict:
    """O-decoder (the captured one-to-one pass) vs C-decoder (the DAC branch's C queries through the
    decoder with skip_self_attn=True) for one object (box cxcywh normalised to the valid image,
    class): last-layer boxes, the branch matcher's matching scores to the object, and the count of
    queries at or above each threshold."""
    branch = model.branches["dac"]
    group, memory, o_out = captured.inference.group, captured.inference.memory, captured.inference.output
    c_out = model.decoder(branch.c_queries(group, o_out), memory, skip_self_attn=True)
    result = {"thresholds": list(thresholds)}
    for key, out in (("O", o_out), ("C", c_out)):
        logits, boxes = out.layer(-1)
        target = [{"labels": torch.tensor([object_label], device=boxes.device),
                   "boxes": object_box[None].to(boxes.device)}]
        score = branch.matcher.scores(logits[:1], boxes[:1], target)[0][0, :, 0]  # (Q,) to the one gt
        result[key] = {"boxes": boxes[0], "score": score,
                       "counts": [int((score >= t).sum()) for t in thresholds]}
    return result


def plot_dac(model, captured: Captured, image: np.ndarray, path: str, object_box=None, object_label=None,
             num_queries: int = 10, metadata=None) -> Dict:
    """DAC-DETR's motivating picture for one object (a ground-truth box if given, else the top
    detection): the `num_queries` queries with the highest matching score to it, their boxes after
    the O-decoder (left) and after the C-decoder (middle); right: queries at or above each
    matching-score threshold, O vs C."""
    plt = pyplot()
    if object_box is None:
        _, _, labels, boxes = top_detections(captured.inference.output, 1)
        object_box, object_label, source = boxes[0], int(labels[0]), "top detection"
    else:
        source = "ground truth"
    result = dac_comparison(model, captured, object_box, int(object_label))
    fig, all_axes = plt.subplots(1, 4, figsize=(16, 5), dpi=100, gridspec_kw={"width_ratios": [1, 1, 0.05, 1]})
    axes = [all_axes[0], all_axes[1], all_axes[3]]
    target_xyxy = pixel_boxes(object_box[None], captured.image_size)[0]
    cmap = plt.get_cmap("cool")
    for ax, key, title in ((axes[0], "O", "O-decoder (with self-attention)"),
                           (axes[1], "C", "C-decoder (self-attention skipped)")):
        data = result[key]
        order = data["score"].argsort(descending=True)[:num_queries]
        image_axes(ax, image, f"{title}: {num_queries} best-matching queries")
        for q in order.tolist():
            box = pixel_boxes(data["boxes"][q][None], captured.image_size)[0]
            draw_box(ax, box, cmap(float(data["score"][q])), 1.2)
        draw_box(ax, target_xyxy, "lime", 2.5, f"{source}: {class_name(metadata, int(object_label))}")
        result[key]["shown"] = order
    x = np.arange(len(result["thresholds"]))
    bars_o = axes[2].bar(x - 0.2, result["O"]["counts"], 0.4, label="O-decoder", color="tab:blue")
    bars_c = axes[2].bar(x + 0.2, result["C"]["counts"], 0.4, label="C-decoder", color="tab:orange")
    axes[2].bar_label(bars_o, fontsize=8)
    axes[2].bar_label(bars_c, fontsize=8)
    top = max(result["O"]["counts"] + result["C"]["counts"] + [1])
    axes[2].set_ylim(0, top * 1.15 + 0.5)
    axes[2].yaxis.get_major_locator().set_params(integer=True)
    axes[2].set_xticks(x, [f"{t:.1f}" for t in result["thresholds"]], fontsize=8)
    matcher = model.branches["dac"].matcher
    axes[2].set_xlabel(f"matching-score threshold ({matcher.iou_weight:g}·IoU + {matcher.cls_weight:g}·p(class))",
                       fontsize=9)
    axes[2].set_ylabel("queries with score ≥ threshold", fontsize=9)
    axes[2].set_title("queries gathered around the object", fontsize=9)
    axes[2].legend(fontsize=8)
    axes[2].grid(True, axis="y", alpha=0.3)
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, 1))
    fig.colorbar(sm, cax=all_axes[2]).set_label("matching score (box colour)", fontsize=9)
    fig.suptitle("DAC: O- vs C-decoder queries near one object (last decoder layer)", fontsize=11)
    result["path"] = save_figure(fig, path, rect=(0, 0, 1, 0.95))
    return result


def explain_view(model, captured: Captured, request: ExplainRequest) -> Optional[Dict]:
    """The registered view of mode "dac": `plot_dac` for the image's first ground-truth object (the
    top detection when the image has no ground truth) to dac.png; None without a DAC branch."""
    if "dac" not in model.branches:
        return None
    box = label = None
    gt = request.gt_instances
    if gt is not None:
        box = normalized_boxes(gt.gt_boxes.tensor[0], captured.image_size)
        label = int(gt.gt_classes[0])
    return plot_dac(model, captured, request.image, request.path("dac.png"), box, label, metadata=request.metadata)
