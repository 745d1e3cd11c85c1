"""SMCA's explain view (`tools/explain.py`, mode "smca"): per top detection, each head's Gaussian
prior over the image next to the attention it modulated, with the scale selection.

The maps are the co-attention's own (`SMCACrossAttention.attend` with a `maps` dict), on the
inputs the chosen decoder layer's cross-attention received in an eval forward pass (recorded by a
forward hook), checked equal to its output by the tests. The view applies to the dense
co-attention with its prior (not to SMCA.DEFORMABLE, whose decoder the generic deformable views
show, nor to the `dense` mode, which has no prior).
"""
import contextlib
import os
from typing import Dict, List, Optional

import numpy as np
import torch

from ..explain_support import (
    Captured,
    ExplainRequest,
    class_name,
    draw_box,
    pixel_boxes,
    pyplot,
    save_figure,
    top_detections,
)
from .co_attention import SMCACrossAttention

__all__ = ["explain_view", "plot_smca", "smca_maps", "CrossAttentionInputs"]


class CrossAttentionInputs(contextlib.AbstractContextManager):
    """Records the first call of `module` while active: `args` ((positional, keyword)) and `output`."""

    def __init__(self, module):
        self.module, self.args, self.output, self._handle = module, None, None, None

    def __enter__(self):
        def hook(_m, args, kwargs, output):
            if self.args is None:
                self.args, self.output = (args, kwargs), output

        self._handle = self.module.register_forward_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self._handle.remove()
        return False


@torch.no_grad()
def smca_maps(attn, query, memory, query_reference):
    """SMCA co-attention's maps for image 0 of the batch, from the module's own `attend` (the numbers
    the module computes): per level of `attn.levels`, the prior G = exp(log G) and the attention
    probabilities, both (M, Q, H, W); the scale-selection weights alpha (Q, M, levels) (None for one
    level); and the output, to check against the module's."""
    maps = {}
    output = attn.attend(query, memory, query_reference, maps=maps)
    m, q = attn.n_heads, query.shape[1]
    priors, attentions = {}, {}
    for level in attn.levels:
        h, w = memory.layout.shapes[level]
        attentions[level] = maps["attention"][level][0].view(m, q, h, w)
        if level in maps["prior"]:
            priors[level] = maps["prior"][level][0].expand(m, q, h * w).reshape(m, q, h, w)
    alpha = maps["alpha"]
    if alpha is not None:
        alpha = alpha[0].permute(1, 0, 2).expand(q, m, alpha.shape[-1])  # (Q, M, levels)
    return {"prior": priors, "attention": attentions, "alpha": alpha, "output": output}


def _valid_crop(map_hw: torch.Tensor, ratio) -> np.ndarray:
    h, w = map_hw.shape
    vh, vw = max(1, round(float(ratio[1]) * h)), max(1, round(float(ratio[0]) * w))
    return map_hw[:vh, :vw].numpy()


def plot_smca(model, captured: Captured, input_dict, image: np.ndarray, out_dir: str, layer: int = -1,
              top_k: int = 3, level: Optional[int] = None, metadata=None) -> List[Dict]:
    """Per top detection, one PNG: for every head, its Gaussian prior over the image (top row) next
    to the attention it modulated (bottom row), on `level` (default: the finest SMCA level);
    the scale-selection weight of each head on that level and its selected (argmax) level in the titles."""
    plt = pyplot()
    attn = model.decoder.layers[layer].cross_attn
    with CrossAttentionInputs(attn) as cap, torch.no_grad():
        model([{"image": input_dict["image"], "height": input_dict["height"], "width": input_dict["width"]}])
    (query, _reference_points, memory, query_reference), _ = cap.args
    maps = smca_maps(attn, query, memory, query_reference)
    level = attn.levels[0] if level is None else level
    queries, scores, labels, boxes = top_detections(captured.inference.output, top_k)
    xyxy = pixel_boxes(boxes, captured.image_size)
    ratio = memory.valid_ratios[0, level]
    h_img, w_img = image.shape[:2]
    results = []
    for k, q in enumerate(queries.tolist()):
        m = attn.n_heads
        fig, axes = plt.subplots(2, m, figsize=(2.6 * m + 1, 5.8), squeeze=False, dpi=100)
        for head in range(m):
            prior = _valid_crop(maps["prior"][level][head, q], ratio)
            attention = _valid_crop(maps["attention"][level][head, q], ratio)
            title = f"head {head}"
            if maps["alpha"] is not None:
                a = maps["alpha"][q, head]
                title += f"\nα={float(a[attn.levels.index(level)]):.2f}, selects L{attn.levels[int(a.argmax())]}"
            for row, (heat, cmap) in enumerate(((prior, "viridis"), (attention, "inferno"))):
                ax = axes[row, head]
                ax.imshow(image)
                ax.imshow(heat, cmap=cmap, alpha=0.6, extent=(0, w_img, h_img, 0), interpolation="nearest")
                draw_box(ax, xyxy[k], "lime", 1.2)
                ax.set_xticks([]); ax.set_yticks([])
                if row == 0:
                    ax.set_title(title, fontsize=8)
            axes[0, 0].set_ylabel("Gaussian prior G", fontsize=9)
            axes[1, 0].set_ylabel("attention", fontsize=9)
        name = class_name(metadata, int(labels[k]))
        fig.suptitle(f"SMCA decoder layer {layer % len(model.decoder.layers)}, query {q} ({name} "
                     f"{float(scores[k]):.2f}), level {level}: prior (top) and the attention it modulated (bottom)",
                     fontsize=10)
        path = save_figure(fig, os.path.join(out_dir, f"smca_query{q}.png"), rect=(0, 0, 1, 0.93))
        results.append({"path": path, "query": q})
    return results


def explain_view(model, captured: Captured, request: ExplainRequest) -> Optional[List[Dict]]:
    """The registered view of mode "smca": `plot_smca` on the request's layer; None unless that
    layer's cross-attention is SMCA's dense co-attention with its prior."""
    attn = model.decoder.layers[request.layer].cross_attn
    if not isinstance(attn, SMCACrossAttention) or attn.prior is None:
        return None
    return plot_smca(model, captured, request.input_dict, request.image, request.out_dir, request.layer,
                     request.top_k, metadata=request.metadata)
