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
    # As the official code (models/onetomany.py, deformable_transformer.py): the C-branch's matching
    # scores use the O-branch's boxes of the same layer, and the C-branch's layer-0 input is the
    # O-branch's layer-0 self-attention output. False, False is the paper's text (Q_C^0 = Q, the
    # C-branch's own boxes).
    dac.MATCH_AGAINST_O_BOXES = True
    dac.C_INPUT_FROM_O_SELF_ATTN = True
    # With queries that other modes add to the O pass (DECODER_MODE "dn+dac": DINO's denoising
    # queries), the C-decoder runs them too and trains them with their own losses, as the release
    # (deformable_transformer.py: the C-decoder's input is the whole query sequence; deformable_detr.py
    # SetCriterion: "_dn" losses of the C-decoder's denoising outputs). False: the one-to-one queries alone.
    dac.C_RUNS_EXTRA_QUERIES = True
    # "focal" (the paper's rows without "*"), or "iou_aware_bce": the release's setting, Align-DETR's
    # IoU-aware BCE on both branches (O: one-to-one, rank weight 1; C: rank weights exp(-r / 1.5), which
    # also weight the C-branch's L1 and GIoU losses), class-loss weight IOU_AWARE_BCE_WEIGHT; the
    # two-stage encoder keeps its focal loss (weight CLASS_WEIGHT).
    dac.CLS_LOSS = "focal"
    dac.IOU_AWARE_BCE_WEIGHT = 1.0
