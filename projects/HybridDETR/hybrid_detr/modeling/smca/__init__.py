"""SMCA: Spatially Modulated Co-Attention (Gao et al., "Fast Convergence of DETR with Spatially
Modulated Co-Attention", ICCV 2021), as a decoder cross-attention of HybridDETR.

`DECODER_MODE: "smca"` replaces the decoder's deformable cross-attention by SMCA's dense
co-attention over the deformable encoder's multi-scale memory (the encoder is unchanged).

The paper's pieces and where they are here:
- the Gaussian-like weight map per query (`prior.py`): center predicted once from the initial query
  by a sigmoid, shared by the heads; in our Deformable-DETR setting that prediction is the query's
  reference point (learned queries: Linear + sigmoid on the query embedding; it moves from layer to
  layer with box refinement; the proposal's centre in two-stage mode). Each layer predicts, from its
  current query, per-head offsets of that center and per-head scales; log G = -(dx^2 / (beta s_w^2)
  + dy^2 / (beta s_h^2)) is added to the attention logits before the softmax; beta = SMCA.BETA (8);
  SMCA.PER_HEAD: one map per head (the paper's multi-head variant) or one shared by all heads;
- multi-scale co-attention with scale selection (`co_attention.py`);
- box prediction around the initial center: the official model adds the center's logit to the box
  head's (cx, cy) output before the sigmoid; the shared `PredictionHeads.predict` computes exactly
  `sigmoid(delta + inverse_sigmoid(reference))` with the same reference that centres this layer's
  Gaussian, so nothing SMCA-specific is needed there;
- "deformable SMCA" (`deformable_smca.py`, SMCA.DEFORMABLE: True), our own variant: the prior
  modulates deformable attention instead of dense co-attention.
"""
from ..modes import register_decoder_mode
from .co_attention import SMCACrossAttention, smca_levels
from .config import add_smca_config
from .deformable_smca import DeformableSMCACrossAttention, GaussianModulatedMSDeformAttn
from .prior import GaussianPrior, distance_unit_level, gaussian_log_prior, unit_cells

__all__ = [
    "SMCACrossAttention",
    "DeformableSMCACrossAttention",
    "GaussianModulatedMSDeformAttn",
    "GaussianPrior",
    "gaussian_log_prior",
    "distance_unit_level",
    "unit_cells",
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


register_decoder_mode("smca", cross_attention=build_smca_cross_attention)
