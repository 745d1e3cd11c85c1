"""`MSDeformAttn`: the multi-scale deformable attention module of Deformable DETR.

The forward is split into steps so that a subclass can change one of them:
    1. `project_value`                 value_input -> (N, S, M, D), padded keys zeroed
    2. `sampling_locations_and_logits` query, reference points -> locations, attention logits
    3. `attention_weights_from_logits` softmax over the L*P sampling points of each head
    4. the op (`ms_deform_attn`, or the pure-PyTorch reference when `use_reference`)
    5. `output_proj`
(SMCA adds a Gaussian log-prior to the logits between steps 2 and 3.)
"""
import contextlib
import math
from typing import Iterator, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from .ms_deform_attn_func import ms_deform_attn, ms_deform_attn_reference

__all__ = ["MSDeformAttn"]


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (Zhu et al., Deformable DETR, ICLR 2021).

    Args:
        d_model: channels of queries and values.
        n_levels: feature levels L.
        n_heads: attention heads M (d_model must be divisible by it).
        n_points: sampling points P per head and level.
        use_reference: run the pure-PyTorch reference instead of the compiled op.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4,
                 use_reference: bool = False):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.use_reference = use_reference

        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Offsets start as a fixed pattern: head h looks in direction 2*pi*h/M (scaled so that the
        # larger coordinate is 1), the i-th point i+1 pixels away, on every level.
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        directions = torch.stack([angles.cos(), angles.sin()], dim=-1)
        directions = directions / directions.abs().max(dim=-1, keepdim=True).values
        steps = torch.arange(1, self.n_points + 1, dtype=torch.float32)
        bias = directions[:, None, None, :] * steps[None, None, :, None]  # (M, 1, P, 2)
        bias = bias.expand(self.n_heads, self.n_levels, self.n_points, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    # -- steps ------------------------------------------------------------------------------------
    def project_value(self, value_input: torch.Tensor, padding_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """(N, S, d_model) -> (N, S, M, D); keys where `padding_mask` is True are zeroed."""
        N, S, _ = value_input.shape
        value = self.value_proj(value_input)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        return value.view(N, S, self.n_heads, self.d_model // self.n_heads)

    def sampling_locations_and_logits(
        self, query: torch.Tensor, reference_points: torch.Tensor, spatial_shapes: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Sampling locations (N, Lq, M, L, P, 2) and attention logits (N, Lq, M, L, P).

        reference_points: (N, Lq, L, 2) normalised (x, y), or (N, Lq, L, 4) boxes (cx, cy, w, h),
        in which case offsets are scaled by half the box size divided by n_points.
        """
        N, Lq, _ = query.shape
        M, L, P = self.n_heads, self.n_levels, self.n_points
        offsets = self.sampling_offsets(query).view(N, Lq, M, L, P, 2)
        logits = self.attention_weights(query).view(N, Lq, M, L, P)
        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level: divide by (W, H).
            normalizer = spatial_shapes.flip(-1).to(offsets.dtype)  # (L, 2) as (W, H)
            locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            centers = reference_points[:, :, None, :, None, :2]
            sizes = reference_points[:, :, None, :, None, 2:]
            locations = centers + offsets / P * sizes * 0.5
        else:
            raise ValueError(
                f"reference_points must end in 2 (points) or 4 (boxes), got shape {tuple(reference_points.shape)}"
            )
        return locations, logits

    def attention_weights_from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax over the L*P points of each (query, head): (N, Lq, M, L, P) -> same shape."""
        N, Lq, M, L, P = logits.shape
        return F.softmax(logits.reshape(N, Lq, M, L * P), dim=-1).view(N, Lq, M, L, P)

    def sample(self, value, spatial_shapes, level_start_index, locations, weights) -> torch.Tensor:
        """The op (or its reference): -> (N, Lq, d_model), in the value's dtype.

        Under autocast the value is bfloat16 / float16 while the locations and weights are float32:
        the op samples the value in its own dtype (accumulating in float32) and keeps locations and
        weights in float32, which large levels need (a bfloat16 location is off by up to ~0.25 px on
        a 128-pixel level). Otherwise all three share the widest dtype.
        """
        coords = torch.promote_types(torch.promote_types(locations.dtype, weights.dtype), torch.float32)
        if value.dtype not in (torch.float16, torch.bfloat16):
            coords = torch.promote_types(coords, value.dtype)
            value = value.to(coords)
        locations, weights = locations.to(coords), weights.to(coords)
        if self.use_reference:
            shapes = spatial_shapes if self._reference_level_shapes is None else self._reference_level_shapes
            return ms_deform_attn_reference(value, shapes, locations, weights)
        return ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights)

    # The level shapes the reference uses while `reference_sampling` is active (None: `spatial_shapes`).
    _reference_level_shapes = None

    @classmethod
    @contextlib.contextmanager
    def reference_sampling(cls, root: nn.Module, level_shapes: Sequence[Tuple[int, int]]) -> Iterator[None]:
        """While active, every MSDeformAttn of `root` samples with the pure-PyTorch reference, given
        the level shapes `level_shapes` ((H, W) per level, finest first) rather than reading its
        `spatial_shapes` tensor back to the host: exported graphs pass the maps' own (symbolic) sizes,
        so that the reference (standard operators: ONNX GridSample) keeps the image size dynamic.
        Each module's `use_reference` is restored on exit."""
        modules = [module for module in root.modules() if isinstance(module, cls)]
        saved = [module.use_reference for module in modules]
        for module in modules:
            module.use_reference, module._reference_level_shapes = True, level_shapes
        try:
            yield
        finally:
            for module, use_reference in zip(modules, saved):
                module.use_reference = use_reference
                del module._reference_level_shapes

    # -- forward ----------------------------------------------------------------------------------
    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        value_input: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """
        Args:
            query: (N, Lq, d_model), positional embedding already added.
            reference_points: (N, Lq, L, 2) in [0, 1] or (N, Lq, L, 4) boxes (cx, cy, w, h).
            value_input: (N, S, d_model), the flattened levels.
            spatial_shapes: (L, 2) int64 (H, W) of each level.
            level_start_index: (L,) int64.
            padding_mask: (N, S) bool, True where the key is padding.
        Returns:
            (N, Lq, d_model)
        """
        value = self.project_value(value_input, padding_mask)
        locations, logits = self.sampling_locations_and_logits(query, reference_points, spatial_shapes)
        weights = self.attention_weights_from_logits(logits)
        out = self.sample(value, spatial_shapes, level_start_index, locations, weights)
        return self.output_proj(out)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_levels={self.n_levels}, n_heads={self.n_heads}, "
                f"n_points={self.n_points}, use_reference={self.use_reference}")
