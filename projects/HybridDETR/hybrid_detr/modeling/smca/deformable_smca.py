"""'Deformable SMCA' (SMCA.DEFORMABLE: True), our own variant with no public implementation: the
decoder keeps deformable attention, and SMCA's Gaussian prior (center = the query's reference point
+ per-head offsets, per-head scales) adds log G at each sampling location to the deformable
attention logits before their softmax. Memory as the baseline."""
from typing import Callable, Optional

import torch

from detectron2.config import configurable
from torch import nn

from ...layers import MSDeformAttn
from ..token_layout import EncoderMemory
from .prior import GaussianPrior, prior_config, unit_cells

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
    def __init__(self, d_model, n_levels, n_heads, n_points, beta=8.0, per_head=True, unit_level=2):
        super().__init__()
        self.attn = GaussianModulatedMSDeformAttn(d_model, n_levels, n_heads, n_points)
        self._prior_args = (d_model, n_heads, per_head, beta)
        self.prior = GaussianPrior(*self._prior_args)
        self.unit_level = unit_level

    def reset_parameters(self):
        """This module's own init (re-run after the transformer's xavier pass): the deformable
        attention's reset and the prior's constructor init (copied from a freshly built one)."""
        self.attn.reset_parameters()
        self.prior.load_state_dict(GaussianPrior(*self._prior_args).to(self.attn.value_proj.weight.device).state_dict())

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
        cells = unit_cells(memory, self.unit_level)
        centers, inverse_scales = self.prior(query, query_reference[..., :2], cells)
        # Sampling locations are in each level's padded frame: divide by the valid ratio to get the
        # valid-image frame, then scale to unit cells. -> (N, Q, M, L, P, 2)
        to_cells = cells[:, None, None, None, :] / memory.valid_ratios[:, None, :, None, :]  # (N,1,L,1,2)

        def log_prior(locations):
            points = locations * to_cells[:, :, None]
            return self.prior.log_density(points, centers[:, :, :, None, None], inverse_scales[:, :, :, None, None])

        return self.attn(
            query,
            reference_points,
            memory.memory,
            memory.spatial_shapes,
            memory.level_start_index,
            memory.padding_mask,
            log_prior=log_prior,
        )
