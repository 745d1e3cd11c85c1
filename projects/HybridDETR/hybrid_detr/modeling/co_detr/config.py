"""Config keys of Co-DETR: `add_co_detr_config` adds them to a config that has MODEL.HYBRID_DETR."""
from detectron2.config import CfgNode as CN

__all__ = ["add_co_detr_config"]


def add_co_detr_config(cfg):
    """Co-DETR: auxiliary one-to-many heads on the encoder and their customized positive queries."""
    model = cfg.MODEL.HYBRID_DETR
    model.CO_DETR = CN()
    co = model.CO_DETR
    co.NUM_AUX_HEADS = 2  # 0: none, 1: ATSS, 2: ATSS + Faster R-CNN
    co.LAMBDA1 = 1.0  # weight of the decoder losses on the customized positive queries
    co.LAMBDA2 = 2.0  # weight of the auxiliary heads' own losses
    # The official configs multiply every auxiliary-head loss weight by the number of decoder
    # layers too (lambda2 * DEC_LAYERS), to balance the per-layer decoder losses.
    co.SCALE_AUX_BY_DEC_LAYERS = True
    co.MIN_POS_QUERIES = 9
    co.MAX_POS_QUERIES = 300
    # ATSS: one square anchor per location, side ATSS_ANCHOR_SCALE * stride, centred on the cell.
    co.ATSS_TOPK = 9
    co.ATSS_ANCHOR_SCALE = 8.0  # anchor side = scale * stride
    co.ATSS_STACKED_CONVS = 1  # 3x3 conv + GN + ReLU layers in each of the cls / reg towers
    # Faster R-CNN (detectron2's RPN + StandardROIHeads on the adapter's levels).
    co.RPN_ANCHOR_SCALE = 8.0  # anchor size = scale * stride, aspect ratios below
    co.RPN_ASPECT_RATIOS = [0.5, 1.0, 2.0]
    co.RPN_PRE_NMS_TOPK_TRAIN = 4000
    co.RPN_POST_NMS_TOPK_TRAIN = 1000
    # Official: L1 on the RPN deltas, GIoU (weight 10) on the RoI head's decoded boxes.
    co.RPN_BBOX_REG_LOSS_TYPE = "smooth_l1"  # with SMOOTH_L1_BETA 0, i.e. L1
    co.ROI_BBOX_REG_LOSS_TYPE = "giou"
    co.ROI_BBOX_REG_LOSS_WEIGHT = 10.0
