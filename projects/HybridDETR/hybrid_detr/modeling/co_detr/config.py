"""Config keys of Co-DETR: `add_co_detr_config` adds them to a config that has MODEL.HYBRID_DETR.

Defaults follow the official Co-Deformable-DETR R-50 release (Sense-X/Co-DETR, mmdet 2.x:
projects/configs/co_deformable_detr/co_deformable_detr_r50_1x_coco.py, "the official config" below,
and projects/models/*.py); where HybridDETR differs, the comment says how.
"""
from detectron2.config import CfgNode as CN

__all__ = ["add_co_detr_config"]


def add_co_detr_config(cfg):
    """Co-DETR: auxiliary one-to-many heads on the encoder and their customized positive queries."""
    model = cfg.MODEL.HYBRID_DETR
    model.CO_DETR = CN()
    co = model.CO_DETR
    co.NUM_AUX_HEADS = 2  # 0: none, 1: ATSS, 2: ATSS + Faster R-CNN
    co.LAMBDA1 = 1.0  # weight of the decoder losses on the customized positive queries (head lambda_1)
    co.LAMBDA2 = 2.0  # weight of the auxiliary heads' own losses (config line 7, lambda_2)
    # The official config multiplies every auxiliary-head loss weight by the number of decoder
    # layers too (loss_weight=1.0*num_dec_layer*lambda_2, lines 44-45, 124-125, 147-150).
    co.SCALE_AUX_BY_DEC_LAYERS = True

    # ---- customized positive queries (co_deformable_detr_head.py, get_aux_targets)
    # Per head and batch: M = clamp(most positives in an image, MIN, MAX) queries per image.
    co.MIN_POS_QUERIES = 9  # max(9, ...), line 388
    co.MAX_POS_QUERIES = 300  # max_pos_coords=300, line 26
    # An image with more than M positives keeps: "random" M of them (torch.randperm, line 419,
    # official) or the "best" M by IoU with their gt.
    co.POS_QUERY_SUBSET = "random"
    # Padding of an image's group up to M queries. False (official use_zero_padding=False, line
    # 32): random negatives of the head (ATSS: unassigned anchors on the image; Faster R-CNN: the
    # RoI head's sampled background proposals), trained as background (classification only) and
    # seen in self-attention. True: padding queries masked out of self-attention and of the loss.
    co.ZERO_PADDING = False
    # Per-head embedding added to the positional query (transformer.py lines 157-159, 417).
    # "scalar": the official R-50 release, nn.Embedding(num_co_heads, 1, ...) -- one learned
    # scalar per head, added to every channel (kept there "for reproducing our results with
    # ResNet-50"); "vector": one d-vector per head (the fix the authors suggest).
    # "none": no per-head embedding; what a decoder that recomputes positions from the reference boxes
    # (QUERY_POSITION_FROM_REFERENCE, Co-DINO) needs, since the embedding would get no gradient there.
    co.HEAD_EMBED = "scalar"

    # ---- ATSS (bbox_head in the official config, lines 126-150, and train_cfg line 199)
    co.ATSS_TOPK = 9
    co.ATSS_ANCHOR_SCALE = 8.0  # octave_base_scale 8, one ratio: anchor side = 8 * stride
    # Anchor centre = (i + offset) * stride; mmdet's AnchorGenerator default center_offset is 0
    # (anchors centred on the cell's top-left corner). 0.5 centres them on the token.
    co.ATSS_ANCHOR_OFFSET = 0.0
    co.ATSS_STACKED_CONVS = 1  # 3x3 conv + GN + ReLU layers in each of the cls / reg towers

    # ---- Faster R-CNN (detectron2's RPN + StandardROIHeads on the adapter's levels)
    # RPN anchors (lines 33-38): octave_base_scale 4, scales_per_octave 3, ratios 0.5 / 1 / 2:
    # sizes 4 * 2^(i/3) * stride, i < 3 (4, 5.04, 6.35 x stride), 9 anchors per location.
    co.RPN_ANCHOR_SCALE = 4.0
    co.RPN_SCALES_PER_OCTAVE = 3
    co.RPN_ASPECT_RATIOS = [0.5, 1.0, 2.0]
    # mmdet's MaxIoUAssigner (lines 162-167): match_low_quality with min_pos_iou 0.3 -- a gt's
    # best anchors become positive only if that best IoU is >= 0.3. detectron2's Matcher has no
    # such floor; 0 gives detectron2's behaviour.
    co.RPN_LOW_QUALITY_MIN_IOU = 0.3
    co.RPN_PRE_NMS_TOPK_TRAIN = 4000  # rpn_proposal nms_pre, line 178
    co.RPN_POST_NMS_TOPK_TRAIN = 1000  # rpn_proposal max_per_img, line 179
    co.ROI_BATCH_SIZE_PER_IMAGE = 512  # rcnn sampler num, line 192
    co.ROI_FC_DIM = 1024  # Shared2FCBBoxHead fc_out_channels, line 114
    # RoIAlign samples per bin and axis; 0 = adaptive, ceil(bin size in cells) (sampling_ratio=0, line 107).
    co.ROI_POOLER_SAMPLING_RATIO = 0
    # Official: L1 on the RPN deltas, GIoU (weight 10) on the RoI head's decoded boxes.
    co.RPN_BBOX_REG_LOSS_TYPE = "smooth_l1"  # with SMOOTH_L1_BETA 0, i.e. L1
    co.ROI_BBOX_REG_LOSS_TYPE = "giou"
    co.ROI_BBOX_REG_LOSS_WEIGHT = 10.0
