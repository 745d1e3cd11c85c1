"""Backbone features -> the transformer's multi-scale input levels."""
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from .position_encoding import PositionEmbeddingSine


class MultiScaleNeck(nn.Module):
    """1x1 conv + GroupNorm on each backbone level, plus extra levels by 3x3 stride-2 convs.

    Deformable DETR's input: C3-C5 projected to `hidden_dim` and a fourth level made from C5.
    Each level comes with its padding mask (True on padding) and sine position embedding
    (`position_temperature` / `position_offset`: see `PositionEmbeddingSine`; DINO: 20 and 0).
    DINO's 5-scale model (config/DINO/DINO_5scale.py:32,55: `return_interm_indices = [0, 1, 2, 3]`,
    `num_feature_levels = 5`) is C2-C5 plus one level made from C5 in the same way
    (models/dino/dino.py:106-110, 247-259: the first extra level convolves the backbone's last map).
    """

    def __init__(
        self,
        in_channels: List[int],
        in_strides: List[int],
        hidden_dim: int,
        num_levels: int,
        position_temperature: float = 10000,
        position_offset: float = -0.5,
    ):
        super().__init__()
        if num_levels < len(in_channels):
            raise ValueError(
                f"MODEL.HYBRID_DETR.NUM_FEATURE_LEVELS={num_levels} is smaller than the number of "
                f"IN_FEATURES ({len(in_channels)})"
            )
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, hidden_dim, kernel_size=1), nn.GroupNorm(32, hidden_dim))
            for c in in_channels
        )
        extra = []
        channels = in_channels[-1]
        for _ in range(num_levels - len(in_channels)):
            extra.append(
                nn.Sequential(
                    nn.Conv2d(channels, hidden_dim, kernel_size=3, stride=2, padding=1),
                    nn.GroupNorm(32, hidden_dim),
                )
            )
            channels = hidden_dim
        self.extra_proj = nn.ModuleList(extra)
        self.strides = list(in_strides) + [in_strides[-1] * 2 ** (i + 1) for i in range(len(extra))]
        self.position_embedding = PositionEmbeddingSine(hidden_dim // 2, position_temperature, position_offset)
        for proj in list(self.input_proj) + list(self.extra_proj):
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)

    def forward(self, features: List[torch.Tensor], image_padding_mask: torch.Tensor):
        """features: backbone maps, finest first; image_padding_mask: (N, H, W) True on padding.

        Returns lists (finest first) of maps (N, C, h, w), masks (N, h, w) and positions (N, C, h, w).
        """
        maps = [proj(x) for proj, x in zip(self.input_proj, features)]
        source = features[-1]
        for proj in self.extra_proj:
            source = proj(source)
            maps.append(source)
        masks = [
            F.interpolate(image_padding_mask[None].float(), size=m.shape[-2:]).to(torch.bool)[0]
            for m in maps
        ]
        positions = [self.position_embedding(mask).to(m.dtype) for m, mask in zip(maps, masks)]
        return maps, masks, positions


def backbone_levels(output_shape: Dict, in_features: List[str]):
    """(channels, strides) of the chosen backbone outputs, with a clear error for unknown names."""
    missing = [f for f in in_features if f not in output_shape]
    if missing:
        raise ValueError(
            f"MODEL.HYBRID_DETR.IN_FEATURES {missing} are not produced by the backbone "
            f"(it gives {sorted(output_shape)})"
        )
    return [output_shape[f].channels for f in in_features], [output_shape[f].stride for f in in_features]
