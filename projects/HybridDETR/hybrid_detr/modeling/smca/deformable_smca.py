"""'Deformable SMCA' (SMCA.DEFORMABLE: True), our own variant with no public implementation: the
decoder keeps deformable attention, and SMCA's Gaussian prior (`prior.py`: center = the query's
reference point + offsets per head and level, scales per head and level, each level measured in its
own cells with the release's factors) adds log G at each sampling location to the deformable
attention logits before their softmax. A sampling location at a key's centre gets that key's log G
in the dense co-attention. Memory as the baseline."""
from typing import Callable, Optional

import torch

from detectron2.config import configurable
from torch import nn

from ...layers import MSDeformAttn
from ..token_layout import EncoderMemory
from .prior import GaussianPrior, prior_config

__all__ = ["DeformableSMCACrossAttention", "GaussianModulatedMSDeformAttn"]


class GaussianModulatedMSDeformAttn(MSDeformAttn):
    """MSDeformAttn whose attention logits get an additive log-prior at the sampling locations
    (between `sampling_locations_and_logits` and the softmax)."""

    def forward(
        self,
        query,
        reference_points,
        value_input,
        spatial_shapes,
        level_start_index,
        padding_mask=None,
        log_prior: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    ):
        """As `MSDeformAttn.forward`; `log_prior` maps the sampling locations (N, Lq, M, L, P, 2)
        to a term (broadcastable to (N, Lq, M, L, P)) added to the logits."""
        value = self.project_value(value_input, padding_mask)
        locations, logits = self.sampling_locations_and_logits(query, reference_points, spatial_shapes)
        if log_prior is not None:
            logits = logits + log_prior(locations).to(logits.dtype)
        weights = self.attention_weights_from_logits(logits)
        out = self.sample(value, spatial_shapes, level_start_index, locations, weights)
        return self.output_proj(out)


class DeformableSMCACrossAttention(nn.Module):
    """"Deformable SMCA": deformable cross-attention whose point weights are modulated by SMCA's
    Gaussian prior (center = the query's reference point + per-head offsets, per-head scales)."""

    @configurable
    def __init__(
        self,
        d_model,
        n_levels,
        n_heads,
        n_points,
        beta=8.0,
        per_head=True,
        level_strides=(8, 16, 32, 64),
        level_priors=True,
        key_at_cell_center=False,
    ):
        super().__init__()
        self.attn = GaussianModulatedMSDeformAttn(d_model, n_levels, n_heads, n_points)
        strides = list(level_strides)[:n_levels]
        self.prior = GaussianPrior(d_model, n_heads, per_head, beta, strides, level_priors, key_at_cell_center)

    def reset_parameters(self):
        """This module's own init, re-run after the transformer's xavier pass."""
        self.attn.reset_parameters()
        self.prior.reset_parameters()

    @classmethod
    def from_config(cls, cfg):
        m = cfg.MODEL.HYBRID_DETR
        return {
            "d_model": m.HIDDEN_DIM,
            "n_levels": m.NUM_FEATURE_LEVELS,
            "n_heads": m.NHEADS,
            "n_points": m.DEC_N_POINTS,
            **prior_config(cfg),
        }

    def forward(self, query, reference_points, memory: EncoderMemory, query_reference=None):
        if query_reference is None:
            raise ValueError("DeformableSMCACrossAttention needs query_reference (the queries' centers)")
        centers, inverse_scales = self.prior(query, query_reference[..., :2], memory)  # (N, Q, L, G, 2)
        # -> (N, Q, G, L, 1, 2), against sampling locations (N, Q, M, L, P, 2) (G = M or 1)
        centers = centers.transpose(2, 3)[:, :, :, :, None]
        inverse_scales = inverse_scales.transpose(2, 3)[:, :, :, :, None]
        level_shapes = memory.spatial_shapes.flip(-1).to(query.dtype)  # (L, 2) as (w, h)
        factors = query.new_tensor(self.prior.factors)[:, None]  # (L, 1)

        def log_prior(locations):
            points = self.prior.level_points(locations, level_shapes)
            return self.prior.log_density(points, centers, inverse_scales, factors)

        return self.attn(
            query,
            reference_points,
            memory.memory,
            memory.spatial_shapes,
            memory.level_start_index,
            memory.padding_mask,
            log_prior=log_prior,
        )
