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


class MatchedPairs(NamedTuple):
    """The (query, gt) pairs an `Assignment` names, with what every loss needs of them."""

    assignment: Assignment
    labels: torch.Tensor  # (P,) class of each pair's gt
    gt_id: torch.Tensor  # (P,) the pair's gt numbered over the batch (pairs of one gt share it)
    pred_boxes: torch.Tensor  # (P, 4) cxcywh
    gt_boxes: torch.Tensor  # (P, 4) cxcywh
    onehot: torch.Tensor  # (N, Q, K) 1 at (image, query, gt class) of every pair
    # (N, Q) True on padding queries, which the classification loss leaves out (None: none).
    padding_mask: Optional[torch.Tensor] = None


class ClassLoss(NamedTuple):
    """What a classification loss returns."""

    value: torch.Tensor  # the (normalised, unweighted) classification loss
    # (P,) weight of each pair's L1 and GIoU losses; None weights every pair 1
    pair_weight: Optional[torch.Tensor] = None


# (logits (N, Q, K), pairs: MatchedPairs, normaliser) -> ClassLoss
ClassificationLoss = Callable[[torch.Tensor, MatchedPairs, float], ClassLoss]


@dataclass(frozen=True)
class ClassificationLossSpec:
    """A classification loss and its weight (built once, with the model)."""

    loss: ClassificationLoss
    weight: float


class FocalLoss:
    """Sigmoid focal loss over every (query, class) entry that is not padding, summed and divided
    by the normaliser (Deformable DETR's `sigmoid_focal_loss` x num_queries / num_queries)."""

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0):
        self.alpha, self.gamma = alpha, gamma

    def __call__(self, logits, pairs: MatchedPairs, normalizer) -> ClassLoss:
        if pairs.padding_mask is None:
            loss = sigmoid_focal_loss(logits, pairs.onehot, self.alpha, self.gamma, reduction="sum")
        else:
            focal = sigmoid_focal_loss(logits, pairs.onehot, self.alpha, self.gamma, reduction="none")
            loss = (focal * (~pairs.padding_mask)[..., None]).sum()
        return ClassLoss(loss / normalizer)


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
    """`classification` is the decoder's classification loss (a mode's one-to-one loss; None:
    focal with CLASS_WEIGHT); `focal` is always available for the losses that keep it. `giou_eps`
    is added to the union and the enclosing area of the GIoU loss (GIOU_EPS; gt boxes have an area,
    so 0 is safe)."""

    def __init__(
        self,
        num_classes,
        focal_alpha=0.25,
        focal_gamma=2.0,
        class_weight=2.0,
        l1_weight=5.0,
        giou_weight=2.0,
        classification: Optional[ClassificationLossSpec] = None,
        giou_eps: float = 0.0,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.giou_eps = giou_eps
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.l1_weight = l1_weight
        self.giou_weight = giou_weight
        self.focal = ClassificationLossSpec(FocalLoss(focal_alpha, focal_gamma), class_weight)
        self.classification = classification if classification is not None else self.focal

    def forward(
        self,
        logits: torch.Tensor,
        boxes: torch.Tensor,
        targets: List[Dict[str, torch.Tensor]],
        assignment: Assignment,
        normalizer: float,
        classification: Optional[ClassificationLossSpec] = None,
        padding_mask: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """Weighted losses {loss_class, loss_bbox, loss_giou} of one prediction set; the
        classification loss is `classification` (default: the criterion's), padding queries
        (`padding_mask` (N, Q)) left out."""
        if logits.shape[-1] != self.num_classes:
            raise ValueError(f"logits have {logits.shape[-1]} classes, the criterion expects {self.num_classes}")
        classification = classification if classification is not None else self.classification
        logits, boxes = logits.float(), boxes.float()  # losses in float32, also under autocast
        pairs = self.matched_pairs(logits, boxes, targets, assignment, padding_mask)
        loss_class, pair_weight = classification.loss(logits, pairs, normalizer)
        # Sums over P pairs: with no objects in the batch they are a true zero, still in the graph.
        l1 = F.l1_loss(pairs.pred_boxes, pairs.gt_boxes, reduction="none").sum(-1)
        giou = generalized_box_iou_loss(
            box_convert(pairs.pred_boxes, "cxcywh", "xyxy"),
            box_convert(pairs.gt_boxes, "cxcywh", "xyxy"),
            reduction="none",
            eps=self.giou_eps,
        )
        if pair_weight is not None:
            l1, giou = l1 * pair_weight, giou * pair_weight
        return {
            "loss_class": classification.weight * loss_class,
            "loss_bbox": self.l1_weight * l1.sum() / normalizer,
            "loss_giou": self.giou_weight * giou.sum() / normalizer,
        }

    @staticmethod
    def matched_pairs(logits, boxes, targets, assignment: Assignment, padding_mask=None) -> MatchedPairs:
        """The pairs of `assignment`: their gt labels, batch-wide gt ids and boxes, the predicted
        boxes and the one-hot classification target (N, Q, K)."""
        offsets = torch.tensor([0] + [len(t["labels"]) for t in targets], device=assignment.gt_index.device)
        gt_id = offsets.cumsum(0)[assignment.batch_index] + assignment.gt_index
        labels = torch.cat([t["labels"] for t in targets])[gt_id]
        gt_boxes = torch.cat([t["boxes"] for t in targets])[gt_id]
        onehot = torch.zeros_like(logits)
        onehot[assignment.batch_index, assignment.query_index, labels] = 1.0
        pred_boxes = boxes[assignment.batch_index, assignment.query_index]
        return MatchedPairs(assignment, labels, gt_id, pred_boxes, gt_boxes, onehot, padding_mask)

    def decoder_losses(
        self,
        outputs: DecoderOutput,
        targets,
        assign: Callable[[int, torch.Tensor, torch.Tensor], Assignment],
        normalizer: float,
        prefix: str = "",
        aux_loss: bool = True,
        classification: Optional[ClassificationLossSpec] = None,
    ) -> Dict[str, torch.Tensor]:
        """Losses of every decoder layer (the last only without `aux_loss`).

        `assign(layer, logits, boxes)` gives that layer's assignment; the classification loss is
        `classification` (default: the criterion's); the outputs' padding queries are left out.
        Names are `{prefix}loss_class` for the last layer and `{prefix}loss_class_{layer}` for the
        others.
        """
        losses = {}
        for layer, suffix in self.layer_suffixes(outputs.num_layers, aux_loss):
            logits, boxes = outputs.layer(layer)
            assignment = assign(layer, logits, boxes)
            layer_losses = self(logits, boxes, targets, assignment, normalizer, classification, outputs.padding_mask)
            for name, value in layer_losses.items():
                losses[f"{prefix}{name}{suffix}"] = value
        return losses

    LOSS_NAMES = ("loss_class", "loss_bbox", "loss_giou")

    @staticmethod
    def layer_suffixes(num_layers: int, aux_loss: bool = True):
        """(layer, name suffix) of the layers `decoder_losses` trains: "" for the last, "_{layer}" else."""
        last = num_layers - 1
        return [(layer, "" if layer == last else f"_{layer}") for layer in (range(num_layers) if aux_loss else [last])]
