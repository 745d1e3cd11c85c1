"""SMCA's co-attention: dense multi-head attention from the decoder queries to the deformable
encoder's multi-scale memory, each head's logits modulated by the Gaussian prior (`prior.py`).

Scale-selective attention, as in the paper's multi-scale model: a softmax over the keys of each
level separately, the per-level results weighted by alpha = softmax(FC(query)) over the levels (one
alpha per head here), over the encoder levels SMCA.LEVELS (default: all). One
`scaled_dot_product_attention` per level with the additive bias log G (padded keys: -inf); no loop
over queries or heads. Its memory cost is in MODEL_ZOO.md ("SMCA memory").
"""
from typing import List, Sequence

import torch.nn.functional as F
from detectron2.config import configurable
from torch import nn

from ..token_layout import EncoderMemory
from .prior import GaussianPrior, prior_config, unit_cells

__all__ = ["SMCACrossAttention", "smca_levels"]


def smca_levels(levels: Sequence[int], num_levels: int) -> List[int]:
    """SMCA.LEVELS checked against NUM_FEATURE_LEVELS; [] means every level."""
    levels = [int(level) for level in levels] or list(range(num_levels))
    if len(set(levels)) != len(levels) or not all(0 <= level < num_levels for level in levels):
        raise ValueError(
            f"MODEL.HYBRID_DETR.SMCA.LEVELS must be distinct indices in [0, {num_levels}) "
            f"(NUM_FEATURE_LEVELS = {num_levels}), or [] for all, got {levels}"
        )
    return sorted(levels)


class SMCACrossAttention(nn.Module):
    """SMCA's co-attention: dense multi-head attention to the memory of `levels`, each head's
    logits modulated by a Gaussian prior around the query's predicted center, one softmax per level,
    the levels mixed by scale-selection weights alpha = softmax(FC(query))."""

    @configurable
    def __init__(
        self,
        d_model: int,
        n_heads: int,
        levels: Sequence[int],
        beta: float = 8.0,
        per_head: bool = True,
        dropout: float = 0.0,
        unit_level: int = 2,
    ):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"HIDDEN_DIM ({d_model}) must be divisible by NHEADS ({n_heads})")
        self.d_model, self.n_heads = d_model, n_heads
        self.levels = list(levels)
        self.unit_level = unit_level
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self._prior_args = (d_model, n_heads, per_head, beta)
        self.prior = GaussianPrior(*self._prior_args)
        # Scale selection (starts uniform); not needed for a single level.
        self.scale_selection = nn.Linear(d_model, n_heads * len(self.levels)) if len(self.levels) > 1 else None
        self.reset_parameters()

    def reset_parameters(self):
        """This module's own init (re-run after the transformer's xavier pass)."""
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)
        if self.scale_selection is not None:
            nn.init.zeros_(self.scale_selection.weight)
            nn.init.zeros_(self.scale_selection.bias)
        # The prior's init is its constructor's: copy a freshly built one.
        self.prior.load_state_dict(GaussianPrior(*self._prior_args).to(self.q_proj.weight.device).state_dict())

    @classmethod
    def from_config(cls, cfg):
        m = cfg.MODEL.HYBRID_DETR
        return {
            "d_model": m.HIDDEN_DIM,
            "n_heads": m.NHEADS,
            "levels": smca_levels(m.SMCA.LEVELS, m.NUM_FEATURE_LEVELS),
            "dropout": m.DROPOUT,
            **prior_config(cfg),
        }

    def forward(self, query, reference_points, memory: EncoderMemory, query_reference=None):
        """query (N, Q, C) content + position; query_reference (N, Q, 2|4) normalised to the valid
        image (its (x, y) is the Gaussian's base center). `reference_points` is not used."""
        if query_reference is None:
            raise ValueError("SMCACrossAttention needs query_reference (the queries' centers)")
        if memory.position is None:
            raise ValueError("SMCACrossAttention needs EncoderMemory.position (the keys' position embedding)")
        n, q, c = query.shape
        m, d = self.n_heads, c // self.n_heads
        cells = unit_cells(memory, self.unit_level)
        centers, inverse_scales = self.prior(query, query_reference[..., :2], cells)

        queries = self.q_proj(query).view(n, q, m, d).transpose(1, 2)  # (N, M, Q, D)
        if self.scale_selection is not None:
            alpha = self.scale_selection(query).view(n, q, m, len(self.levels)).softmax(-1)
            alpha = alpha.permute(0, 2, 1, 3)  # (N, M, Q, levels)
        dropout = self.dropout if self.training else 0.0
        out = None
        for i, level in enumerate(self.levels):
            h, w = memory.layout.shapes[level]
            tokens = memory.layout.level_tokens(level)
            content = memory.memory[:, tokens]
            keys = self.k_proj(content + memory.position[:, tokens]).view(n, h * w, m, d).transpose(1, 2)
            values = self.v_proj(content).view(n, h * w, m, d).transpose(1, 2)
            bias = self.prior.level_bias(centers, inverse_scales, (h, w), memory.valid_ratios[:, level], cells)
            bias = bias.to(queries.dtype).masked_fill(memory.padding_mask[:, None, None, tokens], float("-inf"))
            attended = F.scaled_dot_product_attention(queries, keys, values, attn_mask=bias, dropout_p=dropout)
            if self.scale_selection is not None:
                attended = attended * alpha[..., i : i + 1]
            out = attended if out is None else out + attended
        return self.out_proj(out.transpose(1, 2).reshape(n, q, c))

    def extra_repr(self):
        return (
            f"d_model={self.d_model}, n_heads={self.n_heads}, levels={self.levels}, beta={self.prior.beta}, "
            f"gaussians_per_query={self.prior.groups}, unit_level={self.unit_level}"
        )
