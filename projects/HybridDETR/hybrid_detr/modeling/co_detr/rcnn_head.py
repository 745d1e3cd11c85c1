"""Faster R-CNN as Co-DETR's second auxiliary head: detectron2's own `RPN` and `StandardROIHeads`,
built from a clone of the config that points them at the adapter's levels.

Settings follow the official Co-Deformable-DETR config: anchors of side 8 * stride with aspect
ratios 0.5, 1, 2; RPN sampling 256 (half positive), 4000 / 1000 proposals before / after NMS;
RoI sampling 512 (a quarter positive, IoU 0.5), 7x7 RoIAlign, two 1024-d FC layers, L1 on the RPN
deltas and GIoU (weight 10) on the RoI head's decoded boxes.

The positive queries come from the RoI head's sampled positive proposals (ground-truth boxes
included, as detectron2 appends them), their targets the gt each was matched to. Their content is
the adapter's feature RoI-pooled over the proposal box (RoIAlign to 1x1, adaptive sampling grid,
i.e. the box's mean feature, on the level detectron2's pooler assigns to the box's size).
"""
import contextlib
from typing import Dict, List, Sequence

import torch
from torch import nn

from detectron2.layers import ShapeSpec
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.proposal_generator import RPN
from detectron2.modeling.roi_heads import StandardROIHeads
from detectron2.structures import Boxes, Instances
from detectron2.structures.boxes import matched_pairwise_iou
from detectron2.utils.events import EventStorage, get_event_storage

from .atss import average_across_workers
from .positive_queries import AuxPositives


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


def rcnn_config(cfg, level_names: Sequence[str], strides: Sequence[int]):
    """A clone of `cfg` whose MODEL.RPN / ROI_* keys describe the auxiliary Faster R-CNN."""
    co = cfg.MODEL.HYBRID_DETR.CO_DETR
    c = cfg.clone()
    c.defrost()
    c.MODEL.MASK_ON = False
    c.MODEL.KEYPOINT_ON = False
    c.MODEL.ANCHOR_GENERATOR.NAME = "DefaultAnchorGenerator"
    c.MODEL.ANCHOR_GENERATOR.SIZES = [[co.RPN_ANCHOR_SCALE * s] for s in strides]
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
    roi.IN_FEATURES = list(level_names)
    roi.NUM_CLASSES = cfg.MODEL.HYBRID_DETR.NUM_CLASSES
    roi.BATCH_SIZE_PER_IMAGE = 512
    roi.POSITIVE_FRACTION = 0.25
    roi.IOU_THRESHOLDS = [0.5]
    roi.IOU_LABELS = [0, 1]
    roi.PROPOSAL_APPEND_GT = True
    box = c.MODEL.ROI_BOX_HEAD
    box.NAME = "FastRCNNConvFCHead"
    box.NUM_CONV = 0
    box.NUM_FC = 2
    box.FC_DIM = 1024
    box.NORM = ""
    box.POOLER_RESOLUTION = 7
    box.POOLER_SAMPLING_RATIO = 0
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
        self.roi_heads = StandardROIHeads(c, shapes)
        self.num_classes = c.MODEL.ROI_HEADS.NUM_CLASSES
        self.content_pooler = ROIPooler(
            output_size=1, scales=[1.0 / s for s in strides], sampling_ratio=0, pooler_type="ROIAlignV2"
        )

    def forward(self, maps: List[torch.Tensor], images, gt_instances: List[Instances]):
        """Losses (weighted, unscaled) and the positive proposals. `images`: the padded ImageList."""
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
        mean_sampled = average_across_workers(torch.tensor(num_sampled, device=images.tensor.device)).item()
        roi_losses = {k: v * (num_sampled / max(mean_sampled, 1.0)) for k, v in roi_losses.items()}

        # Sampled proposals per image -> the flat positives (images without gt have none).
        positive = [p.gt_classes != self.num_classes for p in sampled]
        boxes = [p.proposal_boxes[k] for p, k in zip(sampled, positive)]
        gt_boxes = [(p.gt_boxes if p.has("gt_boxes") else p.proposal_boxes)[k] for p, k in zip(sampled, positive)]
        gt_index = torch.cat([(p.gt_index if p.has("gt_index") else p.gt_classes)[k] for p, k in zip(sampled, positive)])
        counts = torch.tensor([len(b) for b in boxes], device=gt_index.device)
        batch_index = torch.repeat_interleave(torch.arange(len(boxes), device=gt_index.device), counts)
        features_pooled = self.content_pooler(maps, boxes).flatten(1)  # (P, C)
        positives = AuxPositives(
            batch_index=batch_index,
            boxes=Boxes.cat(boxes).tensor,
            gt_index=gt_index,
            score=matched_pairwise_iou(Boxes.cat(boxes), Boxes.cat(gt_boxes)),
            features=features_pooled,
        )
        losses: Dict[str, torch.Tensor] = {**rpn_losses, **roi_losses}
        return losses, positives
