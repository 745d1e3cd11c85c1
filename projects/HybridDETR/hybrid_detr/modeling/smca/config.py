"""Config keys of SMCA: `add_smca_config` adds them to a config that has MODEL.HYBRID_DETR."""
from detectron2.config import CfgNode as CN

__all__ = ["add_smca_config"]


def add_smca_config(cfg):
    """SMCA: Gaussian-modulated co-attention in the decoder."""
    model = cfg.MODEL.HYBRID_DETR
    model.SMCA = CN()
    smca = model.SMCA
    # log G = -(dx^2 / (BETA s_w^2) + dy^2 / (BETA s_h^2)), distances in cells of the stride-32
    # level (hybrid_detr/modeling/smca/prior.py). A huge BETA makes the prior flat.
    smca.BETA = 8.0
    # One Gaussian per head (True in the paper's multi-head variant) or one shared by all heads.
    smca.PER_HEAD = True
    # Encoder levels the dense co-attention attends to (indices into the feature levels), mixed by
    # scale-selection weights; [] = every level (NUM_FEATURE_LEVELS), so the mode fits any config.
    # Memory grows with their tokens: [1, 2, 3] drops the stride-8 level of a 4-level model.
    smca.LEVELS = []
    # "Deformable SMCA": keep deformable cross-attention and add the Gaussian log-prior to its
    # attention logits at the sampling locations, instead of dense co-attention.
    smca.DEFORMABLE = False
