"""SMCA's Gaussian-like spatial prior (Gao et al., ICCV 2021, Sec. 3.2): per query, a center (the
query's reference point plus per-head offsets) and per-head scales; log G is added to attention
logits before their softmax.

Units, as in the official code: distances are in cells of the stride-32 level (C5, the level of
"res5" in IN_FEATURES; the last IN_FEATURES level otherwise), counted over each image's valid
(unpadded) extent. The official code predicts the *inverse* scale a = 1/s (a Linear initialised
to weight 0, bias 1, squared), so that every map starts as exp(-d^2 / beta) with d in C5 cells;
we do the same (`GaussianPrior.inverse_scales`). Key positions are cell centres ((j + 0.5) cells),
the official grid is cell corners (j).
"""
from typing import Sequence, Tuple

import torch
from torch import nn

from ..token_layout import EncoderMemory

__all__ = ["GaussianPrior", "gaussian_log_prior", "distance_unit_level", "unit_cells", "prior_config"]


def gaussian_log_prior(delta: torch.Tensor, inverse_scale: torch.Tensor, beta: float) -> torch.Tensor:
    """log G = -(dx^2 / (beta s_w^2) + dy^2 / (beta s_h^2)) with (s_w, s_h) = 1 / inverse_scale.

    delta, inverse_scale: broadcastable (..., 2) as (x, y). Returns (...).
    """
    return -(delta * inverse_scale).square().sum(-1) / beta


def distance_unit_level(in_features: Sequence[str]) -> int:
    """Index of the level whose cells measure SMCA's distances: the stride-32 level (res5)."""
    in_features = list(in_features)
    return in_features.index("res5") if "res5" in in_features else len(in_features) - 1


def prior_config(cfg) -> dict:
    """The prior's constructor arguments from the config (shared by both SMCA cross-attentions)."""
    m = cfg.MODEL.HYBRID_DETR
    return {"beta": m.SMCA.BETA, "per_head": m.SMCA.PER_HEAD, "unit_level": distance_unit_level(m.IN_FEATURES)}


def unit_cells(memory: EncoderMemory, unit_level: int) -> torch.Tensor:
    """Valid (width, height) of each image in cells of the unit level: (N, 2)."""
    h, w = memory.layout.shapes[unit_level]
    return memory.valid_ratios[:, unit_level] * memory.valid_ratios.new_tensor([w, h])


class GaussianPrior(nn.Module):
    """Predicts, per query, the Gaussian map's centers (per head, or one shared) and inverse scales.

    The base center comes from outside (the query's reference point, predicted from the initial
    query); this module adds the per-head offsets and the scales predicted from the current query.
    """

    def __init__(self, d_model: int, n_heads: int, per_head: bool, beta: float):
        super().__init__()
        if beta <= 0:
            raise ValueError(f"MODEL.HYBRID_DETR.SMCA.BETA must be positive, got {beta}")
        self.groups = n_heads if per_head else 1
        self.beta = float(beta)
        self.center_offsets = nn.Linear(d_model, self.groups * 2)
        self.inverse_scales = nn.Linear(d_model, self.groups * 2)
        nn.init.zeros_(self.center_offsets.weight)
        nn.init.zeros_(self.center_offsets.bias)
        # a = 1/s starts at 1 (s = one C5 cell): G = exp(-d^2 / beta), as in the official code.
        nn.init.zeros_(self.inverse_scales.weight)
        nn.init.ones_(self.inverse_scales.bias)

    def forward(self, query: torch.Tensor, center: torch.Tensor, cells: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """query (N, Q, C); center (N, Q, 2) normalised to the valid image; cells (N, 2) the unit.

        Returns centers (N, Q, G, 2) in unit cells and inverse scales (N, Q, G, 2)."""
        n, q, _ = query.shape
        offsets = self.center_offsets(query).view(n, q, self.groups, 2)
        centers = center[:, :, None, :] * cells[:, None, None, :] + offsets
        return centers, self.inverse_scales(query).view(n, q, self.groups, 2)

    def log_density(self, points: torch.Tensor, centers: torch.Tensor, inverse_scales: torch.Tensor) -> torch.Tensor:
        """log G at `points` (..., 2), all in unit cells and broadcastable."""
        return gaussian_log_prior(points - centers, inverse_scales, self.beta)

    def level_bias(self, centers, inverse_scales, level_shape: Tuple[int, int], level_valid_ratio, cells):
        """log G over every key of one level: (N, G, Q, H * W), separable in x and y.

        level_valid_ratio (N, 2): valid (w, h) fraction of the level; key (i, j) sits at
        ((j + 0.5) / valid_w, (i + 0.5) / valid_h) of the valid image."""
        h, w = level_shape
        device, dtype = centers.device, centers.dtype
        xs = (torch.arange(w, device=device, dtype=dtype) + 0.5)[None] / (level_valid_ratio[:, None, 0] * w)
        ys = (torch.arange(h, device=device, dtype=dtype) + 0.5)[None] / (level_valid_ratio[:, None, 1] * h)
        xs = (xs * cells[:, None, 0]).to(dtype)  # (N, W) in unit cells
        ys = (ys * cells[:, None, 1]).to(dtype)  # (N, H)
        centers = centers.permute(0, 2, 1, 3)  # (N, G, Q, 2)
        inverse_scales = inverse_scales.permute(0, 2, 1, 3)
        dx = (xs[:, None, None, :] - centers[..., 0:1]) * inverse_scales[..., 0:1]  # (N, G, Q, W)
        dy = (ys[:, None, None, :] - centers[..., 1:2]) * inverse_scales[..., 1:2]  # (N, G, Q, H)
        bias = -(dy.square()[..., :, None] + dx.square()[..., None, :]) / self.beta
        return bias.flatten(-2)
