"""Config keys of DAC-DETR: `add_dac_config` adds them to a config that has MODEL.HYBRID_DETR."""
from detectron2.config import CfgNode as CN

__all__ = ["add_dac_config"]


def add_dac_config(cfg):
    """DAC-DETR: the C-decoder (no self-attention) trained one-to-many."""
    model = cfg.MODEL.HYBRID_DETR
    model.DAC = CN()
    dac = model.DAC
    # Matching score = IOU_WEIGHT * IoU(pred, gt) + CLS_WEIGHT * p(gt class).
    dac.MATCH_IOU_WEIGHT = 0.7
    dac.MATCH_CLS_WEIGHT = 0.3
    dac.SCORE_THRESHOLD = 0.4
    dac.TOPK_PER_GT = 6
    dac.MAX_POSITIVES = 75  # per image
    # Which positives survive the cap: "random" (the official code samples them) or "score" (the
    # highest-scoring ones, deterministic).
    dac.CAP_SAMPLING = "random"
    # C-branch losses are normalised by num_boxes * LOSS_NORM_FACTOR.
    dac.LOSS_NORM_FACTOR = 3.0
    # Official-code variants: score the C-branch's classes against the O-branch's boxes, and feed
    # the C-branch at layer 0 with the O-branch's layer-0 self-attention output.
    dac.MATCH_AGAINST_O_BOXES = False
    dac.C_INPUT_FROM_O_SELF_ATTN = False
    # "focal", or "iou_aware_bce" (Align-DETR's loss, the paper's "*" rows; as in the official code its
    # rank weights also weight the C-branch's L1 and GIoU losses).
    dac.CLS_LOSS = "focal"
