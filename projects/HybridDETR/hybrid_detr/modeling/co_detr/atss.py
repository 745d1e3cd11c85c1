"""ATSS (Zhang et al., CVPR 2020) as Co-DETR's first auxiliary head: one square anchor per
location, Adaptive Training Sample Selection, focal + GIoU + centerness losses.

Settings as the official Co-Deformable-DETR R-50 config (Sense-X/Co-DETR,
projects/configs/co_deformable_detr/co_deformable_detr_r50_1x_coco.py lines 126-150, 199) and
its head (projects/models/co_atss_head.py): anchors of side 8 * stride centred at
(i + offset) * stride (mmdet's center_offset 0 by default), one 3x3 conv + GN + ReLU per tower,
deltas with means 0 and stds (0.1, 0.1, 0.2, 0.2) decoded before a GIoU loss (reg_decoded_bbox),
the GIoU of each positive weighted by its centerness target and normalised by their sum,
focal (alpha 0.25, gamma 2) and centerness BCE normalised by sum over images of
max(positives, 1) (co_atss_head.py line 365), loss weights 1 / 2 / 1 (times lambda2 * decoder
layers in the branch). Anchors whose location lies on an image's padding are invalid (mmdet's
valid flags; allowed_border -1): never positive, no loss.

The assigner is vectorised over the batch: ground truths are padded to the largest count in the
batch (with a validity mask), so one set of tensor ops assigns every image at once.
"""
from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_iou, generalized_box_iou_loss, sigmoid_focal_loss

from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.structures import ImageList, Instances

from ..box_ops import pad_targets
from ..criterion import mean_across_workers
from ..token_layout import LevelLayout
from .adapter import group_norm
from .positive_queries import AuxNegatives, AuxPositives, image_sizes_tensor


@dataclass
class ATSSAssignment:
    gt_index: torch.Tensor  # (N, A) int64: the gt each anchor is trained towards, -1 = background
    iou: torch.Tensor  # (N, A) IoU of the anchor with that gt (0 for background)

    @property
    def positive(self):
        return self.gt_index >= 0


class ATSSAssigner:
    """Adaptive Training Sample Selection.

    For every gt: on each level, the `topk` anchors whose centres are closest to the gt's centre
    are candidates; the IoU threshold is mean + std (unbiased) of the candidates' IoUs with the gt;
    candidates at or above it whose centre lies inside the gt (by more than `eps` pixels) are
    positives. An anchor positive for several gts goes to the one it overlaps most.
    A gt whose box holds no anchor centre gets no positive (as in ATSS).
    """

    def __init__(self, topk: int = 9, eps: float = 0.01):
        self.topk = topk
        self.eps = eps

    @torch.no_grad()
    def __call__(
        self,
        anchors: torch.Tensor,
        num_anchors_per_level: Sequence[int],
        gt_boxes: torch.Tensor,
        gt_valid: torch.Tensor,
        anchor_valid: torch.Tensor,
    ) -> ATSSAssignment:
        """anchors (A, 4) xyxy, level-major; gt_boxes (N, G, 4) xyxy; gt_valid (N, G) bool;
        anchor_valid (N, A) bool (False for anchors centred on an image's padding)."""
        n, g = gt_valid.shape
        a = anchors.shape[0]
        if sum(num_anchors_per_level) != a:
            raise ValueError(f"ATSS: {a} anchors but levels of {list(num_anchors_per_level)} anchors")
        if g == 0:
            return ATSSAssignment(
                torch.full((n, a), -1, dtype=torch.int64, device=anchors.device), anchors.new_zeros(n, a)
            )
        anchors = anchors.float()
        gt_boxes = gt_boxes.float()
        ious = box_iou(gt_boxes.reshape(-1, 4), anchors).view(n, g, a)
        anchor_centers = (anchors[:, :2] + anchors[:, 2:]) / 2
        gt_centers = (gt_boxes[..., :2] + gt_boxes[..., 2:]) / 2
        distances = (gt_centers[:, :, None, :] - anchor_centers[None, None]).norm(dim=-1)  # (N, G, A)
        distances = distances.masked_fill(~anchor_valid[:, None, :], float("inf"))

        candidates = []  # per level, the topk closest anchors (global indices)
        start = 0
        for count in num_anchors_per_level:
            k = min(self.topk, count)
            if k > 0:
                candidates.append(distances[..., start : start + count].topk(k, dim=-1, largest=False).indices + start)
            start += count
        candidates = torch.cat(candidates, dim=-1)  # (N, G, C)
        candidate_valid = anchor_valid[:, None, :].expand(n, g, a).gather(2, candidates) & gt_valid[..., None]
        candidate_ious = ious.gather(2, candidates)

        # Threshold per gt: mean + unbiased std of its (valid) candidates' IoUs.
        weight = candidate_valid.float()
        count = weight.sum(-1, keepdim=True)
        mean = (candidate_ious * weight).sum(-1, keepdim=True) / count.clamp(min=1)
        var = ((candidate_ious - mean) ** 2 * weight).sum(-1, keepdim=True) / (count - 1).clamp(min=1)
        threshold = mean + var.sqrt()

        centers = anchor_centers[candidates]  # (N, G, C, 2)
        box = gt_boxes[:, :, None, :]
        inside = torch.stack(
            (centers[..., 0] - box[..., 0], centers[..., 1] - box[..., 1], box[..., 2] - centers[..., 0], box[..., 3] - centers[..., 1]),
            dim=-1,
        ).min(-1).values > self.eps
        positive = candidate_valid & (candidate_ious >= threshold) & inside

        # Anchors positive for several gts keep the one with the highest IoU.
        scores = torch.full_like(ious, -1.0)
        scores.scatter_(2, candidates, torch.where(positive, candidate_ious, torch.full_like(candidate_ious, -1.0)))
        best_iou, best_gt = scores.max(dim=1)  # (N, A)
        assigned = best_iou >= 0
        return ATSSAssignment(torch.where(assigned, best_gt, torch.full_like(best_gt, -1)), best_iou.clamp(min=0))


def centerness_targets(anchor_centers: torch.Tensor, gt_boxes: torch.Tensor) -> torch.Tensor:
    """FCOS/ATSS centerness of points (P, 2) inside boxes (P, 4) xyxy: sqrt of the min/max ratios."""
    left = anchor_centers[:, 0] - gt_boxes[:, 0]
    top = anchor_centers[:, 1] - gt_boxes[:, 1]
    right = gt_boxes[:, 2] - anchor_centers[:, 0]
    bottom = gt_boxes[:, 3] - anchor_centers[:, 1]
    lr = torch.stack((left, right), -1)
    tb = torch.stack((top, bottom), -1)
    ratio = (lr.min(-1).values / lr.max(-1).values) * (tb.min(-1).values / tb.max(-1).values)
    return ratio.clamp(min=0).sqrt()


class ATSSHead(nn.Module):
    """Shared conv towers over the adapter's levels -> class logits, box deltas (w.r.t. the anchor,
    detectron2's Box2BoxTransform with weights 10, 10, 5, 5) and a centerness logit."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        strides: Sequence[int],
        anchor_scale: float = 8.0,
        topk: int = 9,
        stacked_convs: int = 1,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        class_weight: float = 1.0,
        giou_weight: float = 2.0,
        centerness_weight: float = 1.0,
        anchor_offset: float = 0.0,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.strides = list(strides)
        # One anchor per location, centred at (i + anchor_offset) * stride: mmdet's default
        # center_offset 0 puts it on the cell's top-left corner, 0.5 on the token's centre.
        self.anchor_generator = DefaultAnchorGenerator(
            sizes=[[anchor_scale * s] for s in self.strides], aspect_ratios=[[1.0]], strides=self.strides,
            offset=anchor_offset,
        )
        self.box2box = Box2BoxTransform(weights=(10.0, 10.0, 5.0, 5.0))
        self.assigner = ATSSAssigner(topk)
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.class_weight, self.giou_weight, self.centerness_weight = class_weight, giou_weight, centerness_weight

        def tower():
            layers = []
            for _ in range(stacked_convs):
                # No conv bias before the GroupNorm (mmcv ConvModule, bias='auto').
                layers += [nn.Conv2d(in_channels, in_channels, 3, padding=1, bias=False), group_norm(in_channels), nn.ReLU(inplace=True)]
            return nn.Sequential(*layers)

        self.cls_tower, self.reg_tower = tower(), tower()
        self.cls_logits = nn.Conv2d(in_channels, num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.centerness = nn.Conv2d(in_channels, 1, 3, padding=1)
        self.scales = nn.Parameter(torch.ones(len(self.strides)))  # per-level scale of the deltas
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.constant_(self.cls_logits.bias, -4.59511985013459)  # prior p = 0.01

    def predict(self, maps: List[torch.Tensor]):
        """Flattened predictions over all levels: logits (N, A, K), deltas (N, A, 4), centerness (N, A)."""
        logits, deltas, centerness = [], [], []
        for level, x in enumerate(maps):
            cls_feat, reg_feat = self.cls_tower(x), self.reg_tower(x)
            logits.append(self.cls_logits(cls_feat).flatten(2))
            deltas.append((self.bbox_pred(reg_feat) * self.scales[level]).flatten(2))
            centerness.append(self.centerness(reg_feat).flatten(2))
        return (
            torch.cat(logits, 2).transpose(1, 2),
            torch.cat(deltas, 2).transpose(1, 2),
            torch.cat(centerness, 2)[:, 0],
        )

    def anchors(self, maps: List[torch.Tensor]):
        """All anchors (A, 4) xyxy in the padded image's pixels, and the count per level."""
        per_level = self.anchor_generator(maps)
        return torch.cat([b.tensor for b in per_level]), [len(b) for b in per_level]

    def forward(self, maps: List[torch.Tensor], images: ImageList, gt_instances: List[Instances]):
        """Losses (weighted, unscaled), the positive anchors for Co-DETR's positive queries and
        the negatives (valid anchors not assigned to any gt) for their padding.
        `images`: the padded batch (its image sizes tell which anchors lie on padding)."""
        if len(maps) != len(self.strides):
            raise ValueError(f"ATSS head built for {len(self.strides)} levels, got {len(maps)} maps")
        image_sizes = image_sizes_tensor(images, maps[0].device)
        flat_features = LevelLayout.flatten(maps)  # in anchor order: the positive queries' content
        logits, deltas, centerness = self.predict(maps)
        anchors, num_per_level = self.anchors(maps)
        centers = (anchors[:, :2] + anchors[:, 2:]) / 2
        anchor_valid = (centers[None, :, 0] < image_sizes[:, None, 1]) & (centers[None, :, 1] < image_sizes[:, None, 0])
        gt_labels, gt_boxes, gt_valid = pad_targets(
            [x.gt_classes for x in gt_instances], [x.gt_boxes.tensor.float() for x in gt_instances]
        )
        assignment = self.assigner(anchors, num_per_level, gt_boxes, gt_valid, anchor_valid)

        batch_index, anchor_index = assignment.positive.nonzero(as_tuple=True)
        gt_index = assignment.gt_index[batch_index, anchor_index]
        matched_boxes = gt_boxes[batch_index, gt_index]
        onehot = torch.zeros_like(logits)
        onehot[batch_index, anchor_index, gt_labels[batch_index, gt_index]] = 1.0

        # mmdet's num_total_samples: every image counts at least one positive.
        per_image = torch.bincount(batch_index, minlength=len(gt_instances)).clamp(min=1).sum()
        num_pos = mean_across_workers(per_image.to(logits.dtype)).clamp(min=1.0)
        focal = sigmoid_focal_loss(logits, onehot, self.focal_alpha, self.focal_gamma, reduction="none")
        loss_cls = (focal.sum(-1) * anchor_valid).sum() / num_pos

        # Positive-box losses: sums over the positives, a true (in-graph) zero when there are none.
        pos_anchors = anchors[anchor_index]
        pred_boxes = self.box2box.apply_deltas(deltas[batch_index, anchor_index], pos_anchors)
        target_centerness = centerness_targets(centers[anchor_index], matched_boxes)
        centerness_norm = mean_across_workers(target_centerness.sum().detach()).clamp(min=1.0)
        giou = generalized_box_iou_loss(pred_boxes, matched_boxes, reduction="none")
        loss_bbox = (giou * target_centerness).sum() / centerness_norm
        loss_centerness = (
            F.binary_cross_entropy_with_logits(
                centerness[batch_index, anchor_index], target_centerness, reduction="sum"
            )
            / num_pos
        )
        losses: Dict[str, torch.Tensor] = {
            "loss_cls": self.class_weight * loss_cls,
            "loss_bbox": self.giou_weight * loss_bbox,
            "loss_centerness": self.centerness_weight * loss_centerness,
        }
        positives = AuxPositives(
            batch_index=batch_index,
            boxes=pos_anchors,
            gt_index=gt_index,
            score=assignment.iou[batch_index, anchor_index],
            features=flat_features[batch_index, anchor_index],
        )
        # Negatives: valid anchors trained as background (the official pool is every anchor
        # labelled background, those on batch padding included -- with zero boxes there; ours
        # keeps to the image).
        neg_batch, neg_anchor = (anchor_valid & ~assignment.positive).nonzero(as_tuple=True)
        negatives = AuxNegatives(
            batch_index=neg_batch,
            boxes=anchors[neg_anchor],
            feature_rows=neg_batch * anchors.shape[0] + neg_anchor,
            feature_table=flat_features.flatten(0, 1),
        )
        return losses, positives, negatives
