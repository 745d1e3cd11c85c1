"""The denoising view (`tools/explain.py`, mode "dn"): for an annotated image, one denoising group
as a training step builds it (noise seeded) and what the decoder makes of it: the positives' noised
boxes next to their gt (left) and the last decoder layer's boxes for them (middle), the negatives'
noised boxes and the class score the decoder gives them (right; trained towards background)."""
from typing import Dict, Optional

import torch

from ..box_ops import normalized_targets
from ..explain_support import Captured, ExplainRequest, draw_box, image_axes, pixel_boxes, pyplot, save_figure
from ..modes import MainPassInputs

__all__ = ["explain_view", "denoising_outputs"]


@torch.no_grad()
def denoising_outputs(model, name: str, captured: Captured, gt_instances, seed: int = 0) -> Dict:
    """The hook `name`'s denoising groups for the image's gt (noise drawn after `seed`) and the
    decoder's output on them, from the captured one-to-one pass's queries and memory."""
    hook = model.main_passes[name]
    memory, queries = captured.inference.memory, captured.inference.group
    targets = normalized_targets([gt_instances.to(memory.memory.device)], [captured.image_size])
    inputs = MainPassInputs(queries, memory, targets, 1.0, model.criterion, model.query_source)
    torch.manual_seed(seed)
    extra = hook.extra_queries(inputs)
    _, extras = model.decode_with_extras(queries, memory, {name: extra})
    return {"groups": extra.state, "queries": extra.group, "output": extras[name][1], "targets": targets[0]}


def explain_view(model, captured: Captured, request: ExplainRequest) -> Optional[Dict]:
    """Group 0 of the denoising queries for the image's gt (None without gt)."""
    gt = request.gt_instances
    name = next((n for n, hook in model.main_passes.items() if hasattr(hook, "label_embedding")), None)
    if gt is None or name is None:
        return None
    result = denoising_outputs(model, name, captured, gt)
    dn, out = result["groups"], result["output"]
    single = dn.max_boxes
    positives, negatives = torch.arange(single), torch.arange(single, 2 * single)
    real = dn.labels[0, :single] >= 0  # slots of this image's gt (others are padding)
    logits, boxes = out.layer(-1)
    size = captured.image_size
    gt_xyxy = pixel_boxes(result["targets"]["boxes"], size)

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.4), dpi=100)
    panels = (
        (axes[0], "positives: noised boxes (input)", dn.boxes[0, positives], "tab:blue"),
        (axes[1], "positives: last decoder layer's boxes", boxes[0, positives], "tab:cyan"),
        (axes[2], "negatives: noised boxes, score of their gt class", dn.boxes[0, negatives], "tab:red"),
    )
    gt_labels = result["targets"]["labels"]
    for ax, title, shown, color in panels:
        image_axes(ax, request.image, title)
        for j in range(single):
            if not real[j]:
                continue
            draw_box(ax, gt_xyxy[j], "lime", 2.5)
            label = None
            if ax is axes[2]:
                label = f"{float(logits[0, single + j, gt_labels[j]].sigmoid()):.2f}"
            draw_box(ax, pixel_boxes(shown[j], size), color, 1.3, label, linestyle="--" if ax is axes[2] else "-")
        ax.set_xlim(0, request.image.shape[1])
        ax.set_ylim(request.image.shape[0], 0)
    fig.suptitle(
        f"DINO denoising, group 1 of {dn.num_groups} (green: ground truth; noise seeded as in a training step)",
        fontsize=11,
    )
    path = save_figure(fig, request.path("dn.png"), rect=(0, 0, 1, 0.94))
    return {"path": path, "groups": dn, "boxes": boxes[0], "logits": logits[0]}
