"""SMCA's co-attention: dense multi-head attention from the decoder queries to the deformable
encoder's multi-scale memory, each head's logits modulated by the Gaussian prior (`prior.py`).

Scale-selective attention, as in the official multi-scale release: a softmax over the keys of each
level separately (padded keys masked), the per-level results weighted by alpha = softmax(FC(query))
over the levels: one alpha per query and level, shared by the heads (the release's `point4`, a
Linear with xavier weight; `SMCA.SCALE_SELECTION_PER_HEAD: True`, ours, gives one per head). The
release indexes its alpha with batch element 0 for every image of a batch (`scale_attention[:, 0,
k]`); its published commands train with one image per GPU, where that is per image, as here. One
`scaled_dot_product_attention` per level with the additive bias log G (padded keys: -inf); no loop
over queries or heads. Its memory cost is in MODEL_ZOO.md ("SMCA memory").

Levels: the release's decoder attends to 4 levels (strides 16, 16, 32, 64): its stride-8 encoder
output is first convolved to stride 16 (one 3x3 stride-2 conv shared by all decoder layers, keys
with the stride-16 position and level embedding). Here the decoder attends to the encoder levels
SMCA.LEVELS (default: all, strides 8, 16, 32, 64 in the COCO config) directly: that conv would be a
module of the transformer shared by the decoder layers, which this per-layer cross-attention cannot
hold. The prior of the stride-8 level is the one the release gives that slot (`prior.py`).

With `prior=False` this is the `dense` decoder mode (`dense.py`): the same attention without log G.
"""
import math
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from torch import nn

from ..token_layout import EncoderMemory
from .prior import GaussianPrior, prior_config

__all__ = ["SMCACrossAttention", "ScaleSelection", "smca_levels"]


def smca_levels(levels: Sequence[int], num_levels: int) -> List[int]:
    """SMCA.LEVELS checked against NUM_FEATURE_LEVELS; [] means every level."""
    levels = [int(level) for level in levels] or list(range(num_levels))
    if len(set(levels)) != len(levels) or not all(0 <= level < num_levels for level in levels):
        raise ValueError(
            f"MODEL.HYBRID_DETR.SMCA.LEVELS must be distinct indices in [0, {num_levels}) "
            f"(NUM_FEATURE_LEVELS = {num_levels}), or [] for all, got {levels}"
        )
    return sorted(levels)


class ScaleSelection(nn.Linear):
    """alpha = softmax over levels of FC(query): (N, Q, levels) shared by the heads (the release),
    or (N, Q, heads, levels) with `per_head`. Init as the release's: xavier weight, default bias."""

    def __init__(self, d_model: int, n_heads: int, num_levels: int, per_head: bool = False):
        groups = n_heads if per_head else 1
        super().__init__(d_model, groups * num_levels)
        self.num_levels, self.groups = num_levels, groups

    def reset_parameters(self):
        super().reset_parameters()
        nn.init.xavier_uniform_(self.weight)

    def forward(self, query):
        """-> (N, M or 1, Q, levels), ready to weight (N, M, Q, D) per-level outputs."""
        n, q, _ = query.shape
        alpha = super().forward(query).view(n, q, self.groups, self.num_levels).softmax(-1)
        return alpha.permute(0, 2, 1, 3)


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
        level_strides: Sequence[int] = (8, 16, 32, 64),
        level_priors: bool = True,
        key_at_cell_center: bool = False,
        scale_selection_per_head: bool = False,
        prior: bool = True,
    ):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"HIDDEN_DIM ({d_model}) must be divisible by NHEADS ({n_heads})")
        self.d_model, self.n_heads = d_model, n_heads
        self.levels = list(levels)
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self._reset_projections()
        # The prior over the attended levels (None: the `dense` mode, plain co-attention).
        strides = [level_strides[level] for level in self.levels]
        self.prior = (
            GaussianPrior(d_model, n_heads, per_head, beta, strides, level_priors, key_at_cell_center, self.levels)
            if prior
            else None
        )
        # Scale selection; not needed for a single level.
        self.scale_selection = (
            ScaleSelection(d_model, n_heads, len(self.levels), scale_selection_per_head) if len(self.levels) > 1 else None
        )

    def _reset_projections(self):
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def reset_parameters(self):
        """This module's own init, re-run after the transformer's xavier pass."""
        self._reset_projections()
        for part in (self.prior, self.scale_selection):
            if part is not None:
                part.reset_parameters()

    @classmethod
    def from_config(cls, cfg, prior: bool = True):
        m = cfg.MODEL.HYBRID_DETR
        return {
            "d_model": m.HIDDEN_DIM,
            "n_heads": m.NHEADS,
            "levels": smca_levels(m.SMCA.LEVELS, m.NUM_FEATURE_LEVELS),
            "dropout": m.DROPOUT,
            "scale_selection_per_head": m.SMCA.SCALE_SELECTION_PER_HEAD,
            "prior": prior,
            **prior_config(cfg),
        }

    def forward(self, query, reference_points, memory: EncoderMemory, query_reference=None):
        """query (N, Q, C) content + position; query_reference (N, Q, 2|4) normalised to the valid
        image (its (x, y) is the Gaussian's base center). `reference_points` is not used."""
        return self.attend(query, memory, query_reference)

    def attend(self, query, memory: EncoderMemory, query_reference=None, maps: Optional[dict] = None):
        """The co-attention. With a `maps` dict (analysis: tools/explain.py), the attention is computed
        explicitly instead of by scaled_dot_product_attention and `maps` receives, per level, the
        prior exp(log G) (N, G, Q, H*W) and the attention probabilities (N, M, Q, H*W), and the
        scale-selection weights "alpha" (N, M or 1, Q, levels) or None: the same numbers."""
        if query_reference is None and self.prior is not None:
            raise ValueError("SMCACrossAttention needs query_reference (the queries' centers)")
        if memory.position is None:
            raise ValueError("SMCACrossAttention needs EncoderMemory.position (the keys' position embedding)")
        n, q, c = query.shape
        m, d = self.n_heads, c // self.n_heads
        if self.prior is not None:  # (N, Q, levels, G, 2) each
            centers, inverse_scales = self.prior(query, query_reference[..., :2], memory)

        queries = self.q_proj(query).view(n, q, m, d).transpose(1, 2)  # (N, M, Q, D)
        alpha = self.scale_selection(query) if self.scale_selection is not None else None  # (N, M or 1, Q, levels)
        if maps is not None:
            maps.update(prior={}, attention={}, alpha=alpha)
        dropout = self.dropout if self.training else 0.0
        out = None
        for i, level in enumerate(self.levels):
            h, w = memory.layout.shapes[level]
            tokens = memory.layout.level_tokens(level)
            content = memory.memory[:, tokens]
            keys = self.k_proj(content + memory.position[:, tokens]).view(n, h * w, m, d).transpose(1, 2)
            values = self.v_proj(content).view(n, h * w, m, d).transpose(1, 2)
            padding = memory.padding_mask[:, None, None, tokens]
            if self.prior is not None:
                bias = self.prior.level_bias(centers[:, :, i], inverse_scales[:, :, i], memory, i)
                bias = bias.to(queries.dtype).masked_fill(padding, float("-inf"))
            else:
                bias = ~padding  # boolean mask: True = attend
            if maps is None:
                attended = F.scaled_dot_product_attention(queries, keys, values, attn_mask=bias, dropout_p=dropout)
            else:
                logits = queries @ keys.transpose(-1, -2) / math.sqrt(d)
                logits = logits + bias if bias.dtype != torch.bool else logits.masked_fill(~bias, float("-inf"))
                probs = logits.softmax(-1)
                attended = probs @ values
                if self.prior is not None:
                    maps["prior"][level] = bias.exp()
                maps["attention"][level] = probs
            if alpha is not None:
                attended = attended * alpha[..., i : i + 1]
            out = attended if out is None else out + attended
        return self.out_proj(out.transpose(1, 2).reshape(n, q, c))

    def extra_repr(self):
        return f"d_model={self.d_model}, n_heads={self.n_heads}, levels={self.levels}, prior={self.prior is not None}"
