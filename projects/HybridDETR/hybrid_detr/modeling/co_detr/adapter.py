"""Co-DETR's multi-scale adapter (Sec. 3.2 of the paper): the encoder's output, split back into
per-level maps, plus one coarser level made by a 3x3 stride-2 conv + GroupNorm on the coarsest
map. The auxiliary heads see these maps; their gradients flow through them into the encoder.
"""
import math
from typing import List, Sequence

import torch
from torch import nn

from ..token_layout import EncoderMemory


def group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with up to `groups` groups (fewer when `channels` is not divisible)."""
    return nn.GroupNorm(math.gcd(groups, channels), channels)


class MultiScaleAdapter(nn.Module):
    def __init__(self, d_model: int, level_strides: Sequence[int]):
        super().__init__()
        self.downsample = nn.Sequential(nn.Conv2d(d_model, d_model, 3, stride=2, padding=1), group_norm(d_model))
        self.strides = [int(s) for s in level_strides] + [2 * int(level_strides[-1])]
        self.d_model = d_model

    @property
    def num_levels(self) -> int:
        return len(self.strides)

    def forward(self, memory: EncoderMemory) -> List[torch.Tensor]:
        """Per-level maps (N, C, H, W), finest first: the encoder's L levels and the extra one."""
        levels = memory.split_levels()
        if len(levels) != self.num_levels - 1:
            raise ValueError(
                f"Co-DETR adapter was built for {self.num_levels - 1} encoder levels (strides "
                f"{self.strides[:-1]}), the encoder memory has {len(levels)}"
            )
        return levels + [self.downsample(levels[-1])]
