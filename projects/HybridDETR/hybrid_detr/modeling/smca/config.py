"""Config keys of SMCA (and of the `dense` mode, which shares LEVELS and SCALE_SELECTION_PER_HEAD):
`add_smca_config` adds them to a config that has MODEL.HYBRID_DETR. Defaults follow the official
multi-scale release (`Multi_scale_SMCA.zip`); the options marked "ours" do not."""
from detectron2.config import CfgNode as CN

__all__ = ["add_smca_config"]


def add_smca_config(cfg):
    """SMCA: Gaussian-modulated co-attention in the decoder."""
    model = cfg.MODEL.HYBRID_DETR
    model.SMCA = CN()
    smca = model.SMCA
    # log G = -factor * (dx^2 / (BETA s_w^2) + dy^2 / (BETA s_h^2)) (hybrid_detr/modeling/smca/prior.py);
    # the release's `smooth` (8). A huge BETA makes the prior flat.
    smca.BETA = 8.0
    # One Gaussian per head (the release) or one shared by all heads (ours).
    smca.PER_HEAD = True
    # True (the release): offsets and scales per level, distances in each level's own cells (stride
    # max(s, 16)) with factor max(s, 16) / 32 (0.5 / 0.5 / 1 / 2 for strides 8 / 16 / 32 / 64).
    # False (ours; the single-scale release's unit): one Gaussian for all levels, in stride-32 cells.
    smca.LEVEL_PRIORS = True
    # False (the release): key (i, j) at (j, i) cells, the cell's corner. True (ours): at the cell's
    # centre (j + 0.5, i + 0.5).
    smca.KEY_AT_CELL_CENTER = False
    # False (the release): one scale-selection weight per query and level, shared by the heads.
    # True (ours): one per head.
    smca.SCALE_SELECTION_PER_HEAD = False
    # Encoder levels the dense co-attention attends to (indices into the feature levels), mixed by
    # scale-selection weights; [] = every level (NUM_FEATURE_LEVELS), so the mode fits any config.
    # Memory grows with their tokens: [1, 2, 3] drops the stride-8 level of a 4-level model.
    smca.LEVELS = []
    # "Deformable SMCA" (ours): keep deformable cross-attention and add the Gaussian log-prior to
    # its attention logits at the sampling locations, instead of dense co-attention.
    smca.DEFORMABLE = False
