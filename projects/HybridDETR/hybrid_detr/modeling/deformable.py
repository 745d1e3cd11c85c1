"""The baseline decoder mode, "deformable" (Zhu et al., Deformable DETR, ICLR 2021): each decoder
layer's cross-attention is multi-scale deformable attention around the query's reference."""
from detectron2.config import configurable
from torch import nn

from ..layers import MSDeformAttn
from .modes import register_decoder_mode
from .token_layout import EncoderMemory

__all__ = ["DeformableCrossAttention"]


class DeformableCrossAttention(nn.Module):
    """MSDeformAttn over the encoder memory, sampling around each query's reference."""

    @configurable
    def __init__(self, d_model, n_levels, n_heads, n_points):
        super().__init__()
        self.attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)

    @classmethod
    def from_config(cls, cfg):
        m = cfg.MODEL.HYBRID_DETR
        return {"d_model": m.HIDDEN_DIM, "n_levels": m.NUM_FEATURE_LEVELS, "n_heads": m.NHEADS, "n_points": m.DEC_N_POINTS}

    def forward(self, query, reference_points, memory: EncoderMemory, query_reference=None):
        """query: (N, Q, C) content + position; reference_points: (N, Q, L, 2|4) in each level's
        padded frame. `query_reference` (N, Q, 2|4) is the unscaled reference, for modulated variants."""
        return self.attn(
            query, reference_points, memory.memory, memory.spatial_shapes, memory.level_start_index, memory.padding_mask
        )


register_decoder_mode("deformable", cross_attention=DeformableCrossAttention)
