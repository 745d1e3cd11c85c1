"""Sine position embeddings: for feature maps (from their padding masks) and for boxes."""
import math

import torch
from torch import nn


class PositionEmbeddingSine(nn.Module):
    """DETR's 2-D sine embedding, normalised over each image's valid (unpadded) extent.

    Returns (N, 2 * num_pos_feats, H, W) for a padding mask (N, H, W) with True on padding.

    Deformable DETR (its models/position_encoding.py): temperature 10000, the cumulative position
    minus 0.5 (`offset`, centred on the pixel) divided by the valid extent. DINO (IDEA-Research/DINO
    models/dino/position_encoding.py:62-108 `PositionEmbeddingSineHW`, built at :142-147 with
    config/DINO/DINO_4scale.py:30-31 `pe_temperatureH = pe_temperatureW = 20`, `normalize=True`):
    temperature 20 and no offset (:89-92 divides the cumulative position itself).
    """

    def __init__(self, num_pos_feats=128, temperature=10000, offset=-0.5):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.offset = offset  # Deformable DETR centres the cumulative positions on the pixel; DINO: 0.

    def forward(self, padding_mask):
        not_mask = (~padding_mask).to(torch.float32)
        y_embed = not_mask.cumsum(1)
        x_embed = not_mask.cumsum(2)
        eps = 1e-6
        scale = 2 * math.pi
        y_embed = (y_embed + self.offset) / (y_embed[:, -1:, :] + eps) * scale
        x_embed = (x_embed + self.offset) / (x_embed[:, :, -1:] + eps) * scale
        pos_x = _sine_features(x_embed, self.num_pos_feats, self.temperature)
        pos_y = _sine_features(y_embed, self.num_pos_feats, self.temperature)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def _sine_features(coordinate, num_feats, temperature):
    """Interleaved sin/cos features of `coordinate` (any shape) along a new last dim of num_feats."""
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=coordinate.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    angles = coordinate[..., None] / dim_t
    return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)


def box_sine_embedding(boxes, num_feats=128, temperature=10000, y_first=False):
    """Sine embedding of normalised boxes (..., 4) cxcywh or points (..., 2) in [0, 1].

    Returns (..., boxes.shape[-1] * num_feats), one block of `num_feats` interleaved sin/cos
    features per coordinate, in the order x, y, w, h (Deformable DETR's `get_proposal_pos_embed`);
    used to turn boxes into positional queries (two-stage proposals, Co-DETR's positive queries).
    `y_first`: the order y, x, w, h of DINO's `gen_sineembed_for_position` (models/dino/utils.py:138-164:
    `torch.cat((pos_y, pos_x, pos_w, pos_h))` at :161, `(pos_y, pos_x)` for points at :151; same
    temperature 10000 and 2*pi scale), the input of its decoder's `ref_point_head`.
    """
    coordinates = boxes.to(torch.float32) * (2 * math.pi)
    if y_first:
        coordinates = torch.cat((coordinates[..., 1:2], coordinates[..., 0:1], coordinates[..., 2:]), -1)
    return _sine_features(coordinates, num_feats, temperature).flatten(-2)
