"""SMCA: Spatially Modulated Co-Attention (Gao et al., "Fast Convergence of DETR with Spatially
Modulated Co-Attention", ICCV 2021), as a decoder cross-attention of HybridDETR.

`DECODER_MODE: "smca"` replaces the decoder's deformable cross-attention by SMCA's dense
co-attention over the deformable encoder's multi-scale memory (the encoder is unchanged).

The paper's pieces and where they are here
------------------------------------------
* Gaussian-like weight map per query (`GaussianPrior`). Center: predicted once from the initial
  query by a sigmoid and shared by the heads. In our Deformable-DETR setting that prediction already
  exists: it is the query's reference point (`LearnedQueries.reference_points`, Linear + sigmoid on
  the query embedding; with box refinement it moves from layer to layer; in two-stage mode it is the
  proposal's centre). Each layer predicts from its current query (content + position) per-head
  offsets of that center and per-head scales (s_w, s_h). The log of the map,

      log G(x, y) = -( (x - c_x)^2 / (beta * s_w^2) + (y - c_y)^2 / (beta * s_h^2) ),

  is added to the attention logits before the softmax (`gaussian_log_prior`); beta = SMCA.BETA (8).
  SMCA.PER_HEAD: one map per head (the paper's multi-head variant) or one shared by all heads.
* Units, as in the official code: distances are in cells of the stride-32 level (C5, the level
  of "res5" in IN_FEATURES; the last IN_FEATURES level otherwise), counted over each image's valid
  (unpadded) extent: the official code scales the sigmoid center by (image w, h) / 32 and compares it
  with the integer C5 grid. The offsets are in those cells too. The official code predicts the
  *inverse* scale a = 1/s (a Linear initialised to weight 0, bias 1, squared), so that every map
  starts as exp(-d^2 / beta) with d in C5 cells; we do the same (`inverse_scales`). One difference:
  our key positions are cell centres ((j + 0.5) cells), the official grid is cell corners (j).
* Multi-scale with scale-selective attention: a softmax over the keys of each level separately,
  the per-level results weighted by alpha = softmax(FC(query)) over the levels (one alpha per head
  here), over the encoder levels SMCA.LEVELS.
* Box prediction around the initial center: the official model adds the center's logit (before the
  sigmoid) to the box head's (cx, cy) output at every decoder layer and takes the sigmoid; the width
  and height come from the box head alone. Our shared `PredictionHeads.predict` computes exactly
  `sigmoid(delta + inverse_sigmoid(reference))` for (cx, cy) (and `sigmoid(delta)` for (w, h) when
  the reference is a point), with the same reference that gives this layer its Gaussian center, so
  nothing SMCA-specific is needed there.

Dense attention and its memory
------------------------------
The co-attention attends to every key of the chosen levels: one `scaled_dot_product_attention`
per level (a loop over the few levels; no loop over queries or heads) with the additive bias
log G (padded keys: -inf). The bias of one level is an (N, G, Q, H_l * W_l) tensor, G = heads
(PER_HEAD) or 1. For the COCO config (800 x 1333, 4 levels 100x167, 50x84, 25x42, 13x21:
S = 22,223 keys, 8 heads, 300 queries) the biases of one decoder layer total
N x 8 x 300 x 22,223 = 53.3 M values per image, 213 MB in float32 (107 MB in fp16/bf16); the
largest level alone is 160 MB. The bias needs a gradient in training (it depends on the predicted
offsets and scales), and PyTorch keeps each level's attention probabilities for the backward pass
as well. Measured on the CPU (float32, one image, one decoder layer at that size, all 4 levels,
PER_HEAD): the forward keeps about 335 MB for the backward and peaks about 580 MB while it runs:
about 2 GB kept per image for 6 decoder layers, on top of the deformable baseline (GPU figures
not measured yet). SMCA.LEVELS = [1, 2, 3] (dropping the stride-8 level, 75% of the keys) brings
the kept memory to about 130 MB per image and layer; SMCA.PER_HEAD = False makes the bias 8x
smaller but keeps per-head probabilities (about 305 MB).

"Deformable SMCA" (SMCA.DEFORMABLE: True)
-----------------------------------------
Our own variant, with no public implementation: the decoder keeps deformable attention, and the same
Gaussian prior (center = the query's reference point + per-head offsets, per-head scales) adds
log G at each sampling location to the deformable attention logits before their softmax
(`GaussianModulatedMSDeformAttn`, a subclass of `MSDeformAttn`). Memory as the baseline.
"""
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import MSDeformAttn
from .modes import CROSS_ATTENTION_REGISTRY
from .transformer import EncoderMemory

__all__ = [
    "SMCACrossAttention",
    "DeformableSMCACrossAttention",
    "GaussianModulatedMSDeformAttn",
    "GaussianPrior",
    "gaussian_log_prior",
    "distance_unit_level",
]


def gaussian_log_prior(delta: torch.Tensor, inverse_scale: torch.Tensor, beta: float) -> torch.Tensor:
    """log G = -(dx^2 / (beta s_w^2) + dy^2 / (beta s_h^2)) with (s_w, s_h) = 1 / inverse_scale.

    delta, inverse_scale: broadcastable (..., 2) as (x, y). Returns (...).
    """
    return -(delta * inverse_scale).square().sum(-1) / beta


def distance_unit_level(in_features: Sequence[str]) -> int:
    """Index of the level whose cells measure SMCA's distances: the stride-32 level (res5)."""
    in_features = list(in_features)
    return in_features.index("res5") if "res5" in in_features else len(in_features) - 1


def unit_cells(memory: EncoderMemory, unit_level: int) -> torch.Tensor:
    """Valid (width, height) of each image in cells of the unit level: (N, 2)."""
    hw = memory.spatial_shapes[unit_level].to(memory.valid_ratios.dtype)
    return memory.valid_ratios[:, unit_level] * hw.flip(-1)


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


def _check_levels(levels: Sequence[int], num_levels: int) -> List[int]:
    levels = [int(level) for level in levels]
    if not levels or len(set(levels)) != len(levels) or not all(0 <= level < num_levels for level in levels):
        raise ValueError(
            f"MODEL.HYBRID_DETR.SMCA.LEVELS must be distinct indices in [0, {num_levels}) "
            f"(NUM_FEATURE_LEVELS = {num_levels}), got {levels}"
        )
    return sorted(levels)


@CROSS_ATTENTION_REGISTRY.register()
class SMCACrossAttention(nn.Module):
    """SMCA's co-attention: dense multi-head attention to the memory of `levels`, each head's
    logits modulated by a Gaussian prior around the query's predicted center, one softmax per level,
    the levels mixed by scale-selection weights alpha = softmax(FC(query))."""

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
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)
        self.prior = GaussianPrior(d_model, n_heads, per_head, beta)
        # Scale selection (starts uniform); not needed for a single level.
        self.scale_selection = nn.Linear(d_model, n_heads * len(self.levels)) if len(self.levels) > 1 else None
        if self.scale_selection is not None:
            nn.init.zeros_(self.scale_selection.weight)
            nn.init.zeros_(self.scale_selection.bias)

    @classmethod
    def from_config(cls, cfg):
        m = cfg.MODEL.HYBRID_DETR
        if m.SMCA.DEFORMABLE:
            return DeformableSMCACrossAttention.from_config(cfg)
        return cls(
            m.HIDDEN_DIM,
            m.NHEADS,
            _check_levels(m.SMCA.LEVELS, m.NUM_FEATURE_LEVELS),
            beta=m.SMCA.BETA,
            per_head=m.SMCA.PER_HEAD,
            dropout=m.DROPOUT,
            unit_level=distance_unit_level(m.IN_FEATURES),
        )

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
        shapes = memory.spatial_shapes.tolist()
        starts = memory.level_start_index.tolist()
        dropout = self.dropout if self.training else 0.0
        out = None
        for i, level in enumerate(self.levels):
            (h, w), start = shapes[level], starts[level]
            tokens = slice(start, start + h * w)
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

    def __init__(self, d_model, n_levels, n_heads, n_points, beta=8.0, per_head=True, unit_level=2):
        super().__init__()
        self.attn = GaussianModulatedMSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.prior = GaussianPrior(d_model, n_heads, per_head, beta)
        self.unit_level = unit_level

    @classmethod
    def from_config(cls, cfg):
        m = cfg.MODEL.HYBRID_DETR
        return cls(
            m.HIDDEN_DIM,
            m.NUM_FEATURE_LEVELS,
            m.NHEADS,
            m.DEC_N_POINTS,
            beta=m.SMCA.BETA,
            per_head=m.SMCA.PER_HEAD,
            unit_level=distance_unit_level(m.IN_FEATURES),
        )

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
