"""SMCA: Spatially Modulated Co-Attention (Gao et al., "Fast Convergence of DETR with Spatially
Modulated Co-Attention", ICCV 2021), as a decoder cross-attention of HybridDETR.

`DECODER_MODE: "smca"` replaces the decoder's deformable cross-attention by SMCA's dense
co-attention over the deformable encoder's multi-scale memory (the encoder is unchanged).

The paper's pieces and where they are here:
- the Gaussian-like weight map per query (`prior.py`): center predicted once from the initial query
  by a sigmoid, shared by the heads; in our Deformable-DETR setting that prediction is the query's
  reference point (learned queries: Linear + sigmoid on the query embedding; it moves from layer to
  layer with box refinement; the proposal's centre in two-stage mode; the official release predicts
  it once in decoder layer 0 by an MLP and keeps it: see `prior.py`). Each layer predicts, from its
  current query, offsets of that center and scales per head and per level; log G = -factor *
  (dx^2 / (beta s_w^2) + dy^2 / (beta s_h^2)) is added to the attention logits before the softmax;
  beta = SMCA.BETA (8); SMCA.PER_HEAD: one map per head (the paper's multi-head variant) or one
  shared by all heads;
- multi-scale co-attention with scale selection (`co_attention.py`);
- box prediction around the center: the official model adds the layer-0 center's logit to every
  layer's box-head (cx, cy) output before the sigmoid; the shared `PredictionHeads.predict`
  computes `sigmoid(delta + inverse_sigmoid(reference))` with the same reference that centres this
  layer's Gaussian (fixed across layers without box refinement, as in the release; refined layer by
  layer with WITH_BOX_REFINE, unlike the release), so nothing SMCA-specific is needed there;
- "deformable SMCA" (`deformable_smca.py`, SMCA.DEFORMABLE: True), our own variant: the prior
  modulates deformable attention instead of dense co-attention;
- `DECODER_MODE: "dense"` (`dense.py`): the same co-attention with the prior switched off, the
  baseline SMCA's claim is measured against.

Parity with the official multi-scale release: `prior.py` (units, offsets, scales, init, what
differs) and `co_attention.py` (scale selection, levels).
"""
from ..modes import register_decoder_mode
from .co_attention import ScaleSelection, SMCACrossAttention, smca_levels
from .config import add_smca_config
from .deformable_smca import DeformableSMCACrossAttention, GaussianModulatedMSDeformAttn
from .dense import build_dense_cross_attention
from .explain import explain_view
from .prior import GaussianPrior, distance_unit_level, feature_level_strides, gaussian_log_prior, level_units

__all__ = [
    "SMCACrossAttention",
    "DeformableSMCACrossAttention",
    "GaussianModulatedMSDeformAttn",
    "GaussianPrior",
    "gaussian_log_prior",
    "distance_unit_level",
    "feature_level_strides",
    "level_units",
    "ScaleSelection",
    "build_dense_cross_attention",
    "smca_levels",
    "add_smca_config",
    "build_smca_cross_attention",
]


def build_smca_cross_attention(cfg):
    """One decoder layer's cross-attention for DECODER_MODE "smca": dense co-attention, or
    deformable SMCA with SMCA.DEFORMABLE."""
    if cfg.MODEL.HYBRID_DETR.SMCA.DEFORMABLE:
        return DeformableSMCACrossAttention(cfg)
    return SMCACrossAttention(cfg)


# "dense" shares SMCA's keys (LEVELS, SCALE_SELECTION_PER_HEAD), added with "smca".
register_decoder_mode(
    "smca", add_config=add_smca_config, cross_attention=build_smca_cross_attention, explain_view=explain_view
)
register_decoder_mode("dense", cross_attention=build_dense_cross_attention)
