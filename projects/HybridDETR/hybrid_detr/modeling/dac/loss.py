"""Align-DETR's IoU-aware BCE, the classification loss of the official DAC-DETR release."""
import torch
import torch.nn.functional as F

from ..box_ops import batched_box_iou, rank_within_groups
from ..criterion import ClassificationLossSpec, ClassLoss, MatchedPairs

__all__ = ["IoUAwareBCELoss", "iou_aware_bce_spec"]


class IoUAwareBCELoss:
    """Align-DETR's IoU-aware BCE, as the official DAC-DETR release trains both of its branches.

    For each assigned (query, gt) pair with predicted probability p of the gt class and IoU u of
    its box, the target is t = p^alpha * u^(1 - alpha) (detached, at least 0.01) times the rank
    weight exp(-r / tau), r the pair's rank by t among the pairs of the same gt. The loss is
    -t log p - (1 - t) log(1 - p) on those (query, class) entries and -p^gamma log(1 - p)
    everywhere else, summed and divided by the normaliser. The official code also weights each
    pair's L1 and GIoU losses by its rank weight: returned as `ClassLoss.pair_weight`, which
    `DetectionCriterion` applies to the box losses. Padding queries are left out.
    """

    def __init__(self, alpha=0.25, gamma=2.0, tau=1.5):
        self.alpha = alpha
        self.gamma = gamma
        self.tau = tau

    def __call__(self, logits, pairs: MatchedPairs, normalizer) -> ClassLoss:
        assignment, pred_boxes = pairs.assignment, pairs.pred_boxes
        prob = logits.sigmoid()
        n, q, k = logits.shape
        flat = (assignment.batch_index * q + assignment.query_index) * k + pairs.labels
        with torch.no_grad():
            iou = batched_box_iou(pred_boxes[:, None].float(), pairs.gt_boxes[:, None].float())[:, 0, 0]
            quality = (prob.flatten()[flat].float() ** self.alpha * iou ** (1 - self.alpha)).clamp(min=0.01)
            rank = rank_within_groups(quality, pairs.gt_id)
            rank_weight = torch.exp(-rank.float() / self.tau)
            # A (query, class) entry assigned twice keeps its larger target.
            target = torch.zeros(n * q * k, device=logits.device).scatter_reduce(
                0, flat, quality * rank_weight, "amax", include_self=True
            )
            positive = torch.zeros(n * q * k, dtype=torch.bool, device=logits.device)
            positive[flat] = True
        target = target.view_as(logits).to(logits.dtype)
        positive = positive.view_as(logits)
        negative_weight = torch.where(positive, 1 - target, prob**self.gamma)
        positive_weight = torch.where(positive, target, torch.zeros_like(target))
        loss = -positive_weight * F.logsigmoid(logits) - negative_weight * F.logsigmoid(-logits)
        if pairs.padding_mask is not None:
            loss = loss * (~pairs.padding_mask)[..., None]
        return ClassLoss(loss.sum() / normalizer, rank_weight.to(pred_boxes.dtype))


def iou_aware_bce_spec(cfg):
    """With DAC.CLS_LOSS "iou_aware_bce", the release's classification loss of both branches
    (weight DAC.IOU_AWARE_BCE_WEIGHT, its cls_loss_coef 1); None with "focal"."""
    m = cfg.MODEL.HYBRID_DETR
    if m.DAC.CLS_LOSS == "focal":
        return None
    if m.DAC.CLS_LOSS != "iou_aware_bce":
        raise ValueError(f"MODEL.HYBRID_DETR.DAC.CLS_LOSS must be 'focal' or 'iou_aware_bce', got {m.DAC.CLS_LOSS!r}")
    return ClassificationLossSpec(IoUAwareBCELoss(gamma=m.FOCAL_GAMMA), m.DAC.IOU_AWARE_BCE_WEIGHT)
