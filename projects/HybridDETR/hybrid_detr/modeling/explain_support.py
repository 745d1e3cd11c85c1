"""What every explain view shares, below the mode packages (which register their own view) and
`analysis/explain.py` (which captures a forward pass and draws the generic views).

An explain view is `view(model, captured: Captured, request: ExplainRequest)` -> a result dict with
"path" (the PNG written), a list of them, or None when the view does not apply to this model or
input (it then writes and prints nothing; the caller reports the view as skipped). A mode registers
its view with `register_decoder_mode(name, explain_view=...)`; `tools/explain.py` runs the views of
the modes in the model's DECODER_MODE.

Here: the capture record and the request, the top detections, the coordinate conversions, and the
drawing primitives. matplotlib is imported on first use (`pyplot()`), not with this module.

Coordinates: boxes are cxcywh normalised to the valid (unpadded) image, as the model predicts them;
sampling locations are in [0, 1] of each level's *padded* map (the model scales its references from
the valid image by the level's valid ratio, so a location maps back to image pixels as
x / valid_ratio_w * image_w, the inverse of what the model does).
"""
import dataclasses
import os
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torchvision.ops import box_convert

__all__ = [
    "Captured",
    "ExplainRequest",
    "top_detections",
    "locations_to_pixels",
    "pixel_boxes",
    "normalized_boxes",
    "pyplot",
    "draw_box",
    "image_axes",
    "class_name",
    "save_figure",
]


@dataclasses.dataclass
class Captured:
    """One eval forward pass of the model on one image, as `analysis.explain.run_and_capture`
    records it (forward hooks that change no number)."""

    instances: object  # the model's Instances for the image (input image pixels)
    images: object  # the preprocessed ImageList
    deformable: object  # DeformableCapture: `calls[module name]`, every MSDeformAttn call's op inputs
    inference: object  # InferenceCapture: the one-to-one decoder pass's `group`, `memory`, `output`
    image_size: Tuple[int, int]  # (h, w) of the input image
    attn_names: Dict[str, List[str]]  # "encoder" / "decoder" -> MSDeformAttn module names by layer


@dataclasses.dataclass
class ExplainRequest:
    """What the caller asks of every view."""

    out_dir: str  # where the PNGs go
    image: np.ndarray  # (h, w, 3) uint8 RGB: the model's input image, to draw on
    input_dict: Dict  # the model input {"image", "height", "width"}, with "instances" (gt) when annotated
    layer: int = -1  # decoder (and encoder) layer
    head: Optional[int] = None  # one attention head (None: all)
    top_k: int = 3  # detections to explain
    pixel: Optional[Tuple[float, float]] = None  # encoder view: (x, y) in original image pixels (None: top detection)
    metadata: object = None  # the dataset's Metadata (class names), or None

    @property
    def gt_instances(self):
        """The ground truth (Instances in input image pixels), or None when the image has none."""
        gt = self.input_dict.get("instances")
        return gt if gt is not None and len(gt) else None

    def path(self, file_name: str) -> str:
        return os.path.join(self.out_dir, file_name)


def top_detections(output, k: int):
    """The `k` queries of the last decoder layer with the highest class score (image 0):
    (query indices (k,), scores, labels, boxes (k, 4) cxcywh normalised to the valid image)."""
    logits, boxes = output.layer(-1)
    scores, labels = logits[0].sigmoid().max(-1)
    order = scores.argsort(descending=True)[:k]
    return order, scores[order], labels[order], boxes[0, order]


def locations_to_pixels(locations: torch.Tensor, valid_ratios: torch.Tensor, image_size) -> torch.Tensor:
    """Sampling locations (..., L, P, 2) in [0, 1] of each level's padded map -> input image pixels
    (..., L, P, 2), with valid_ratios (L, 2) the image's valid (w, h) fraction of each level."""
    h, w = image_size
    scale = locations.new_tensor([w, h])
    return locations / valid_ratios[:, None, :] * scale


def pixel_boxes(boxes_cxcywh: torch.Tensor, image_size) -> torch.Tensor:
    """Boxes (..., 4) cxcywh normalised to the valid image -> xyxy in its pixels."""
    h, w = image_size
    return box_convert(boxes_cxcywh, "cxcywh", "xyxy") * boxes_cxcywh.new_tensor([w, h, w, h])


def normalized_boxes(boxes_xyxy: torch.Tensor, image_size) -> torch.Tensor:
    """The inverse of `pixel_boxes`: xyxy pixels -> cxcywh normalised to the image (float32)."""
    h, w = image_size
    return box_convert(boxes_xyxy / torch.tensor([w, h, w, h], dtype=torch.float32), "xyxy", "cxcywh")


# ------------------------------------------------------------------------------------------------
# drawing
def pyplot():
    """matplotlib.pyplot on the Agg backend (imported here, on first use)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_box(ax, xyxy, color, linewidth=2.0, label=None, linestyle="-"):
    """An unfilled rectangle (pixels), with a label above its top-left corner when given."""
    import matplotlib.patches as patches

    x0, y0, x1, y1 = [float(v) for v in xyxy]
    ax.add_patch(patches.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=color,
                                   linewidth=linewidth, linestyle=linestyle))
    if label:
        ax.text(x0, y0 - 2, label, color="white", fontsize=8, va="bottom",
                bbox=dict(facecolor=color, alpha=0.8, pad=1, edgecolor="none"))


def image_axes(ax, image, title):
    """`image` on `ax`, with a title and pixel axes."""
    ax.imshow(image)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("x (px)", fontsize=8)
    ax.set_ylabel("y (px)", fontsize=8)
    ax.tick_params(labelsize=7)


def class_name(metadata, label: int) -> str:
    """The dataset's name of class `label`, or the number when there is no name."""
    names = getattr(metadata, "thing_classes", None) if metadata is not None else None
    return names[label] if names and label < len(names) else str(label)


def save_figure(fig, path: str, rect=None) -> str:
    """Lay the figure out within `rect` (when given; left, bottom, right, top as figure fractions),
    save it to `path` and close it."""
    if rect is not None:
        fig.tight_layout(rect=rect)
    fig.savefig(path)
    pyplot().close(fig)
    return path
