"""Co-DETR's customized positive queries (Sec. 3.3 of the paper).

Each auxiliary head's positive anchors / proposals become extra decoder queries. Line by line
as in the official release (Sense-X/Co-DETR, projects/models/: co_deformable_detr_head.py
`get_aux_targets`, lines 372-473, and transformer.py `forward_aux`, lines 407-417), per head:
- reference: the box itself, cxcywh normalised by the unpadded image size, not clipped
  (anchors may reach past the image; the decoder's inverse sigmoid clamps later layers);
- position and content: the box's sine embedding (of the box clamped to [0, 1], as the
  official sigmoid(inverse_sigmoid(box))) -> Linear(2d, 2d) -> LayerNorm(2d), split into
  (position, content); content += LayerNorm(Linear(feature)); position += a per-head embedding.
  The projections are per head. The feature is the adapter's: ATSS takes it at the anchor's
  level and location, Faster R-CNN the mean of the RoI head's 7x7 RoIAlign of the proposal;
- target: the gt the head assigned it to (an `Assignment` built directly, no Hungarian matching).

Per head, images get M = clamp(most positives in an image, MIN, MAX) queries; an image with more
positives keeps a random M (official) or its best M by IoU. The rest of an image's M slots are,
by default (official use_zero_padding=False), random negatives of the same head -- anchors /
proposals it assigned to background -- trained as background (classification loss only, no box
loss) and not masked in self-attention; with ZERO_PADDING they are padding queries masked out of
self-attention and of the loss (slots left when a head has too few negatives are padding too).
The heads' groups go through the decoder together, in one pass, kept apart by a block-diagonal
self-attention mask (the official code runs one decoder pass per head). Everything here is
vectorised over the batch (no per-image loops).
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torchvision.ops import box_convert

from detectron2.structures import ImageList

from ..box_ops import sort_within_groups
from ..matcher import Assignment
from ..position_encoding import box_sine_embedding

# Reference box of the padding queries (any valid box: they are masked everywhere).
PADDING_BOX = (0.5, 0.5, 0.5, 0.5)
POS_QUERY_SUBSETS = ("random", "best")
HEAD_EMBEDS = ("scalar", "vector", "none")


@dataclass
class AuxPositives:
    """The positives of one auxiliary head over the batch, flat (P = positives in the batch)."""

    batch_index: torch.Tensor  # (P,) int64
    boxes: torch.Tensor  # (P, 4) xyxy in the image's pixels (anchors or proposals)
    gt_index: torch.Tensor  # (P,) int64, index into that image's targets
    score: torch.Tensor  # (P,) IoU with its gt (priority for POS_QUERY_SUBSET "best")
    features: torch.Tensor  # (P, C) content feature of each positive


@dataclass
class AuxNegatives:
    """The anchors / proposals one auxiliary head trained as background: candidates for the
    padding queries. Features are gathered lazily (`feature_table[feature_rows]`) for the few
    that are drawn, since the pool can be every anchor of the batch."""

    batch_index: torch.Tensor  # (Pn,) int64
    boxes: torch.Tensor  # (Pn, 4) xyxy in the image's pixels
    feature_rows: torch.Tensor  # (Pn,) int64 rows of feature_table
    feature_table: torch.Tensor  # (R, C)


def image_sizes_tensor(images: ImageList, device) -> torch.Tensor:
    """(N, 2) (h, w) of the unpadded images of a padded batch."""
    return torch.as_tensor(images.image_sizes, device=device).view(-1, 2)


@dataclass
class PackedPositives:
    """One head's positive queries laid out as (N, M), filled up with negatives or padding."""

    boxes: torch.Tensor  # (N, M, 4) cxcywh normalised to the unpadded image (not clipped)
    features: torch.Tensor  # (N, M, C)
    padding_mask: torch.Tensor  # (N, M) True on padding queries (masked; never on negatives)
    assignment: Assignment  # the positives: query_index in [0, M)

    @property
    def num_queries(self) -> int:
        return self.boxes.shape[1]


def _normalized_cxcywh(xyxy: torch.Tensor, sizes_hw: torch.Tensor) -> torch.Tensor:
    """xyxy pixels -> cxcywh divided by the image's (w, h), no clipping (official line 422)."""
    scale = torch.stack((sizes_hw[:, 1], sizes_hw[:, 0], sizes_hw[:, 1], sizes_hw[:, 0]), -1).to(xyxy.dtype)
    return box_convert(xyxy / scale, "xyxy", "cxcywh")


def pack_positives(
    positives: AuxPositives,
    num_images: int,
    image_sizes: torch.Tensor,
    min_queries: int,
    max_queries: int,
    negatives: Optional[AuxNegatives] = None,
    subset: str = "random",
) -> PackedPositives:
    """Lays the positives of each image out in its row; M = clamp(most positives in an image,
    min_queries, max_queries). An image with more than M keeps a random M (`subset` "random",
    official) or its M best by score ("best"). The free slots of each row take random
    `negatives` of that image (None: masked padding); slots left after that are padding.

    image_sizes: (N, 2) (h, w) of the unpadded images."""
    if min_queries < 1 or max_queries < min_queries:
        raise ValueError(f"Co-DETR positive queries: need 1 <= MIN_POS_QUERIES <= MAX_POS_QUERIES, got {min_queries}, {max_queries}")
    if subset not in POS_QUERY_SUBSETS:
        raise ValueError(f"Co-DETR POS_QUERY_SUBSET must be one of {POS_QUERY_SUBSETS}, got {subset!r}")
    device = positives.boxes.device
    counts = torch.bincount(positives.batch_index, minlength=num_images)
    m = int(counts.max().clamp(min=min_queries, max=max_queries))
    # By image; within an image by descending priority (random, or the score).
    priority = positives.score if subset == "best" else torch.rand(positives.score.shape, device=device)
    order, rank = sort_within_groups(priority, positives.batch_index)
    batch = positives.batch_index[order]
    keep = rank < m
    order, batch, rank = order[keep], batch[keep], rank[keep]

    dtype = positives.boxes.dtype
    boxes = torch.tensor(PADDING_BOX, device=device, dtype=dtype).repeat(num_images, m, 1)
    boxes = boxes.index_put((batch, rank), _normalized_cxcywh(positives.boxes[order].detach(), image_sizes[batch]))
    features = positives.features
    features = features.new_zeros(num_images, m, features.shape[-1]).index_put((batch, rank), features[order])
    filled = torch.zeros(num_images, m, dtype=torch.bool, device=device).index_put(
        (batch, rank), torch.ones_like(batch, dtype=torch.bool)
    )
    assignment = Assignment(batch, rank, positives.gt_index[order])

    if negatives is not None and negatives.batch_index.numel() > 0:
        # Random negatives of each image into its slots after its positives (official line 444).
        kept = counts.clamp(max=m)
        neg_order, neg_rank = sort_within_groups(
            torch.rand(negatives.batch_index.shape, device=device), negatives.batch_index
        )
        neg_batch = negatives.batch_index[neg_order]
        slot = kept[neg_batch] + neg_rank
        take = slot < m
        neg_order, neg_batch, slot = neg_order[take], neg_batch[take], slot[take]
        boxes = boxes.index_put(
            (neg_batch, slot), _normalized_cxcywh(negatives.boxes[neg_order].detach().to(dtype), image_sizes[neg_batch])
        )
        rows = negatives.feature_rows[neg_order]
        features = features.index_put((neg_batch, slot), negatives.feature_table[rows].to(features.dtype))
        filled = filled.index_put((neg_batch, slot), torch.ones_like(slot, dtype=torch.bool))
    return PackedPositives(boxes, features, ~filled, assignment)


class PositiveQueryEmbedding(nn.Module):
    """Turns one head's packed positives into decoder queries (content, position, reference),
    as the official `forward_aux` (transformer.py lines 407-417) with that head's own layers.

    `head_embed` "scalar": one learned scalar added to every channel of the position, the
    official R-50 release (`nn.Embedding(num_co_heads, 1, 1, d)`, i.e. embedding_dim 1); "vector":
    a d-vector; "none": no head embedding (for a decoder that recomputes every query's position
    from its reference box, QUERY_POSITION_FROM_REFERENCE, where it would be unused). Initialisation as the official `init_weights` (xavier-uniform on every >1-d
    parameter of the transformer): the two Linear weights, and the head embedding as one row
    of a (num_heads, 1 or d) table."""

    def __init__(self, d_model: int, head_embed: str = "scalar", num_heads: int = 1):
        super().__init__()
        if head_embed not in HEAD_EMBEDS:
            raise ValueError(f"Co-DETR HEAD_EMBED must be one of {HEAD_EMBEDS}, got {head_embed!r}")
        self.d_model = d_model
        self.box_proj = nn.Linear(2 * d_model, 2 * d_model)  # aux_pos_trans
        self.box_norm = nn.LayerNorm(2 * d_model)  # aux_pos_trans_norm
        self.feature_proj = nn.Linear(d_model, d_model)  # pos_feats_trans
        self.feature_norm = nn.LayerNorm(d_model)  # pos_feats_norm
        if head_embed == "none":
            self.head_embed = None
        else:
            width = 1 if head_embed == "scalar" else d_model
            bound = math.sqrt(6.0 / (num_heads + width))  # xavier-uniform of a (num_heads, width) table
            self.head_embed = nn.Parameter(torch.empty(width).uniform_(-bound, bound))
        nn.init.xavier_uniform_(self.box_proj.weight)
        nn.init.xavier_uniform_(self.feature_proj.weight)

    def forward(self, packed: PackedPositives, dtype=None):
        dtype = dtype or packed.features.dtype
        sine = box_sine_embedding(packed.boxes.clamp(0.0, 1.0), self.d_model // 2)  # (N, M, 2d)
        position, content = self.box_norm(self.box_proj(sine.to(dtype))).split(self.d_model, dim=-1)
        content = content + self.feature_norm(self.feature_proj(packed.features.to(dtype)))
        if self.head_embed is not None:
            position = position + self.head_embed.to(dtype)
        return content, position, packed.boxes.to(dtype)
