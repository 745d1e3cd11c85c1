"""One-to-one (Hungarian) matching, and the `Assignment` every matcher returns."""
from dataclasses import dataclass
from typing import Dict, List

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou


@dataclass
class Assignment:
    """Which query is trained towards which ground-truth object; all other queries are background.

    Three aligned index tensors of length P (number of positive pairs, over the whole batch);
    `gt_index` indexes the targets of image `batch_index`.
    """

    batch_index: torch.Tensor
    query_index: torch.Tensor
    gt_index: torch.Tensor

    def __len__(self):
        return self.batch_index.numel()

    @classmethod
    def empty(cls, device):
        empty = torch.empty(0, dtype=torch.int64, device=device)
        return cls(empty, empty, empty)


def focal_class_cost(logits, gt_labels, alpha, gamma):
    """Focal-loss cost of predicting each gt class: (Q, G) for logits (Q, K)."""
    prob = logits.sigmoid()
    positive = alpha * (1 - prob) ** gamma * -(prob + 1e-8).log()
    negative = (1 - alpha) * prob**gamma * -(1 - prob + 1e-8).log()
    return (positive - negative)[:, gt_labels]


def check_finite_predictions(matcher: str, logits: torch.Tensor, boxes: torch.Tensor) -> None:
    """Raise FloatingPointError naming the images and queries whose logits (N, Q, K) or boxes
    (N, Q, 4) are not finite: a NaN cost would otherwise be matched like any other."""
    for name, tensor in (("logits", logits), ("boxes", boxes)):
        bad = ~torch.isfinite(tensor).flatten(2).all(-1)  # (N, Q)
        if bad.any():
            images, queries = bad.nonzero(as_tuple=True)
            raise FloatingPointError(
                f"{matcher}: non-finite predicted {name} for {int(bad.sum())} queries "
                f"(batch images {sorted(set(images.tolist()))}, e.g. query {int(queries[0])} of image "
                f"{int(images[0])}: {tensor[images[0], queries[0]].tolist()[:6]})"
            )


class HungarianMatcher(nn.Module):
    """Deformable DETR's matcher: the optimal one-to-one assignment under the cost
    `cost_class * focal + cost_bbox * L1 + cost_giou * (-GIoU)`."""

    def __init__(self, cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, focal_alpha=0.25, focal_gamma=2.0):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: all costs are 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    @torch.no_grad()
    def forward(self, logits, boxes, targets: List[Dict[str, torch.Tensor]]) -> Assignment:
        """logits (N, Q, K), boxes (N, Q, 4) cxcywh; targets: per image {"labels", "boxes"}.

        Raises FloatingPointError naming the images and queries when a prediction is not finite:
        a NaN cost would otherwise be matched like any other (linear_sum_assignment does not care).
        """
        check_finite_predictions("HungarianMatcher", logits, boxes)
        n, q = logits.shape[:2]
        sizes = [len(t["labels"]) for t in targets]
        if sum(sizes) == 0:
            return Assignment.empty(logits.device)
        gt_labels = torch.cat([t["labels"] for t in targets])
        gt_boxes = torch.cat([t["boxes"] for t in targets])
        flat_logits = logits.flatten(0, 1).float()
        flat_boxes = boxes.flatten(0, 1).float()
        # One cost matrix for the whole batch (N*Q, sum G); each image uses its own block.
        cost = (
            self.cost_class * focal_class_cost(flat_logits, gt_labels, self.focal_alpha, self.focal_gamma)
            + self.cost_bbox * torch.cdist(flat_boxes, gt_boxes.float(), p=1)
            - self.cost_giou
            * generalized_box_iou(box_convert(flat_boxes, "cxcywh", "xyxy"), box_convert(gt_boxes.float(), "cxcywh", "xyxy"))
        )
        cost = cost.view(n, q, -1).cpu()
        batch_index, query_index, gt_index = [], [], []
        for i, block in enumerate(cost.split(sizes, dim=-1)):
            rows, cols = linear_sum_assignment(block[i].numpy())
            batch_index.append(torch.full((len(rows),), i, dtype=torch.int64))
            query_index.append(torch.as_tensor(rows, dtype=torch.int64))
            gt_index.append(torch.as_tensor(cols, dtype=torch.int64))
        device = logits.device
        return Assignment(torch.cat(batch_index).to(device), torch.cat(query_index).to(device), torch.cat(gt_index).to(device))
