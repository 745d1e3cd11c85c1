"""Config keys of HybridDETR, added to a detectron2 config by `add_hybrid_detr_config`, and
`load_config` (a YAML file and command-line overrides, with clear errors for unknown keys).

Every key has a default here, so a typo in a YAML file or on the command line is rejected by
detectron2 ("Non-existent config key").
"""
import difflib

from detectron2.config import CfgNode, get_cfg
from detectron2.config import CfgNode as CN

__all__ = ["add_hybrid_detr_config", "get_hybrid_detr_cfg", "load_config"]


def add_hybrid_detr_config(cfg):
    cfg.MODEL.HYBRID_DETR = CN()
    model = cfg.MODEL.HYBRID_DETR
    # "deformable" (baseline), "dac", "smca", "co_detr", or several joined by "+" ("smca+dac").
    model.DECODER_MODE = "deformable"
    model.NUM_CLASSES = 80
    model.IN_FEATURES = ["res3", "res4", "res5"]
    # Levels beyond IN_FEATURES are made by 3x3 stride-2 convs on the last one.
    model.NUM_FEATURE_LEVELS = 4
    model.HIDDEN_DIM = 256
    model.NHEADS = 8
    model.ENC_LAYERS = 6
    model.DEC_LAYERS = 6
    model.DIM_FEEDFORWARD = 1024
    model.DROPOUT = 0.1
    model.ENC_N_POINTS = 4
    model.DEC_N_POINTS = 4
    model.NUM_QUERIES = 300
    model.WITH_BOX_REFINE = False
    model.TWO_STAGE = False
    model.AUX_LOSS = True
    # Loss weights (focal, L1, GIoU) and the Hungarian matcher's costs.
    model.FOCAL_ALPHA = 0.25
    model.FOCAL_GAMMA = 2.0
    model.CLASS_WEIGHT = 2.0
    model.L1_WEIGHT = 5.0
    model.GIOU_WEIGHT = 2.0
    model.COST_CLASS = 2.0
    model.COST_BBOX = 5.0
    model.COST_GIOU = 2.0

    _add_dac_config(model)
    _add_smca_config(model)
    _add_co_detr_config(model)
    _add_solver_and_input_config(cfg)


def _add_dac_config(model):
    """DAC-DETR: the C-decoder (no self-attention) trained one-to-many."""
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


def _add_smca_config(model):
    """SMCA: Gaussian-modulated co-attention in the decoder."""
    model.SMCA = CN()
    smca = model.SMCA
    # log G = -(dx^2 / (BETA s_w^2) + dy^2 / (BETA s_h^2)), distances in cells of the stride-32
    # level (hybrid_detr/modeling/smca.py). A huge BETA makes the prior flat.
    smca.BETA = 8.0
    # One Gaussian per head (True in the paper's multi-head variant) or one shared by all heads.
    smca.PER_HEAD = True
    # Encoder levels the dense co-attention attends to (indices into the feature levels), mixed by
    # scale-selection weights. Memory grows with their tokens: [1, 2, 3] drops the stride-8 level.
    smca.LEVELS = [0, 1, 2, 3]
    # "Deformable SMCA": keep deformable cross-attention and add the Gaussian log-prior to its
    # attention logits at the sampling locations, instead of dense co-attention.
    smca.DEFORMABLE = False


def _add_co_detr_config(model):
    """Co-DETR: auxiliary one-to-many heads on the encoder and their customized positive queries."""
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


def _add_solver_and_input_config(cfg):
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    # Deformable DETR trains the offset and reference-point projections at lr * 0.1 too.
    cfg.SOLVER.LINEAR_PROJ_MULTIPLIER = 0.1
    cfg.SOLVER.LINEAR_PROJ_NAMES = ["sampling_offsets", "reference_points"]
    # DETR augmentation: with probability 0.5, resize to one of these shortest sides and crop
    # (INPUT.CROP) before the multi-scale resize.
    cfg.INPUT.DETR_CROP_RESIZE = [400, 500, 600]

def get_hybrid_detr_cfg() -> CfgNode:
    """detectron2's default config with HybridDETR's keys added."""
    cfg = get_cfg()
    add_hybrid_detr_config(cfg)
    return cfg


def _all_keys(node: CfgNode, prefix=""):
    for name, value in node.items():
        key = prefix + name
        yield key
        if isinstance(value, CfgNode):
            yield from _all_keys(value, key + ".")


def _unknown_key_error(cfg: CfgNode, key: str, where: str) -> KeyError:
    close = difflib.get_close_matches(key, list(_all_keys(cfg)), n=1, cutoff=0.8)
    hint = f"; did you mean {close[0]}?" if close else ""
    return KeyError(f"Non-existent config key {key} ({where}){hint}")


def _check_override_keys(cfg: CfgNode, opts):
    """yacs rejects an unknown key in `merge_from_list` with a bare AssertionError; we want a
    KeyError naming the key, as `merge_from_file` gives."""
    if len(opts) % 2:
        raise ValueError(f"Config overrides must be KEY VALUE pairs, got an odd number: {list(opts)}")
    for key in opts[0::2]:
        if cfg.key_is_deprecated(key) or cfg.key_is_renamed(key):
            continue  # yacs explains these itself
        node = cfg
        for part in key.split("."):
            if not isinstance(node, CfgNode) or part not in node:
                raise _unknown_key_error(cfg, key, "command-line override")
            node = node[part]


def load_config(config_file: str = "", opts=()) -> CfgNode:
    """`get_hybrid_detr_cfg()` merged with `config_file` (if given) then `opts` (KEY VALUE ...).

    An unknown key raises KeyError naming the key (and the closest existing key, if any).
    """
    cfg = get_hybrid_detr_cfg()
    if config_file:
        try:
            cfg.merge_from_file(config_file)
        except KeyError as e:
            message = e.args[0] if e.args else ""
            prefix = "Non-existent config key: "
            if isinstance(message, str) and message.startswith(prefix):
                raise _unknown_key_error(cfg, message[len(prefix):], f"in {config_file}") from None
            raise
    opts = list(opts or [])
    _check_override_keys(cfg, opts)
    cfg.merge_from_list(opts)
    return cfg
