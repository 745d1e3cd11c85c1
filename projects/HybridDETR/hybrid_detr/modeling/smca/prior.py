"""SMCA's Gaussian-like spatial prior (Gao et al., ICCV 2021, Sec. 3.2): per query, per head and
per level, a center (the query's base center plus an offset) and inverse scales; log G is added to
the attention logits before their softmax.

What the official multi-scale release (`Multi_scale_SMCA.zip` of gaopengcuhk/SMCA-DETR,
`models/transformer.py`, run with `--dynamic_scale type3 --smooth 8`) computes, and what we compute
(default `SMCA.LEVEL_PRIORS: True`, `SMCA.KEY_AT_CELL_CENTER: False`):

- Units. Each level's distances are measured in that level's own cells (key (i, j) at (j, i), the
  cell's top-left corner), and the squared distance of the level of stride s is multiplied by
  s / 32: 0.5 (stride 16), 1 (stride 32), 2 (stride 64). The release never attends to stride-8
  tokens: it convolves them to stride 16 and measures them as a stride-16 level (factor 0.5). We
  attend to the stride-8 tokens themselves (see below) and measure them in stride-16 cells with
  factor 0.5, i.e. the prior the release gives that slot, in pixels. In general: distances in cells
  of stride max(s, 16), factor max(s, 16) / 32 (`level_units`).
- Offsets and scales per head and per level: one Linear predicts 2 offsets per head and level
  (added to the base center in that level's cells), one Linear 2 inverse scales a per head and
  level; log G = -factor * ((a_x dx)^2 + (a_y dy)^2) / beta, beta = SMCA.BETA (the release's
  `smooth`, 8). `SMCA.PER_HEAD: False` shares one Gaussian per level across heads (ours).
- Init. Offsets: weight `xavier_uniform_` (the release's transformer-wide xavier pass), bias
  PyTorch's Linear default; so the heads start at different, query-dependent offsets (std about
  1.3 cells with the release's LayerNorm-ed input). Inverse scales: weight 0, bias 1 (squared:
  a^2 = 1), so every map starts as exp(-factor * d^2 / beta).
- Base center (measured in each level's cells): the release scales the normalised center by the
  image size / stride; we scale it by the level's valid extent from the padding mask
  (`valid_ratios` x level size), which differs by less than one cell.

What differs and cannot be matched here (the release's own decoder layer; see also
`co_attention.py` and README): the release predicts the base center once, in decoder layer 0, by a
3-layer MLP + sigmoid on LayerNorm(query position), and keeps it for every layer; here it is the
query's reference point (Deformable DETR's Linear + sigmoid, or the two-stage proposal), which
moves from layer to layer with box refinement. The release predicts offsets, scales and
scale-selection weights from LayerNorm(layer input + query position), before the layer's
self-attention; here from the cross-attention's query (after self-attention: content + position).

Options (ours): `SMCA.LEVEL_PRIORS: False` gives one Gaussian shared by all levels, measured in
stride-32 (C5) cells for every level with factor 1 (the unit of the official *single-scale* code);
`SMCA.KEY_AT_CELL_CENTER: True` puts key (i, j) at the cell centre (j + 0.5, i + 0.5), where the
center of an object at pixel x, x / stride, actually falls.
"""
import re
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..token_layout import EncoderMemory

__all__ = [
    "GaussianPrior",
    "gaussian_log_prior",
    "distance_unit_level",
    "feature_level_strides",
    "level_units",
    "prior_config",
]

# The stride whose cells measure distances with factor 1 (C5), and the finest stride the release's
# decoder sees (its stride-8 level is convolved to stride 16).
_UNIT_STRIDE = 32
_FINEST_PRIOR_STRIDE = 16


def gaussian_log_prior(delta: torch.Tensor, inverse_scale: torch.Tensor, beta: float) -> torch.Tensor:
    """log G = -(dx^2 / (beta s_w^2) + dy^2 / (beta s_h^2)) with (s_w, s_h) = 1 / inverse_scale.

    delta, inverse_scale: broadcastable (..., 2) as (x, y). Returns (...).
    """
    return -(delta * inverse_scale).square().sum(-1) / beta


def distance_unit_level(in_features: Sequence[str]) -> int:
    """Index of the stride-32 level (res5; the last IN_FEATURES level otherwise)."""
    in_features = list(in_features)
    return in_features.index("res5") if "res5" in in_features else len(in_features) - 1


def feature_level_strides(in_features: Sequence[str], num_levels: int) -> List[int]:
    """Stride of each feature level: 2^k for "resk"; levels beyond IN_FEATURES double the last.
    Other names are taken as consecutive levels with `distance_unit_level` at stride 32."""
    in_features = list(in_features)
    parsed = [re.fullmatch(r"res(\d)", name) for name in in_features]
    if all(parsed):
        strides = [2 ** int(match.group(1)) for match in parsed]
    else:
        unit = distance_unit_level(in_features)
        strides = [int(_UNIT_STRIDE * 2.0 ** (i - unit)) for i in range(len(in_features))]
    while len(strides) < num_levels:
        strides.append(strides[-1] * 2)
    return strides[:num_levels]


def level_units(strides: Sequence[int], level_priors: bool) -> Tuple[List[float], List[float]]:
    """Per level: (prior cells per level cell, factor on the squared distance).

    level_priors (the release): cells of stride max(s, 16), factor max(s, 16) / 32.
    Otherwise: stride-32 cells, factor 1."""
    cells, factors = [], []
    for s in strides:
        prior_stride = max(s, _FINEST_PRIOR_STRIDE) if level_priors else _UNIT_STRIDE
        cells.append(s / prior_stride)
        factors.append(prior_stride / _UNIT_STRIDE if level_priors else 1.0)
    return cells, factors


def prior_config(cfg) -> dict:
    """The prior's constructor arguments from the config (shared by both SMCA cross-attentions);
    `level_strides` covers every feature level (the dense co-attention picks SMCA.LEVELS)."""
    m = cfg.MODEL.HYBRID_DETR
    return {
        "beta": m.SMCA.BETA,
        "per_head": m.SMCA.PER_HEAD,
        "level_strides": feature_level_strides(m.IN_FEATURES, m.NUM_FEATURE_LEVELS),
        "level_priors": m.SMCA.LEVEL_PRIORS,
        "key_at_cell_center": m.SMCA.KEY_AT_CELL_CENTER,
    }


class GaussianPrior(nn.Module):
    """Predicts, per query, the Gaussian maps' centers and inverse scales, per level (one set shared
    by all levels with `level_priors=False`) and per head (one shared with `per_head=False`), and
    evaluates log G at keys or at continuous points of each level.

    The base center comes from outside (the query's reference point); this module adds the offsets
    and predicts the scales from the current query. It serves the memory levels `levels` (default:
    0..len(level_strides)-1), of strides `level_strides`; "prior level" i is memory level levels[i].
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        per_head: bool,
        beta: float,
        level_strides: Sequence[int] = (_UNIT_STRIDE,),
        level_priors: bool = True,
        key_at_cell_center: bool = False,
        levels: Optional[Sequence[int]] = None,
    ):
        super().__init__()
        if beta <= 0:
            raise ValueError(f"MODEL.HYBRID_DETR.SMCA.BETA must be positive, got {beta}")
        self.groups = n_heads if per_head else 1
        self.beta = float(beta)
        self.level_strides = [int(s) for s in level_strides]
        self.levels = list(range(len(self.level_strides))) if levels is None else [int(v) for v in levels]
        if len(self.levels) != len(self.level_strides):
            raise ValueError(f"one stride per level: levels {self.levels}, strides {self.level_strides}")
        self.level_priors = bool(level_priors)
        self.key_at_cell_center = bool(key_at_cell_center)
        self.cells_per_level_cell, self.factors = level_units(self.level_strides, self.level_priors)
        # Offset / scale sets: one per level (the release), or one shared by all levels.
        self.sets = len(self.level_strides) if self.level_priors else 1
        self.center_offsets = nn.Linear(d_model, self.sets * self.groups * 2)
        self.inverse_scales = nn.Linear(d_model, self.sets * self.groups * 2)
        self.reset_parameters()

    def reset_parameters(self):
        """The release's init: offsets xavier (bias: Linear's default), so heads start apart;
        a = 1/s starts at 1 (weight 0, bias 1), so every map starts as exp(-factor d^2 / beta)."""
        self.center_offsets.reset_parameters()
        nn.init.xavier_uniform_(self.center_offsets.weight)
        nn.init.zeros_(self.inverse_scales.weight)
        nn.init.ones_(self.inverse_scales.bias)

    def forward(self, query: torch.Tensor, center: torch.Tensor, memory: EncoderMemory):
        """query (N, Q, C); center (N, Q, 2) normalised to the valid image.

        Returns centers (N, Q, L, G, 2) in each prior level's cells and inverse scales
        (N, Q, L, G, 2), L = len(levels)."""
        n, q, _ = query.shape
        num = len(self.levels)
        offsets = self.center_offsets(query).view(n, q, self.sets, self.groups, 2).expand(n, q, num, self.groups, 2)
        inverse = self.inverse_scales(query).view(n, q, self.sets, self.groups, 2).expand(n, q, num, self.groups, 2)
        extent = torch.stack([self.valid_extent(memory, i) for i in range(num)], 1)  # (N, L, 2)
        centers = center[:, :, None, None, :] * extent[:, None, :, None, :] + offsets
        return centers, inverse

    def valid_extent(self, memory: EncoderMemory, i: int) -> torch.Tensor:
        """Valid (width, height) of each image in the cells of prior level i: (N, 2)."""
        level = self.levels[i]
        h, w = memory.layout.shapes[level]
        return memory.valid_ratios[:, level] * memory.valid_ratios.new_tensor([w, h]) * self.cells_per_level_cell[i]

    def log_density(self, points: torch.Tensor, centers: torch.Tensor, inverse_scales: torch.Tensor, factor) -> torch.Tensor:
        """log G at `points` (..., 2), all in the same prior cells and broadcastable; `factor` the
        levels' factors (a float, or a tensor broadcastable to the result)."""
        return gaussian_log_prior(points - centers, inverse_scales, self.beta) * factor

    def level_points(self, locations: torch.Tensor, level_shapes: torch.Tensor) -> torch.Tensor:
        """Continuous sampling locations (..., L, P, 2) in each level's padded frame, normalised,
        -> each level's prior cells, with the same key convention as `level_bias` (a location at
        key (i, j)'s centre gets key (i, j)'s log G). level_shapes (L, 2) as (w, h) floats."""
        cells = locations.new_tensor(self.cells_per_level_cell)[:, None, None]  # (L, 1, 1)
        shift = 0.0 if self.key_at_cell_center else 0.5
        return (locations * level_shapes[:, None, :] - shift) * cells

    def level_bias(self, centers, inverse_scales, memory: EncoderMemory, i: int):
        """log G over every key of prior level i: (N, G, Q, H * W), separable in x and y.

        centers, inverse_scales (N, Q, G, 2): this level's, in its prior cells. Key (row r, column
        c) sits at (c, r) level cells (the release) or (c + 0.5, r + 0.5) (KEY_AT_CELL_CENTER)."""
        h, w = memory.layout.shapes[self.levels[i]]
        device, dtype = centers.device, centers.dtype
        start = 0.5 if self.key_at_cell_center else 0.0
        unit = self.cells_per_level_cell[i]
        xs = (torch.arange(w, device=device, dtype=dtype) + start) * unit  # (W,) in prior cells
        ys = (torch.arange(h, device=device, dtype=dtype) + start) * unit  # (H,)
        centers = centers.permute(0, 2, 1, 3)  # (N, G, Q, 2)
        inverse_scales = inverse_scales.permute(0, 2, 1, 3)
        dx = (xs - centers[..., 0:1]) * inverse_scales[..., 0:1]  # (N, G, Q, W)
        dy = (ys - centers[..., 1:2]) * inverse_scales[..., 1:2]  # (N, G, Q, H)
        bias = -(dy.square()[..., :, None] + dx.square()[..., None, :]) * (self.factors[i] / self.beta)
        return bias.flatten(-2)

    def extra_repr(self):
        return (
            f"gaussians_per_query={self.groups}, beta={self.beta}, levels={self.levels}, "
            f"level_strides={self.level_strides}, "
            f"level_priors={self.level_priors}, factors={self.factors}, key_at_cell_center={self.key_at_cell_center}"
        )
