"""Faster R-CNN as Co-DETR's second auxiliary head: detectron2's own `RPN` and `StandardROIHeads`,
built from a clone of the config that points them at the adapter's levels.

Settings follow the official Co-Deformable-DETR R-50 config (Sense-X/Co-DETR,
projects/configs/co_deformable_detr/co_deformable_detr_r50_1x_coco.py): RPN anchors (lines
33-38) of sizes 4 * 2^(i/3) * stride, i < 3, ratios 0.5 / 1 / 2 (9 per location) centred at
i * stride (mmdet's center_offset 0); RPN assignment IoU 0.3 / 0.7 with low-quality matches
floored at IoU 0.3 (lines 162-167, mmdet's min_pos_iou; detectron2's Matcher has no floor, so
`FlooredMatcher` adds it), sampling 256 (half positive), 4000 / 1000 proposals before / after
NMS 0.7, no minimum size (lines 168-180); RoI sampling 512 (a quarter positive, IoU 0.5, gt boxes
added as proposals; lines 182-196); 7x7 RoIAlign (aligned, adaptive sampling) on the first four
levels (featmap_strides 8-64 of a five-level adapter: all but the adapter's extra level; mmdet's
finest_scale 112 gives the same level per box size as detectron2's canonical 224 / level 4), two
1024-d FC layers; L1 on the RPN deltas, GIoU (weight 10) on the RoI head's decoded boxes.
Known differences: for a low-quality match mmdet trains the anchor towards the gt it is the best
anchor of, detectron2 towards the gt it overlaps most; mmdet truncates every image's sampled
RoIs to the smallest count in the batch (co_roi_head.py lines 109-116) before picking queries, we
do not.

The positive queries come from the RoI head's sampled positive proposals (ground-truth boxes
included), their targets the gt each was matched to; the padding negatives from its sampled
background proposals (co_roi_head.py lines 107-131). The content feature of both is the mean
of the 7x7 RoIAlign features the box head pooled for that proposal (line 120).
"""
import contextlib
from typing import Dict, List, Sequence

import torch
from torch import nn

from detectron2.layers import ShapeSpec, nonzero_tuple
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.proposal_generator import RPN
from detectron2.modeling.roi_heads import StandardROIHeads
from detectron2.structures import Boxes, Instances
from detectron2.structures.boxes import matched_pairwise_iou
from detectron2.utils.events import EventStorage, get_event_storage

from ..criterion import mean_across_workers
from .positive_queries import AuxNegatives, AuxPositives


@contextlib.contextmanager
def event_storage():
    """detectron2's RPN and RoI heads log statistics to the current EventStorage; outside a
    trainer (tests, benchmarks) give them a throw-away one."""
    try:
        get_event_storage()
    except AssertionError:
        with EventStorage():
            yield
    else:
        yield


class FlooredMatcher(Matcher):
    """detectron2's Matcher whose low-quality matches need IoU >= `min_low_quality` (mmdet's
    MaxIoUAssigner `min_pos_iou` with match_low_quality): a gt whose best anchor overlaps it
    less than that gets no extra positive (detectron2 would make every anchor tied at that
    best IoU positive, IoU 0 included)."""

    def __init__(self, thresholds, labels, min_low_quality: float):
        super().__init__(thresholds, labels, allow_low_quality_matches=True)
        self.min_low_quality = min_low_quality

    def set_low_quality_matches_(self, match_labels, match_quality_matrix):
        highest, _ = match_quality_matrix.max(dim=1)
        best = (match_quality_matrix == highest[:, None]) & (highest[:, None] >= self.min_low_quality)
        _, pred_inds = nonzero_tuple(best)
        match_labels[pred_inds] = 1


class CoStandardROIHeads(StandardROIHeads):
    """StandardROIHeads that, in training, keeps on each sampled proposal the mean of the 7x7
    features its box head pooled (field `pooled_feature`): the official positive-query content
    for Faster R-CNN (co_roi_head.py line 120), without pooling twice."""

    def _forward_box(self, features: Dict[str, torch.Tensor], proposals: List[Instances]):
        if not self.training or self.train_on_pred_boxes:
            return super()._forward_box(features, proposals)
        pooled = self.box_pooler([features[f] for f in self.box_in_features], [x.proposal_boxes for x in proposals])
        for p, mean in zip(proposals, pooled.mean(dim=(2, 3)).split([len(x) for x in proposals])):
            p.pooled_feature = mean
        predictions = self.box_predictor(self.box_head(pooled))
        return self.box_predictor.losses(predictions, proposals)


def rcnn_config(cfg, level_names: Sequence[str], strides: Sequence[int]):
    """A clone of `cfg` whose MODEL.RPN / ROI_* keys describe the auxiliary Faster R-CNN."""
    co = cfg.MODEL.HYBRID_DETR.CO_DETR
    c = cfg.clone()
    c.defrost()
    c.MODEL.MASK_ON = False
    c.MODEL.KEYPOINT_ON = False
    c.MODEL.ANCHOR_GENERATOR.NAME = "DefaultAnchorGenerator"
    octave = [co.RPN_ANCHOR_SCALE * 2 ** (i / co.RPN_SCALES_PER_OCTAVE) for i in range(co.RPN_SCALES_PER_OCTAVE)]
    c.MODEL.ANCHOR_GENERATOR.SIZES = [[scale * s for scale in octave] for s in strides]
    c.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = [list(co.RPN_ASPECT_RATIOS)]
    c.MODEL.ANCHOR_GENERATOR.OFFSET = 0.0
    rpn = c.MODEL.RPN
    rpn.HEAD_NAME = "StandardRPNHead"
    rpn.IN_FEATURES = list(level_names)
    rpn.IOU_THRESHOLDS = [0.3, 0.7]
    rpn.IOU_LABELS = [0, -1, 1]
    rpn.BATCH_SIZE_PER_IMAGE = 256
    rpn.POSITIVE_FRACTION = 0.5
    rpn.BOUNDARY_THRESH = -1
    rpn.NMS_THRESH = 0.7
    rpn.PRE_NMS_TOPK_TRAIN = co.RPN_PRE_NMS_TOPK_TRAIN
    rpn.POST_NMS_TOPK_TRAIN = co.RPN_POST_NMS_TOPK_TRAIN
    rpn.BBOX_REG_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
    rpn.BBOX_REG_LOSS_TYPE = co.RPN_BBOX_REG_LOSS_TYPE
    rpn.SMOOTH_L1_BETA = 0.0
    rpn.LOSS_WEIGHT = 1.0
    rpn.BBOX_REG_LOSS_WEIGHT = 1.0
    c.MODEL.PROPOSAL_GENERATOR.MIN_SIZE = 0
    roi = c.MODEL.ROI_HEADS
    roi.NAME = "StandardROIHeads"
    # The official RoI extractor pools from the first four of five levels: all but the adapter's extra one.
    roi.IN_FEATURES = list(level_names[:-1]) if len(level_names) > 1 else list(level_names)
    roi.NUM_CLASSES = cfg.MODEL.HYBRID_DETR.NUM_CLASSES
    roi.BATCH_SIZE_PER_IMAGE = co.ROI_BATCH_SIZE_PER_IMAGE
    roi.POSITIVE_FRACTION = 0.25
    roi.IOU_THRESHOLDS = [0.5]
    roi.IOU_LABELS = [0, 1]
    roi.PROPOSAL_APPEND_GT = True
    box = c.MODEL.ROI_BOX_HEAD
    box.NAME = "FastRCNNConvFCHead"
    box.NUM_CONV = 0
    box.NUM_FC = 2
    box.FC_DIM = co.ROI_FC_DIM
    box.NORM = ""
    box.POOLER_RESOLUTION = 7
    box.POOLER_SAMPLING_RATIO = co.ROI_POOLER_SAMPLING_RATIO
    box.POOLER_TYPE = "ROIAlignV2"
    box.CLS_AGNOSTIC_BBOX_REG = False
    box.BBOX_REG_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
    box.BBOX_REG_LOSS_TYPE = co.ROI_BBOX_REG_LOSS_TYPE
    box.BBOX_REG_LOSS_WEIGHT = co.ROI_BBOX_REG_LOSS_WEIGHT
    box.SMOOTH_L1_BETA = 0.0
    box.TRAIN_ON_PRED_BOXES = False
    return c


class FasterRCNNAuxHead(nn.Module):
    def __init__(self, cfg, in_channels: int, strides: Sequence[int]):
        super().__init__()
        self.level_names = [f"co{i}" for i in range(len(strides))]
        shapes = {name: ShapeSpec(channels=in_channels, stride=int(s)) for name, s in zip(self.level_names, strides)}
        c = rcnn_config(cfg, self.level_names, strides)
        self.rpn = RPN(c, shapes)
        self.rpn.anchor_matcher = FlooredMatcher(
            c.MODEL.RPN.IOU_THRESHOLDS, c.MODEL.RPN.IOU_LABELS, cfg.MODEL.HYBRID_DETR.CO_DETR.RPN_LOW_QUALITY_MIN_IOU
        )
        self.roi_heads = CoStandardROIHeads(c, shapes)
        self.num_classes = c.MODEL.ROI_HEADS.NUM_CLASSES

    def forward(self, maps: List[torch.Tensor], images, gt_instances: List[Instances]):
        """Losses (weighted, unscaled), the positive proposals and the background ones (the
        RoI head's samples). `images`: the padded ImageList."""
        if len(maps) != len(self.level_names):
            raise ValueError(f"Faster R-CNN aux head built for {len(self.level_names)} levels, got {len(maps)} maps")
        features = dict(zip(self.level_names, maps))
        # `gt_index` rides along: detectron2 copies every "gt_*" field onto the sampled proposals.
        targets = [
            Instances(x.image_size, gt_boxes=x.gt_boxes, gt_classes=x.gt_classes,
                      gt_index=torch.arange(len(x), device=x.gt_classes.device))
            for x in gt_instances
        ]
        with event_storage():
            proposals, rpn_losses = self.rpn(images, features, targets)
            sampled, roi_losses = self.roi_heads(images, features, proposals, targets)
        # detectron2's RoI losses are means over this worker's sampled proposals; rescale them to
        # means over all workers' proposals, so that DDP's gradient average equals one big batch.
        num_sampled = float(sum(len(p) for p in sampled))
        mean_sampled = mean_across_workers(torch.tensor(num_sampled, device=images.tensor.device)).item()
        roi_losses = {k: v * (num_sampled / max(mean_sampled, 1.0)) for k, v in roi_losses.items()}

        # The batch's sampled proposals, flat. Images without gt have neither gt_boxes nor
        # gt_index on their proposals (all background): stand-ins that are never used.
        boxes = torch.cat([p.proposal_boxes.tensor for p in sampled])
        gt_classes = torch.cat([p.gt_classes for p in sampled])
        gt_boxes = torch.cat([(p.gt_boxes if p.has("gt_boxes") else p.proposal_boxes).tensor for p in sampled])
        gt_index = torch.cat([p.gt_index if p.has("gt_index") else p.gt_classes for p in sampled])
        pooled = torch.cat([p.pooled_feature for p in sampled])
        counts = torch.tensor([len(p) for p in sampled], device=boxes.device)
        batch_index = torch.repeat_interleave(torch.arange(len(sampled), device=boxes.device), counts)
        positive = gt_classes != self.num_classes
        pos = positive.nonzero().squeeze(1)
        neg = (~positive).nonzero().squeeze(1)
        positives = AuxPositives(
            batch_index=batch_index[pos],
            boxes=boxes[pos],
            gt_index=gt_index[pos],
            score=matched_pairwise_iou(Boxes(boxes[pos]), Boxes(gt_boxes[pos])),
            features=pooled[pos],
        )
        negatives = AuxNegatives(batch_index=batch_index[neg], boxes=boxes[neg], feature_rows=neg, feature_table=pooled)
        losses: Dict[str, torch.Tensor] = {**rpn_losses, **roi_losses}
        return losses, positives, negatives
