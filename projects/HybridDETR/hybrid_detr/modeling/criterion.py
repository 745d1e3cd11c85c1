"""The detection loss shared by every branch: focal classification + L1 + GIoU on the pairs an
`Assignment` names. Which pairs, and how they are normalised, is the branch's business."""
from dataclasses import dataclass
from typing import Callable, Dict, List, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou_loss, sigmoid_focal_loss

from detectron2.utils import comm

from .matcher import Assignment
from .transformer import DecoderOutput



class ClassLoss(NamedTuple):
    """What a classification loss returns."""

    value: torch.Tensor  # the (normalised, unweighted) classification loss
    # (P,) weight of each assigned pair's L1 and GIoU losses; None weights every pair 1
    pair_weight: Optional[torch.Tensor] = None


# (logits (N, Q, K), one-hot targets (N, Q, K), assignment, matched predicted boxes (P, 4),
#  matched gt boxes (P, 4), normaliser) -> ClassLoss
ClassificationLoss = Callable[..., ClassLoss]


@dataclass(frozen=True)
class ClassificationLossSpec:
    """A classification loss in place of the criterion's focal loss, with its own weight."""

    build: Callable[[List[Dict[str, torch.Tensor]]], ClassificationLoss]  # a step's targets -> the loss
    weight: float


def mean_across_workers(value: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over the distributed workers (the tensor itself on one worker)."""
    if comm.get_world_size() > 1:
        value = value.clone()
        torch.distributed.all_reduce(value)
        value = value / comm.get_world_size()
    return value


def num_boxes_across_workers(targets: List[Dict[str, torch.Tensor]], device) -> float:
    """Average number of gt boxes per worker, the loss normaliser (at least 1)."""
    num_boxes = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
    return max(mean_across_workers(num_boxes).item(), 1.0)


class DetectionCriterion(nn.Module):
    def __init__(self, num_classes, focal_alpha=0.25, focal_gamma=2.0, class_weight=2.0, l1_weight=5.0, giou_weight=2.0):
        super().__init__()
        self.num_classes = num_classes
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.class_weight = class_weight
        self.l1_weight = l1_weight
        self.giou_weight = giou_weight

    def focal_loss(self, logits, onehot, assignment, pred_boxes, gt_boxes, normalizer):
        loss = sigmoid_focal_loss(logits, onehot, self.focal_alpha, self.focal_gamma, reduction="sum")
        return ClassLoss(loss / normalizer)

    def forward(
        self,
        logits: torch.Tensor,
        boxes: torch.Tensor,
        targets: List[Dict[str, torch.Tensor]],
        assignment: Assignment,
        normalizer: float,
        classification_loss: Optional[ClassificationLoss] = None,
        class_weight: Optional[float] = None,
    ) -> Dict[str, torch.Tensor]:
        """Weighted losses {loss_class, loss_bbox, loss_giou} of one prediction set; the
        classification loss is focal unless given, weighted by `class_weight` or CLASS_WEIGHT."""
        if logits.shape[-1] != self.num_classes:
            raise ValueError(f"logits have {logits.shape[-1]} classes, the criterion expects {self.num_classes}")
        logits, boxes = logits.float(), boxes.float()  # losses in float32, also under autocast
        gt_labels, gt_boxes = self.matched_targets(targets, assignment)
        onehot = torch.zeros_like(logits)
        onehot[assignment.batch_index, assignment.query_index, gt_labels] = 1.0
        pred_boxes = boxes[assignment.batch_index, assignment.query_index]
        classification_loss = classification_loss or self.focal_loss
        loss_class, pair_weight = classification_loss(logits, onehot, assignment, pred_boxes, gt_boxes, normalizer)
        # Sums over P pairs: with no objects in the batch they are a true zero, still in the graph.
        l1 = F.l1_loss(pred_boxes, gt_boxes, reduction="none").sum(-1)
        giou = generalized_box_iou_loss(
            box_convert(pred_boxes, "cxcywh", "xyxy"), box_convert(gt_boxes, "cxcywh", "xyxy"), reduction="none"
        )
        if pair_weight is not None:
            l1, giou = l1 * pair_weight, giou * pair_weight
        return {
            "loss_class": (self.class_weight if class_weight is None else class_weight) * loss_class,
            "loss_bbox": self.l1_weight * l1.sum() / normalizer,
            "loss_giou": self.giou_weight * giou.sum() / normalizer,
        }

    @staticmethod
    def matched_targets(targets, assignment: Assignment):
        """Labels (P,) and boxes (P, 4) of the gt objects the assignment names."""
        offsets = torch.tensor([0] + [len(t["labels"]) for t in targets], device=assignment.gt_index.device)
        flat_index = offsets.cumsum(0)[assignment.batch_index] + assignment.gt_index
        gt_labels = torch.cat([t["labels"] for t in targets])[flat_index]
        gt_boxes = torch.cat([t["boxes"] for t in targets])[flat_index]
        return gt_labels, gt_boxes

    def decoder_losses(
        self,
        outputs: DecoderOutput,
        targets,
        assign: Callable[[int, torch.Tensor, torch.Tensor], Assignment],
        normalizer: float,
        prefix: str = "",
        aux_loss: bool = True,
        classification_loss: Optional[ClassificationLoss] = None,
        classification: Optional[ClassificationLossSpec] = None,
    ) -> Dict[str, torch.Tensor]:
        """Losses of every decoder layer (the last only without `aux_loss`).

        `assign(layer, logits, boxes)` gives that layer's assignment. The classification loss is
        focal (CLASS_WEIGHT), or `classification_loss` (CLASS_WEIGHT), or a mode's `classification`
        spec (its loss for these targets, its weight). Names are `{prefix}loss_class` for the last
        layer and `{prefix}loss_class_{layer}` for the others.
        """
        class_weight = None
        if classification is not None:
            classification_loss, class_weight = classification.build(targets), classification.weight
        last = outputs.num_layers - 1
        losses = {}
        for layer in range(last + 1) if aux_loss else [last]:
            logits, boxes = outputs.layer(layer)
            assignment = assign(layer, logits, boxes)
            suffix = "" if layer == last else f"_{layer}"
            layer_losses = self(logits, boxes, targets, assignment, normalizer, classification_loss, class_weight)
            for name, value in layer_losses.items():
                losses[f"{prefix}{name}{suffix}"] = value
        return losses
