"""Small box and target helpers shared by the matchers, the criterion and the training branches.

Box conversions are torchvision's `box_convert`; what torchvision lacks (IoU of boxes paired
image by image, targets padded to a batch, ranks within groups) is here, once.
"""
from typing import Dict, List, Sequence, Tuple

import torch
from torch.nn.utils.rnn import pad_sequence
from torchvision.ops import box_convert

from detectron2.structures import Instances

__all__ = [
    "batched_box_iou",
    "normalized_targets",
    "pad_targets",
    "sort_within_groups",
    "rank_within_groups",
]


def batched_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """IoU of every pair of cxcywh boxes within each image: (N, Q, 4) x (N, G, 4) -> (N, Q, G)."""
    a = box_convert(boxes1, "cxcywh", "xyxy")[:, :, None]
    b = box_convert(boxes2, "cxcywh", "xyxy")[:, None]
    wh = (torch.min(a[..., 2:], b[..., 2:]) - torch.max(a[..., :2], b[..., :2])).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return inter / (area_a + area_b - inter).clamp(min=eps)


def normalized_targets(gt_instances: List[Instances], image_sizes) -> List[Dict[str, torch.Tensor]]:
    """detectron2 targets (absolute xyxy boxes) -> per image {"labels", "boxes"}, the boxes cxcywh
    normalised by the (unpadded) image size: what the DETR matchers and losses take."""
    targets = []
    for instances, (h, w) in zip(gt_instances, image_sizes):
        scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=instances.gt_boxes.device)
        boxes = box_convert(instances.gt_boxes.tensor / scale, "xyxy", "cxcywh")
        targets.append({"labels": instances.gt_classes, "boxes": boxes})
    return targets


def pad_targets(
    labels: Sequence[torch.Tensor], boxes: Sequence[torch.Tensor], pad_box: float = 0.0
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image labels (G_i,) and boxes (G_i, 4) as batch tensors: labels (N, G) (padding 0, a valid
    class index), boxes (N, G, 4) (padding `pad_box`) and a validity mask (N, G); G = the most
    objects in an image (0 when every image is empty)."""
    n = len(labels)
    device = boxes[0].device if n else None
    sizes = torch.as_tensor([len(x) for x in labels], device=device)
    g = max((len(x) for x in labels), default=0)
    if g == 0:
        return (
            torch.zeros(n, 0, dtype=torch.int64, device=device),
            torch.zeros(n, 0, 4, device=device),
            torch.zeros(n, 0, dtype=torch.bool, device=device),
        )
    padded_labels = pad_sequence(list(labels), batch_first=True, padding_value=0)
    padded_boxes = pad_sequence(list(boxes), batch_first=True, padding_value=pad_box)
    valid = torch.arange(g, device=device)[None] < sizes[:, None]
    return padded_labels, padded_boxes, valid


def sort_within_groups(quality: torch.Tensor, group: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Indices that sort the elements by `group` id, and within a group by descending `quality`
    (ties keep their order), and the rank (0 = best) of each sorted element within its group."""
    by_quality = quality.argsort(descending=True, stable=True)
    order = by_quality[group[by_quality].argsort(stable=True)]
    sorted_group = group[order]
    position = torch.arange(order.numel(), device=order.device)
    first = torch.ones_like(sorted_group, dtype=torch.bool)
    first[1:] = sorted_group[1:] != sorted_group[:-1]
    group_start = torch.cummax(torch.where(first, position, torch.zeros_like(position)), 0).values
    return order, position - group_start


def rank_within_groups(quality: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Rank (0 = best) of each element's `quality` among the elements of the same `group` id."""
    if quality.numel() == 0:
        return torch.zeros_like(group)
    order, rank = sort_within_groups(quality, group)
    return torch.empty_like(order).scatter_(0, order, rank)
