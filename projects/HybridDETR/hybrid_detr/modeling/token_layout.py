"""The multi-level token layout: how per-level feature maps become one token sequence and back.

The encoder, the decoder's attention, two-stage proposals, Co-DETR's adapter and SMCA all read the
memory as `L` levels laid end to end (level-major, row-major within a level). `LevelLayout` is that
layout, once: the level shapes as Python ints on the host (so that no forward pass reads sizes back
from the device) next to the `spatial_shapes` / `level_start_index` tensors our op takes.
`EncoderMemory` is the encoder's output in that layout, with what attending to it needs.
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

__all__ = ["LevelLayout", "EncoderMemory", "valid_ratios"]


@dataclass(frozen=True)
class LevelLayout:
    shapes: Tuple[Tuple[int, int], ...]  # (H, W) of each level, finest first, host ints
    spatial_shapes: torch.Tensor  # (L, 2) int64 on the device: the same shapes, for the op
    level_start_index: torch.Tensor  # (L,) int64 on the device: first token of each level

    @classmethod
    def of_maps(cls, maps: Sequence[torch.Tensor], symbolic: bool = False) -> "LevelLayout":
        """The layout of per-level maps (N, C, H, W); the shapes come from the maps' sizes. With
        `symbolic`, the shapes are kept as the maps' sizes (not Python ints), so that they stay
        symbolic under `torch.export` (equal to the default in eager mode)."""
        if not symbolic:
            return cls.of_shapes(tuple((int(m.shape[-2]), int(m.shape[-1])) for m in maps), maps[0].device)
        shapes = tuple((m.shape[-2], m.shape[-1]) for m in maps)
        spatial_shapes = torch.tensor([list(s) for s in shapes], dtype=torch.int64, device=maps[0].device)
        areas = spatial_shapes.prod(1)
        return cls(shapes, spatial_shapes, torch.cat((areas.new_zeros(1), areas.cumsum(0)[:-1])))

    @classmethod
    def of_shapes(cls, shapes: Sequence[Tuple[int, int]], device=None) -> "LevelLayout":
        shapes = tuple((int(h), int(w)) for h, w in shapes)
        starts = [0]
        for h, w in shapes[:-1]:
            starts.append(starts[-1] + h * w)
        return cls(
            shapes,
            torch.as_tensor(shapes, dtype=torch.int64, device=device).view(-1, 2),
            torch.as_tensor(starts, dtype=torch.int64, device=device),
        )

    @property
    def num_levels(self) -> int:
        return len(self.shapes)

    @property
    def sizes(self) -> List[int]:
        """Tokens per level."""
        return [h * w for h, w in self.shapes]

    @property
    def num_tokens(self) -> int:
        return sum(self.sizes)

    def level_tokens(self, level: int) -> slice:
        """The tokens of one level."""
        start = sum(self.sizes[:level])
        return slice(start, start + self.sizes[level])

    @staticmethod
    def flatten(maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-level maps (N, C, H, W) -> tokens (N, S, C); per-level masks (N, H, W) -> (N, S)."""
        if maps[0].dim() == 3:
            return torch.cat([m.flatten(1) for m in maps], 1)
        return torch.cat([m.flatten(2).transpose(1, 2) for m in maps], 1)

    def split(self, tokens: torch.Tensor) -> List[torch.Tensor]:
        """Tokens (N, S, C) -> per-level maps (N, C, H, W), finest first."""
        n, _, c = tokens.shape
        return [
            level.transpose(1, 2).reshape(n, c, h, w)
            for level, (h, w) in zip(tokens.split(self.sizes, dim=1), self.shapes)
        ]

    def token_centers(self, valid_ratios: torch.Tensor) -> torch.Tensor:
        """(x, y) centre of every token of every level, normalised to each image's valid (unpadded)
        extent: (N, S, 2). The encoder's reference points and the two-stage proposals start here."""
        centers = []
        for level, (h, w) in enumerate(self.shapes):
            ys, xs = torch.meshgrid(
                torch.arange(h, dtype=torch.float32, device=valid_ratios.device) + 0.5,
                torch.arange(w, dtype=torch.float32, device=valid_ratios.device) + 0.5,
                indexing="ij",
            )
            xs = xs.reshape(1, -1) / (valid_ratios[:, level, 0, None] * w)
            ys = ys.reshape(1, -1) / (valid_ratios[:, level, 1, None] * h)
            centers.append(torch.stack((xs, ys), -1))
        return torch.cat(centers, 1)


def valid_ratios(masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Valid (w, h) fraction of each padded level: (N, L, 2) from per-level masks (N, H, W), True on
    padding."""
    ratios = []
    for mask in masks:
        _, h, w = mask.shape
        valid_h = (~mask[:, :, 0]).sum(1).float()
        valid_w = (~mask[:, 0, :]).sum(1).float()
        ratios.append(torch.stack((valid_w / w, valid_h / h), -1))
    return torch.stack(ratios, 1)


@dataclass
class EncoderMemory:
    """The encoder's output and everything needed to attend to it."""

    memory: torch.Tensor  # (N, S, C)
    layout: LevelLayout
    valid_ratios: torch.Tensor  # (N, L, 2) valid (w, h) fraction of each padded level
    padding_mask: torch.Tensor  # (N, S) True on padding
    # (N, S, C) the keys' position embedding (sine + level embedding) the encoder used, for dense
    # attention to the memory. None when the caller has none.
    position: Optional[torch.Tensor] = None

    @property
    def spatial_shapes(self) -> torch.Tensor:
        return self.layout.spatial_shapes

    @property
    def level_start_index(self) -> torch.Tensor:
        return self.layout.level_start_index

    def split_levels(self) -> List[torch.Tensor]:
        """Memory as per-level maps (N, C, H, W), finest first."""
        return self.layout.split(self.memory)
