"""Co-DETR's explain view (`tools/explain.py`, mode "co_detr"): the positive anchors / proposals of
each auxiliary head for the image's ground truth, from the branch's own `aux_positives` (the
adapter and the heads as in a training step, their assigners only exist there)."""
from typing import Dict, Optional

import numpy as np
import torch

from ..explain_support import Captured, ExplainRequest, class_name, draw_box, image_axes, pyplot, save_figure

__all__ = ["explain_view", "plot_co_detr", "co_detr_positives"]

HEAD_TITLES = {"atss": "ATSS: positive anchors", "rcnn": "Faster R-CNN: positive proposals"}


def _branch(model):
    """The Co-DETR branch when it has auxiliary heads, else None."""
    branch = model.branches["co_detr"] if "co_detr" in model.branches else None
    return branch if branch is not None and branch.num_aux_heads > 0 else None


@torch.no_grad()
def co_detr_positives(model, captured: Captured, gt_instances) -> Dict:
    """Each Co-DETR auxiliary head's positives for the image's ground truth (`gt_instances`, in the
    input image's pixels): {head name: AuxPositives}. The branch runs in training mode (seed 0: the
    Faster R-CNN head samples its proposals), without gradients, then is put back as it was."""
    branch = _branch(model)
    if branch is None:
        raise ValueError("the model has no Co-DETR auxiliary head (DECODER_MODE co_detr, NUM_AUX_HEADS > 0)")
    was_training = branch.training
    branch.train()
    try:
        torch.manual_seed(0)
        memory = captured.inference.memory
        return branch.aux_positives(memory, captured.images, [gt_instances.to(memory.memory.device)])
    finally:
        branch.train(was_training)


def plot_co_detr(model, captured: Captured, image: np.ndarray, gt_instances, path: str, metadata=None) -> Dict:
    """One panel per auxiliary head: the ground truth (thick) and the head's positive anchors /
    proposals (thin), coloured by the ground truth they are assigned to."""
    plt = pyplot()
    positives = co_detr_positives(model, captured, gt_instances)
    fig, axes = plt.subplots(1, len(positives), figsize=(6.5 * len(positives), 5.5), squeeze=False, dpi=100)
    cmap = plt.get_cmap("tab10")
    for ax, (name, pos) in zip(axes[0], positives.items()):
        counts = torch.bincount(pos.gt_index, minlength=len(gt_instances)).tolist()
        image_axes(ax, image, f"{HEAD_TITLES.get(name, name)} ({len(pos.gt_index)}; per gt: {counts})")
        for box, g in zip(pos.boxes, pos.gt_index.tolist()):
            draw_box(ax, box, cmap(g % 10), 0.9, linestyle="--")
        for g, (box, cls) in enumerate(zip(gt_instances.gt_boxes.tensor, gt_instances.gt_classes.tolist())):
            draw_box(ax, box, cmap(g % 10), 2.5, f"gt {g}: {class_name(metadata, cls)}")
        ax.set_xlim(0, image.shape[1]); ax.set_ylim(image.shape[0], 0)
    # One line fits two panels; a single panel (K = 1) is too narrow for it.
    title = "Co-DETR auxiliary heads: positives (dashed) for each ground truth (solid, same colour)"
    fig.suptitle(title if len(positives) > 1 else title.replace(": ", ":\n", 1), fontsize=11)
    return {"path": save_figure(fig, path, rect=(0, 0, 1, 0.95)), "positives": positives}


def explain_view(model, captured: Captured, request: ExplainRequest) -> Optional[Dict]:
    """The registered view of mode "co_detr": `plot_co_detr` to co_detr.png; None without auxiliary
    heads (NUM_AUX_HEADS 0) or without ground truth (it draws the heads' positives for it)."""
    gt = request.gt_instances
    if _branch(model) is None or gt is None:
        return None
    return plot_co_detr(model, captured, request.image, gt, request.path("co_detr.png"), request.metadata)
